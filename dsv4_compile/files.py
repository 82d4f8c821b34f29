"""Files that others read: written atomically (a reader sees the old or the new file, never half of one,
on any exit), with the same mode as any other file the user creates; UTC timestamps for them.

Imports nothing of ours: the manifest, the tuned tables and the build folder all write through here.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from pathlib import Path


def _umask_mode() -> int:
    """0o666 less the process's umask: what open() gives a new file (mkstemp would give 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, fsync, rename over `path`. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike):
    """A temporary path beside `path` for a writer that takes a path (safetensors, onnx): when the block
    ends without error, the file is fsynced, given write_text_atomic's mode and renamed over `path`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        yield str(tmp)
        publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """The finished file `tmp` (beside `path`) fsynced, given write_text_atomic's mode and renamed over `path`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def now_utc() -> str:
    """'2026-11-23T18:00:00Z'."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
