"""The helpers of ``scripts/walkthrough.py``, which renders docs/downstream.md's walk-through on real text from
fresh runs. Its corpora are the repository's own docs, README and sources, so any edit to those changes its
numbers: ``make docs`` rerenders it and ``make docs-check`` (``--check``, about two minutes) compares; the suite
does not run it, or every edit of a doc would fail the tests until the section is rerendered."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("walkthrough", ROOT / "scripts" / "walkthrough.py")
walkthrough = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(walkthrough)


def test_run_dir_joins_a_wrapped_title_and_metric_rows_keep_the_printed_values():
    stdout = "\n".join(["[lmlab] data: 7 documents", "results: ", "/tmp/x/runs/default/d.paths=my__rpus,max_ste",
                        "ps=150-e72c51af", "┏━━━┳━━━┓", "┃ metric          ┃ value ┃",
                        "│ perplexity/loss │ 4.546 │", "│ perplexity/bpb  │ 3.714 │", "│ train/time_s    │  11.5 │",
                        "└───┴───┘", "after the table"])
    assert walkthrough.run_dir(stdout) == "/tmp/x/runs/default/d.paths=my__rpus,max_steps=150-e72c51af"
    metrics = walkthrough.printed_metrics(walkthrough.results_table(stdout))
    assert walkthrough.metric_rows(metrics, ["perplexity/bpb", "perplexity/loss"]) == [
        "perplexity/bpb   3.714", "perplexity/loss  4.546"]
    try:
        walkthrough.metric_rows(metrics, ["probe/acc"])
    except SystemExit as error:
        assert "probe/acc" in str(error)
    else:
        raise AssertionError("a metric lmlab did not print was rendered")


def test_ungenerated_empties_the_section_so_it_never_feeds_its_own_numbers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n\n{walkthrough.BEGIN}\nperplexity/bpb 3.7\n{walkthrough.END}\n\nrest\n")
    assert walkthrough.ungenerated(doc) == f"intro\n\n{walkthrough.BEGIN}\n{walkthrough.END}\n\nrest\n"
    assert walkthrough.paragraphs("# Title\n\n```\ncode " + "x" * 90 + "\n```\n\n" + "Prose " * 20) == [
        ("Prose " * 20).strip()]
