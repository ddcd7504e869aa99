"""Render the tables of docs/results.md from committed ``report.json`` artefacts.

Each block of docs/results.md between a ``<!-- rendered by scripts/render_results.py from <path>: <command> -->``
line and ``<!-- end of rendered section -->`` is rewritten from the ``report.json`` at ``<path>`` (relative to the
repository; ``lmlab.studies.same_loss.render.results_section``), or says that its rerun is pending, with
``<command>``, while no report is committed there. ``tests/test_paper_report.py`` checks that the file equals its
rendering.

    python scripts/render_results.py            # rewrite docs/results.md
    python scripts/render_results.py --check    # exit 1 if docs/results.md differs from its rendering
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results.md"
BEGIN = re.compile(r"^<!-- rendered by scripts/render_results\.py from (?P<source>\S+): (?P<command>.+) -->$")
END = "<!-- end of rendered section -->"


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every rendered block rewritten from its committed report."""
    sys.path.insert(0, str(root))
    from lmlab.studies.same_loss.render import results_section

    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        out.append(lines[i])
        m = BEGIN.match(lines[i])
        i += 1
        if not m:
            continue
        end = lines.index(END, i)
        f = root / m["source"]
        report = json.loads(f.read_text()) if f.is_file() else None
        out += ["", *results_section(report, m["source"], m["command"]), "", END]
        i = end + 1
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/results.md differs from its rendering")
    args = parser.parse_args(argv)
    text = RESULTS.read_text()
    fresh = render(text)
    if args.check:
        if fresh != text:
            print("docs/results.md differs from its rendering: run `python scripts/render_results.py`.",
                  file=sys.stderr)
            return 1
        return 0
    from lmlab.io import write_text

    write_text(RESULTS, fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
