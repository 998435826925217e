"""Atomic writes: a folder is written beside its final place and renamed into it at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; check the parent is writable."""
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder")
    return out


def atomic_write_dir(path: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``path``; nothing half-written is left.

    The temporary folder sits beside ``path`` (same file system, so the rename is atomic) and is
    removed if ``write`` fails. An existing ``path`` is replaced only when ``overwrite``.
    """
    out = check_output(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
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
