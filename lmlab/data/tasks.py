"""A source's downstream tasks: which label column to use, and the labelled rows of a split.

A source lists its tasks in ``tasks`` (label column -> number of classes); each split holds one integer column
per task, ``-1`` where the task does not apply (see ``lmlab.data.source``).
"""

from __future__ import annotations

import numpy as np

from lmlab.errors import UserError


def resolve_task(source, task: str | None, evaluator: str) -> tuple[str, int]:
    """The label column to evaluate (default: the source's first task) and its number of classes."""
    tasks = dict(getattr(source, "tasks", {}) or {})
    name = getattr(source, "name", type(source).__name__)
    if not tasks:
        raise UserError(f"data {name} has no downstream labels: drop {evaluator} from eval or choose "
                        "data with labels.")
    if task is None:
        task = next(iter(tasks))
    if task not in tasks:
        raise UserError(f"data {name} has no task {task!r}: set eval.{evaluator}.task to one of "
                        f"{', '.join(tasks)}.")
    return task, int(tasks[task])


def labelled_rows(split, task: str, limit: int | None = None) -> tuple[list[list[int]], np.ndarray]:
    """The rows of ``split`` whose ``task`` label is not -1 (the first ``limit`` of them), and labels."""
    data = split.with_format(None)[:]  # plain lists (column access per row is slow in datasets)
    ids, labels = data["input_ids"], np.asarray(data[task], dtype=np.int64)
    keep = np.flatnonzero(labels >= 0)
    if limit is not None:
        keep = keep[:limit]
    return [list(ids[i]) for i in keep], labels[keep]
