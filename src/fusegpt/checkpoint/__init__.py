"""Checkpoints: atomic folders, saving (depth, fused and width-pruned), width metadata, GGUF export.

``gguf`` is imported on its own (``fusegpt.checkpoint.gguf``): it needs the optional ``gguf`` extra.
"""

from .atomic import OutputExistsError, atomic_write_dir, check_output
from .save import save_pruned
from .width import WIDTH_KEY, is_width_pruned, load_width_pruned

__all__ = ["WIDTH_KEY", "OutputExistsError", "atomic_write_dir", "check_output", "is_width_pruned",
           "load_width_pruned", "save_pruned"]
