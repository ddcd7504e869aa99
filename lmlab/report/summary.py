"""Tables of results: one run's metrics on the terminal, and a sweep's summary (summary.csv, summary.md
and a rich table), gathered from each job's ``results.json`` / ``FAILED`` by a Hydra callback.

The summary is always rebuilt whole from the job directories, under a lock in the sweep directory
(``SUMMARY_LOCK``), so two processes running the same sweep at once write the same table; rows are sorted by
the swept values (as numbers where they are numbers)."""

from __future__ import annotations

import csv
import fcntl
import io
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from lmlab.io import write_text
from lmlab.run_dir import RESULTS, failure, is_held, read_results, status

FIXED = ["job", "overrides", "status", "reason"]
SUMMARY_LOCK = ".summary.lock"  # in the sweep directory: one process at a time rebuilds the summary


def job_row(job_dir: Path) -> dict[str, Any]:
    """One job's row: its overrides, its status (``lmlab.run_dir.status``), the reason where it did not finish,
    and its metrics."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides), "status": "incomplete",
                           "reason": ""}
    row["status"] = status(job_dir)
    if row["status"] == "done" and (job_dir / RESULTS).exists():
        row.update(read_results(job_dir)["metrics"])
    elif row["status"] in ("diverged", "interrupted"):
        row["reason"] = read_results(job_dir).get("reason", "")
    elif row["status"] == "failed":
        row["reason"] = failure(job_dir)
    return row


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


def _fmt(value: Any) -> str:
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


def rich_table(rows: list[dict[str, Any]], title: str, max_metrics: int = 8) -> Table:
    """The terminal view: the sweep's axes, the status, and the first ``max_metrics`` metrics."""
    axes = rows[0]["axes"] if rows else []
    hidden = ("model/", "train/rows", "train/steps")
    metrics = [c for c in _columns(rows)[len(FIXED) + len(axes):]
               if not c.startswith(hidden) and not c.endswith(("_std", "_stderr", "/chance", "/ppl", "/optimum"))]
    cols = [*axes, "status", *metrics[:max_metrics]]
    table = Table(title=title)
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    return table


def metrics_table(metrics: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, _fmt(v))
    return table


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
