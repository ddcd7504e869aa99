"""Atomic file writes (a reader, or a crash, never sees a half-written result or checkpoint), directories built
atomically with a manifest of their files (so a damaged cache entry is detected), and the stable hash of a
config that names cache entries and long run names."""

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

MANIFEST = ".manifest.json"  # inside a directory built by ``atomic_dir``: each file's size and hash
HASHED_UP_TO = 256 << 20  # files up to this size are hashed in the manifest, larger ones only sized


def _atomic(path: str | os.PathLike, write: Callable[[str], None], previous: str | os.PathLike | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def torch_save(obj: Any, path: str | os.PathLike, previous: str | os.PathLike | None = None) -> None:
    """``torch.save`` atomically; with ``previous``, the file it replaces is kept there (the last two survive)."""
    _atomic(path, lambda tmp: torch.save(obj, tmp), previous)


def zip_intact(path: str | os.PathLike) -> bool:
    """Whether a ``torch.save`` file (a zip archive) reads back whole: every member's CRC checks out."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


@contextmanager
def atomic_dir(path: str | os.PathLike, merge: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``path``; on success rename it to ``path`` in one step.

    The caller writes into the yielded folder. If ``path`` already exists when the block ends (another job of
    a sweep built the same entry first), the new copy is discarded and the existing one kept. On an error
    nothing is left behind. A directory built whole gets a manifest (``MANIFEST``: each file's size, and its
    hash up to ``HASHED_UP_TO``), which ``intact`` checks.

    With ``merge``, ``path`` is a directory that keeps its other entries (a run directory): the folder is built
    inside it under a hidden temporary name, and on success each of its entries replaces the entry of the same
    name in ``path`` (one rename each; a directory is replaced whole)."""
    path = Path(path)
    home = path if merge else path.parent
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=home))
    try:
        yield tmp
        if not merge:
            write_json(tmp / MANIFEST, _manifest(tmp))
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


def _file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(directory)): {"size": p.stat().st_size,
                                            **({"blake2b": _file_hash(p)} if p.stat().st_size <= HASHED_UP_TO else {})}
            for p in files}


def intact(directory: str | os.PathLike) -> bool:
    """Whether a directory built by ``atomic_dir`` still holds every file of its manifest, with the recorded
    size and hash (a directory without a manifest counts as intact: nothing was recorded to check)."""
    directory = Path(directory)
    try:
        recorded = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    for name, entry in recorded.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return False
        if "blake2b" in entry and _file_hash(path) != entry["blake2b"]:
            return False
    return True


def discard_if_damaged(directory: str | os.PathLike, what: str) -> None:
    """Delete the cache entry ``directory`` if it is not ``intact``, with a one-line notice (it is rebuilt)."""
    directory = Path(directory)
    if directory.exists() and not intact(directory):
        print(f"[lmlab] the cached {what} in {directory} is damaged (a file is missing or changed): rebuilding it.")
        shutil.rmtree(directory, ignore_errors=True)
