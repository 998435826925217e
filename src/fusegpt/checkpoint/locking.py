"""One writer per output: an exclusive lock beside the output for as long as a run writes it.

:func:`output_lock` takes ``fcntl.flock`` on ``.NAME.lock`` beside the output (the parent folder is
created for it). A second run on the same output fails at once with the first run's pid instead of
deleting the first run's temporaries as stale or silently replacing its result. The kernel drops
the lock when a process dies, so a killed run never blocks the next one, and temporaries found
while holding the lock are truly stale. The lock is re-entrant within a process (``prune`` holds it
while the save inside takes it again) and the lock file is removed on release.

Where ``fcntl`` is missing (Windows) runs are not locked against each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputLockedError

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

_HELD: dict[Path, int] = {}  # resolved output -> depth, in this process


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(output: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of ``output`` (raises :class:`OutputLockedError` if another run holds it)."""
    out = Path(output).expanduser().resolve()
    if out in _HELD or fcntl is None:
        _HELD[out] = _HELD.get(out, 0) + 1
        try:
            yield
        finally:
            _HELD[out] -= 1
            if not _HELD[out]:
                del _HELD[out]
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    fd = _acquire(path, out)
    _HELD[out] = 1
    try:
        yield
    finally:
        del _HELD[out]
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)  # unlink before unlocking: a waiter re-checks the inode it locked
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise OutputLockedError(f"another fusegpt run{f' (pid {pid})' if pid else ''} is writing {out} right "
                                    "now; wait for it to finish, or choose another --output") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not unlinked by a releasing holder between our open and our lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
