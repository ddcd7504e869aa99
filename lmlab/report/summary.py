"""Tables of results: one run's metrics on the terminal, and a sweep's summary (summary.csv, summary.md
and a rich table), gathered from each job's ``results.json`` / ``FAILED`` and its ``lmlab eval`` records
(``evals/<n>.json``, shown as ``eval:<metric>`` with the records named) by a Hydra callback.

The summary is always rebuilt whole from the job directories, under a lock in the sweep directory
(``SUMMARY_LOCK``), so two processes running the same sweep at once write the same table; rows are sorted by
the swept values (as numbers where they are numbers)."""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from lmlab.io import write_text
from lmlab.run_dir import RESULTS, DamagedRecord, failure, is_held, read_evaluations, read_results, status

FIXED = ["job", "overrides", "status", "reason"]
EVAL_PREFIX = "eval:"  # a metric of an `lmlab eval` record, beside the training-time one of the same name
EVALUATIONS = "evaluations"  # the column naming the records the eval: numbers come from
SUMMARY_LOCK = ".summary.lock"  # in the sweep directory: one process at a time rebuilds the summary


def job_row(job_dir: Path) -> dict[str, Any]:
    """One job's row: its overrides, its status (``lmlab.run_dir.status``), the reason where it did not finish,
    its metrics as training wrote them, and the metrics of its ``lmlab eval`` records (``eval_metrics``). A
    job whose records do not read back has the status ``damaged`` and the sentence that says how to fix it."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides), "status": "incomplete",
                           "reason": ""}
    row["status"] = status(job_dir)
    try:
        if row["status"] == "done" and (job_dir / RESULTS).exists():
            row.update(read_results(job_dir)["metrics"])
            row.update(eval_metrics(read_evaluations(job_dir)))
        elif row["status"] in ("diverged", "interrupted"):
            row["reason"] = read_results(job_dir).get("reason", "")
        elif row["status"] == "failed":
            row["reason"] = failure(job_dir)
    except DamagedRecord as e:
        row.update(status="damaged", reason=str(e))
    return row


def eval_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of a run's ``lmlab eval`` records (oldest first), apart from the training-time ones: each
    metric of the latest record that has it as ``eval:<metric>``, and ``EVALUATIONS``, which names the records
    those numbers come from (``#2 perplexity`` is ``evals/2.json``, which ran ``eval=perplexity``). The keys do
    not hold the record's number, so the columns of runs evaluated a different number of times line up."""
    latest: dict[str, tuple[float, int]] = {}
    names: dict[int, str] = {}
    for record in records:
        names[record["number"]] = ",".join(map(str, record.get("eval") or {})) or "?"
        latest.update({k: (v, record["number"]) for k, v in record["metrics"].items()})
    if not latest:
        return {}
    used = sorted({n for _, n in latest.values()})
    return {**{f"{EVAL_PREFIX}{k}": v for k, (v, _) in latest.items()},
            EVALUATIONS: "; ".join(f"#{n} {names[n]}" for n in used)}


def gather(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job of the sweep, with one column per override that varies between jobs (the sweep's axes)."""
    jobs = sorted(p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml"))
    rows = [job_row(j) for j in jobs]
    settings = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    keys = sorted({k for s in settings for k in s})
    axes = [k for k in keys if len({s.get(k) for s in settings}) > 1]
    for row, setting in zip(rows, settings):
        row["axes"] = axes
        row.update({k: setting.get(k, "") for k in axes})
    return sorted(rows, key=lambda r: [_order(r[k]) for k in axes] + [r["job"]])


def _order(value: Any) -> tuple:
    """A swept value's place in the table: numbers by value, before other values in text order."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    axes = rows[0]["axes"] if rows else []
    metrics = sorted({k for r in rows for k in r} - set(FIXED) - set(axes) - {"axes"})
    return FIXED + axes + metrics


NOT_DEFINED = "n/a"  # how a NaN metric prints: a spread or an interval over one seed, which has none
NOT_DEFINED_NOTE = f"{NOT_DEFINED}: not defined (a spread or a 95% interval over a single seed)"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return NOT_DEFINED
    if isinstance(value, float):  # counts stored as floats print as counts (20000, not 2e+04)
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return "" if value is None else str(value)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def header(name: str, width: int = 12) -> str:
    """A column name on lines of at most ``width`` characters (or its longest part), broken only after a ``/``
    or a ``.`` (``perplexity/`` ``loss``), never inside a word."""
    lines: list[str] = []
    for part in re.split(r"(?<=[/.])", name):
        if lines and len(lines[-1]) + len(part) <= width:
            lines[-1] += part
        else:
            lines.append(part)
    return "\n".join(lines)


def _notes(values) -> list[str]:
    return [NOT_DEFINED_NOTE] if any(isinstance(v, float) and math.isnan(v) for v in values) else []


def _titled(title: str, table: Table, notes: list[str]) -> Group:
    """The title on a line of its own above the table and the notes below it, each wrapped at the terminal's
    width (not at the table's)."""
    return Group(Text(title), table, *(Text(n) for n in notes))


def rich_table(rows: list[dict[str, Any]], title: str, max_metrics: int = 8, width: int | None = None) -> Group:
    """The terminal view: the sweep's axes, the status, and the first ``max_metrics`` metrics, as many of them
    as fit ``width`` (default: the terminal's) with every header (broken only after ``/`` or ``.``) and every
    value whole; a note counts the metrics left to ``summary.md``."""
    axes = rows[0]["axes"] if rows else []
    hidden = ("model/", "train/rows", "train/steps")
    secondary = ("_std", "_stderr", "/chance", "/ppl", "/optimum", "/rows")
    metrics = [c for c in _columns(rows)[len(FIXED) + len(axes):]
               if not c.startswith(hidden) and not c.endswith(secondary)]
    width = Console().width if width is None else width
    cols = [*axes, "status"]
    need = 1 + sum(3 + _width(c, rows) for c in cols)  # a border and two spaces of padding per column
    for c in metrics[:max_metrics]:
        if need + 3 + _width(c, rows) > width:
            break
        cols.append(c)
        need += 3 + _width(c, rows)
    table = Table()
    for c in cols:
        table.add_column(header(c), no_wrap=True, min_width=_width(c, rows))
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    notes = _notes([r.get(c) for r in rows for c in cols])
    left = len(metrics) - (len(cols) - len(axes) - 1)
    if left:
        notes.append(f"{left} more metric(s) in summary.md")
    return _titled(title, table, notes)


def _width(column: str, rows: list[dict[str, Any]]) -> int:
    """The width a column needs: its longest header line or value."""
    return max(len(line) for line in [*header(column).split("\n"), *(_fmt(r.get(column)) for r in rows)])


def metrics_table(metrics: dict[str, Any], title: str) -> Group:
    """One run's metrics, one per row, under its title (a NaN prints as n/a, with a note)."""
    table = Table()
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    for k, v in metrics.items():
        table.add_row(k, _fmt(v))
    return _titled(title, table, _notes(metrics.values()))


@contextmanager
def summary_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold the sweep's summary lock (an ``flock``, released by the kernel if the holder dies)."""
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(sweep_dir) / SUMMARY_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rebuild ``summary.csv`` and ``summary.md`` from the job directories as they are now, under the lock."""
    sweep_dir = Path(sweep_dir)
    with summary_lock(sweep_dir):
        rows = gather(sweep_dir)
        write_text(sweep_dir / "summary.csv", to_csv(rows))
        write_text(sweep_dir / "summary.md", to_markdown(rows))
    return rows


def wait_for_others(sweep_dir: Path, poll_s: float = 1.0) -> None:
    """Wait until no job of the sweep is held by a process (another run of the same sweep training it), so
    that the summary shows how each job ended rather than ``running``."""
    jobs = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]
    held = [j for j in jobs if is_held(j)]
    if held:
        print(f"[lmlab] waiting for {len(held)} job(s) of this sweep that another process is training "
              f"({', '.join(j.name for j in held[:3])}{', ...' if len(held) > 3 else ''})", flush=True)
    while held:
        time.sleep(poll_s)
        held = [j for j in held if is_held(j)]


class SweepSummary(Callback):
    """At the end of ``lmlab train -m``: write the sweep's summary and print it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        wait_for_others(sweep_dir)
        rows = write_summary(sweep_dir)
        console = Console()
        console.print(rich_table(rows, title=f"sweep {sweep_dir}"))
        for r in rows:
            if r["status"] not in ("done", "incomplete"):
                console.print(f"[red]{r['status']}[/red] {r['overrides']}: {r['reason']}", markup=True,
                              highlight=False)
        print(f"[lmlab] summary: {sweep_dir / 'summary.csv'} and {sweep_dir / 'summary.md'}")
