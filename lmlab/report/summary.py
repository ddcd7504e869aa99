"""Tables of results: one run's metrics on the terminal, and a sweep's summary (summary.csv, summary.md
and a rich table), gathered from each job's ``results.json`` / ``FAILED`` and its ``lmlab eval`` records
(``evals/<n>.json``, shown as ``eval:<metric>`` with the records named) by a Hydra callback."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from lmlab.io import write_text
from lmlab.run_dir import RESULTS, DamagedRecord, failure, read_evaluations, read_results, status

FIXED = ["job", "overrides", "status", "reason"]
EVAL_PREFIX = "eval:"  # a metric of an `lmlab eval` record, beside the training-time one of the same name
EVALUATIONS = "evaluations"  # the column naming the records the eval: numbers come from


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
    return rows


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


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = gather(sweep_dir)
    write_text(sweep_dir / "summary.csv", to_csv(rows))
    write_text(sweep_dir / "summary.md", to_markdown(rows))
    return rows


class SweepSummary(Callback):
    """At the end of ``lmlab train -m``: write the sweep's summary and print it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        console = Console()
        console.print(rich_table(rows, title=f"sweep {sweep_dir}"))
        for r in rows:
            if r["status"] not in ("done", "incomplete"):
                console.print(f"[red]{r['status']}[/red] {r['overrides']}: {r['reason']}", markup=True,
                              highlight=False)
        print(f"[lmlab] summary: {sweep_dir / 'summary.csv'} and {sweep_dir / 'summary.md'}")
