"""The README's default-job table is what the default job prints today: a fresh ``lmlab train`` (no arguments,
its own data cache) gives every metric exactly as the README prints it, timings aside
(``scripts/render_docs.py`` rewrites the section; rerun it when a number of the default job changes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
render_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_docs)


def test_readme_default_job_table_equals_a_fresh_run(tmp_path):
    stdout, results, wall = render_docs.run_default_job(tmp_path)
    fresh = render_docs.printed_metrics(render_docs.results_table(stdout))
    readme = render_docs.printed_metrics(render_docs.readme_section(render_docs.README.read_text()))
    assert fresh["train/steps"] == "1000" and "probe/acc" in fresh  # the table was read
    assert readme == fresh, "README.md's default-job table is stale: run `python scripts/render_docs.py`"


def test_printed_metrics_reads_a_table_and_leaves_timings_out():
    table = "\n".join(["results: runs/default/default", "┏━━━┳━━━┓", "┃ metric                ┃    value ┃",
                       "│ train/loss            │    2.053 │", "│ train/time_s          │     14.2 │",
                       "│ probe/acc_std         │ 0.002825 │", "│ probe/acc_ci95        │      n/a │", "└───┴───┘"])
    assert render_docs.printed_metrics(table) == {"train/loss": "2.053", "probe/acc_std": "0.002825",
                                                  "probe/acc_ci95": "n/a"}
