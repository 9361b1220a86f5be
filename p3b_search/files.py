"""Files that other processes read or write at the same time: atomic replacement and locks."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Environment variable naming the folder of generated data and cached pretrained weights.
CACHE_ENV = "P3B_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$P3B_CACHE_DIR`` if set, else ``~/.cache/p3b_search``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "p3b_search").expanduser()


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file next to ``path`` to write; when the block succeeds it is flushed
    to disk and renamed over ``path``, so readers (and a process killed mid-write) see the old
    file or the new one, never a partial one. On an error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block: POSIX
    ``flock``, between processes of one machine; no lock where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
