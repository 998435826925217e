"""SliceGPT's machinery: the sliced modules (:mod:`.modules`) and the rotation pass (:mod:`.rotate`)."""

from .modules import SlicedRMSNorm, is_sliced_block, make_sliced
from .rotate import SliceError, SliceRecord, rotate_and_slice

__all__ = ["SliceError", "SliceRecord", "SlicedRMSNorm", "is_sliced_block", "make_sliced", "rotate_and_slice"]
