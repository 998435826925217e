"""Atomic writes that never cost a user a file: a folder is written beside its final place and
renamed into it at the end.

* An existing output is replaced only with ``overwrite``, and only when fusegpt can prove it wrote
  everything in it (:mod:`fusegpt.checkpoint.ownership`: the ``.fusegpt`` marker's manifest, with a
  run id) or it is empty; never the current folder, one of its ancestors, the home folder or a
  folder the caller protects (the input model).
* The place is checked for writing (a probe file is created and removed), and for free space where
  the caller knows what it will write, before any long work.
* One writer per output (:mod:`fusegpt.checkpoint.locking`); temporaries left by a save that was
  killed (``.NAME.tmp-*``, ``.NAME.old-*``) are removed, with a warning, by the next writer of the
  same output, which holds the lock, so a live run's temporaries are never taken for stale ones.
* Folders and files get the permissions the umask gives (``mkdtemp``, and writers that create
  0600 files, would not).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import OutputExistsError, OutputNotWritableError
from .locking import output_lock
from .ownership import (
    MARKER,
    apply_umask,
    apply_umask_tree,
    check_replaceable,
    check_writable,
    nearest_existing,
    new_run_id,
    write_marker,
)

logger = logging.getLogger(__name__)

__all__ = ["MARKER", "OutputExistsError", "OutputNotWritableError", "apply_umask", "atomic_write_dir",
           "check_free_space", "check_output", "check_writable", "clean_stale", "output_lock"]


def _protected(out: Path, protect: Iterable[str | Path]) -> str | None:
    """Why ``out`` must never be replaced, or None."""
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if out == cwd or out in cwd.parents:
        return "it is the current folder or one of its parents"
    if out == home or out == Path(out.anchor):
        return "it is the home or root folder"
    for p in protect:
        p = Path(p).expanduser().resolve()
        if out == p or out in p.parents or p in out.parents:
            return f"it holds (or is inside) the input model {p}"
    return None


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse before any long work when ``folder``'s file system has less than ``need`` bytes free."""
    place = nearest_existing(folder)
    free = shutil.disk_usage(place).free
    if free < need:
        raise OutputNotWritableError(f"{place} has {free / 2**20:,.0f} MiB free, but {what} needs about "
                                     f"{need / 2**20:,.0f} MiB; free some space or choose another --output")


def clean_stale(out: Path) -> list[Path]:
    """Remove temporaries of ``out`` left by a save that was killed; returns what was removed.

    Call it only while holding ``out``'s lock (:func:`output_lock`): then no live run is writing them."""
    gone = []
    if out.parent.is_dir():
        for p in sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    if gone:
        logger.warning("removed %d temporary folder(s) left by an interrupted save of %s: %s", len(gone), out,
                       ", ".join(p.name for p in gone))
    return gone


def check_output(path: str | Path, overwrite: bool, protect: Iterable[str | Path] = ()) -> Path:
    """Check ``path`` may be written (and replaced, with ``overwrite``) before any long work."""
    out = Path(path).expanduser()
    resolved = out.resolve()
    why = _protected(resolved, protect)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output folder {out} exists; pass --overwrite (overwrite=True) to replace it")
        if not out.is_dir() or out.is_symlink():
            raise OutputExistsError(f"output {out} exists and is not a folder; choose another --output")
        if why:
            raise OutputExistsError(f"refusing to replace {out}: {why}; choose another --output")
        check_replaceable(out)
    elif why:
        raise OutputExistsError(f"refusing to write {out}: {why}; choose another --output")
    check_writable(out.parent)
    return out


def atomic_write_dir(path: str | Path, write: Callable[[Path], None], overwrite: bool = False,
                     protect: Iterable[str | Path] = (), kind: str = "output", run_id: str | None = None) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``path``; nothing half-written is left.

    The temporary folder sits beside ``path`` (same file system, so the rename is atomic) and is
    removed if ``write`` fails. It gets the ``.fusegpt`` marker listing what ``write`` put there
    (``kind``, ``run_id``: the marker's record). An existing ``path`` is replaced only as
    :func:`check_output` allows, under the output's lock.
    """
    out = Path(path).expanduser()
    with output_lock(out):
        out = check_output(out, overwrite, protect)
        clean_stale(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            write(tmp)
            apply_umask_tree(tmp)
            write_marker(tmp, kind, run_id or new_run_id())
            if out.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                out.rename(trash / out.name)
                tmp.rename(out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
