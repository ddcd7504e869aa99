"""Atomic file writes (a reader, or a crash, never sees a half-written result or checkpoint), directories built
atomically with a manifest of their files (so a damaged cache entry is detected), and the stable hash of a
config that names cache entries and long run names.

Every write goes through ``_atomic`` or ``atomic_dir``: a temporary name (``TEMP_PREFIX``) beside the target,
held with an ``flock`` while it is written, then one rename. A temporary left by a killed process is no longer
held, and the next write into the same directory removes it (``remove_stale``). A write that fails -- whatever
error the library that writes raises (``OSError`` with ``ENOSPC``/``EFBIG``, ``torch.save``'s ``RuntimeError``,
a ``safetensors`` error) -- becomes one ``WriteFailed`` sentence naming the directory, its free space and the
file-size limit (``write_failure``). Files and folders get the user's umask, as ``open`` would give them."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from lmlab.errors import UserError

MANIFEST = ".manifest.json"  # inside a directory built by ``atomic_dir``: each file's size and hash
HASHED_UP_TO = 256 << 20  # files up to this size are hashed in the manifest, larger ones only sized
TEMP_PREFIX = ".tmp-"  # the temporary names of ``_atomic`` and ``atomic_dir``: .tmp-<name>-<random>

# a failed write, as the libraries that write report it: the errno of an OSError, or the words of the message
# of a library that wraps it (torch.save: "PytorchStreamWriter failed writing file ... file write failed";
# safetensors: "I/O error: No space left on device (os error 28)"; torch.save on a full disk:
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
WRITE_WORDS = re.compile(r"fail\w* (to )?writ|write fail|writ\w* fail|no space|storagefull|file too large|"
                         r"quota|read-only file system|inline_container|PytorchStreamWriter", re.IGNORECASE)
OS_ERROR = re.compile(r"(?:os error|code:) (\d+)")


class WriteFailed(UserError):
    """A file could not be written (a full disk, a quota, a file-size limit, a read-only file system)."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` (or an error it wraps) says that a write failed, rather than that the data were bad."""
    while e is not None:
        if isinstance(e, WriteFailed):
            return True
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return True
        code = OS_ERROR.search(str(e))
        said = WRITE_WORDS.search(str(e)) or (code is not None and int(code.group(1)) in WRITE_ERRNOS)
        if said and not isinstance(e, UserError):
            return True
        e = e.__cause__ or e.__context__
    return False


def write_failure(directory: str | os.PathLike, e: BaseException) -> WriteFailed:
    """The one sentence for a failed write into ``directory``: what the system said, the free space there and
    the file-size limit of this process (``ulimit -f``), where there is one."""
    directory = Path(directory)
    if isinstance(e, WriteFailed):
        return e
    cause = e
    while cause is not None and not (isinstance(cause, OSError) and cause.strerror):
        cause = cause.__cause__ or cause.__context__
    code = OS_ERROR.search(str(e))
    said = (cause.strerror if cause is not None else os.strerror(int(code.group(1))) if code
            else "the write failed")
    home = next((p for p in (directory, *directory.parents) if p.exists()), Path("/"))
    try:
        free = f"{_size(shutil.disk_usage(home).free)} free there"
    except OSError:
        free = "free space unknown"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limit_text = f", a file-size limit of {_size(limit)} (ulimit -f)" if limit != resource.RLIM_INFINITY else ""
    return WriteFailed(f"could not write into {directory} ({said}; {free}{limit_text}): free space on that disk "
                       f"{'or raise the file-size limit ' if limit_text else ''}(or make it writable), then rerun "
                       "the same command; nothing was half-written.")


@contextmanager
def writing(directory: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write inside the block (whatever raised it) into ``write_failure``'s sentence."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, Exception) and not isinstance(e, WriteFailed) and is_write_failure(e):
            raise write_failure(directory, e) from e
        raise


def _umask() -> int:
    """This process's umask (read from /proc where it can be, so that no other thread sees it change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _hold(fd: int) -> None:
    """Mark a temporary as being written: an ``flock`` that the kernel drops when this process ends. On a file
    system without locks the temporary is not marked, and ``remove_stale`` leaves it alone there."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass


def remove_stale(directory: str | os.PathLike, min_age_s: float = 2.0) -> list[Path]:
    """Remove the temporaries (``TEMP_PREFIX``) in ``directory`` that no process is writing (a killed write
    left them: nothing holds their ``flock``); returns what was removed. One younger than ``min_age_s`` is
    left alone (another process may have created it and not yet taken its lock)."""
    removed = []
    try:
        entries = [e for e in Path(directory).iterdir() if e.name.startswith(TEMP_PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        try:
            if time.time() - entry.lstat().st_mtime < min_age_s:
                continue
            fd = os.open(entry, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # being written now (or a file system without locks: nothing tells, so keep it)
            continue
        finally:
            os.close(fd)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _atomic(path: str | os.PathLike, write: Callable[[str], None], previous: str | os.PathLike | None = None) -> None:
    path = Path(path)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
        try:
            _hold(fd)
            os.fchmod(fd, 0o666 & ~_umask())
            write(tmp)
            if previous is not None and path.exists():
                os.replace(path, previous)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)


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
    with writing(home):
        home.mkdir(parents=True, exist_ok=True)
        remove_stale(home)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=home))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _hold(fd)
        os.chmod(tmp, 0o777 & ~_umask())
        with writing(home):
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
        os.close(fd)


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
