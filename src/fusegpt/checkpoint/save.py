"""Saving pruned checkpoints, atomically.

Depth-pruned (and fused) models are ordinary ``save_pretrained`` checkpoints that stock
``transformers`` loads. Width-pruned models carry per-layer widths in their config (key
``fusegpt_widths``, :mod:`fusegpt.checkpoint.width`) and load through ``fusegpt.load_pruned``.
A layer-wise (offloaded) model is written block by block.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..offload import offloader_of
from ..offload.layerwise import save_offloaded
from .atomic import atomic_write_dir
from .width import mark_width_checkpoint, needs_load_pruned

logger = logging.getLogger(__name__)


def save_pruned(model, tokenizer, path: str | Path, report=None, overwrite: bool = False, protect=()) -> Path:
    """Save ``model`` (safetensors), ``tokenizer`` and ``report.json`` to ``path`` atomically."""

    def write(tmp: Path) -> None:
        if offloader_of(model) is not None:  # layer-wise: written block by block
            save_offloaded(model, tmp)
        elif needs_load_pruned(model):  # read by load_pruned only: the model's own tensor names (transformers 5
            # would write multimodal models under their legacy names, which load_pruned's strict load does not map)
            model.save_pretrained(tmp, safe_serialization=True, **_own_names())
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        mark_width_checkpoint(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.save(tmp / "report.json")

    out = atomic_write_dir(path, write, overwrite, protect)
    logger.info("saved %s", out)
    return out


def _own_names() -> dict:
    import inspect

    from transformers import PreTrainedModel

    ok = "save_original_format" in inspect.signature(PreTrainedModel.save_pretrained).parameters
    return {"save_original_format": False} if ok else {}
