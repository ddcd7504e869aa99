"""Atomic file writes (a reader, or a crash, never sees a half-written result or checkpoint) and the stable
hash of a config that names cache entries and long run names."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def atomic_dir(path: str | os.PathLike, merge: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``path``; on success rename it to ``path`` in one step.

    The caller writes into the yielded folder. If ``path`` already exists when the block ends (another job of
    a sweep built the same entry first), the new copy is discarded and the existing one kept. On an error
    nothing is left behind.

    With ``merge``, ``path`` is a directory that keeps its other entries (a run directory): the folder is built
    inside it under a hidden temporary name, and on success each of its entries replaces the entry of the same
    name in ``path`` (one rename each; a directory is replaced whole)."""
    path = Path(path)
    home = path if merge else path.parent
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=home))
    try:
        yield tmp
        if merge:
            for item in sorted(tmp.iterdir()):
                if (path / item.name).is_dir() and not (path / item.name).is_symlink():
                    shutil.rmtree(path / item.name)
                os.replace(item, path / item.name)
        else:
            try:
                os.replace(tmp, path)
            except OSError:  # ``path`` exists and is not empty: another process won the race
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def config_hash(obj: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-able object (used for cache keys and long run names)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
