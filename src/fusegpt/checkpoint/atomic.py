"""Atomic writes that never cost a user a file: a folder is written beside its final place and
renamed into it at the end.

* An existing output is replaced only with ``overwrite``, and only when it is empty or holds a
  previous fusegpt output (``report.json``, a run state's ``state.json`` or the ``.fusegpt``
  marker every output carries); never the current folder, one of its ancestors, the home folder
  or a folder the caller protects (the input model).
* The place is checked for writing (a probe file is created and removed) before any long work.
* Temporaries left by a save that was killed (``.NAME.tmp-*``, ``.NAME.old-*``) are removed on the
  next write to the same output, with a warning.
* Folders and files get the permissions the umask gives (``mkdtemp`` alone would make them 0700).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = ".fusegpt"  # written into every output folder: "fusegpt wrote this, it may replace it"
OWN_FILES = ("report.json", "state.json", MARKER)


class OutputExistsError(FileExistsError):
    """The output folder exists and may not (or must not) be replaced; the message says why."""


class OutputNotWritableError(PermissionError):
    """The output's place cannot be written; found before any long work."""


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def apply_umask(path: Path, directory: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir``/``open`` would have (mkdtemp/mkstemp use 0700/0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


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
        if out == p or out in p.parents:
            return f"it holds the input model {p}"
    return None


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(folder: Path) -> None:
    """Create and remove a probe file in ``folder`` (or its nearest existing ancestor)."""
    place = _nearest_existing(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".fusegpt-probe-", dir=place)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputNotWritableError(f"cannot write in {place} ({e.strerror or e}); choose another --output "
                                     "or fix the folder's permissions") from None


def clean_stale(out: Path) -> list[Path]:
    """Remove temporaries of ``out`` left by a save that was killed; returns what was removed."""
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
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"output folder {out} exists; pass --overwrite (overwrite=True) to replace it")
        if not out.is_dir():
            raise OutputExistsError(f"output {out} exists and is not a folder; choose another --output")
        why = _protected(resolved, protect)
        if why:
            raise OutputExistsError(f"refusing to replace {out}: {why}; choose another --output")
        entries = list(out.iterdir())
        if entries and not any((out / f).exists() for f in OWN_FILES):
            raise OutputExistsError(
                f"refusing to replace {out}: it holds files fusegpt did not write (e.g. {entries[0].name}); "
                "choose another --output or empty it yourself")
    else:
        why = _protected(resolved, protect)
        if why:
            raise OutputExistsError(f"refusing to write {out}: {why}; choose another --output")
    check_writable(out.parent)
    clean_stale(out)
    return out


def atomic_write_dir(path: str | Path, write: Callable[[Path], None], overwrite: bool = False,
                     protect: Iterable[str | Path] = ()) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``path``; nothing half-written is left.

    The temporary folder sits beside ``path`` (same file system, so the rename is atomic) and is
    removed if ``write`` fails. An existing ``path`` is replaced only as :func:`check_output` allows.
    """
    out = check_output(path, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        apply_umask(tmp, directory=True)
        write(tmp)
        (tmp / MARKER).write_text("written by fusegpt; fusegpt may replace this folder (--overwrite)\n")
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
