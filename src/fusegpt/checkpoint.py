"""Saving and loading pruned checkpoints, atomically.

Depth-pruned (and fused) models are ordinary ``save_pretrained`` checkpoints that stock
``transformers`` loads. Width-pruned models carry per-layer widths in their config (key
``fusegpt_widths``) and load through :func:`load_pruned`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


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


def save_pruned(model, tokenizer, path: str | Path, report=None, overwrite: bool = False) -> Path:
    """Save ``model`` (safetensors), ``tokenizer`` and ``report.json`` to ``path`` atomically."""

    def write(tmp: Path) -> None:
        from .offload import offloader_of, save_offloaded

        if offloader_of(model) is not None:  # layer-wise: written block by block
            save_offloaded(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        from .prune.width_checkpoint import mark_width_checkpoint  # per-layer widths (SlimGPT)

        mark_width_checkpoint(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.save(tmp / "report.json")

    out = atomic_write_dir(path, write, overwrite)
    logger.info("saved %s", out)
    return out


def load_pruned(path: str | Path, dtype=None, device="cpu"):
    """Load a fusegpt checkpoint: ``(model, tokenizer)``.

    Depth-pruned and fused checkpoints are plain transformers checkpoints; width-pruned ones
    are rebuilt at their per-layer widths (``fusegpt_widths`` in the config).
    """
    from .loading import is_width_pruned, load_model

    path = str(path)
    if is_width_pruned(path):
        from .prune.width_checkpoint import load_width_pruned

        return load_width_pruned(path, dtype=dtype, device=device)
    return load_model(path, dtype=dtype, device=device)
