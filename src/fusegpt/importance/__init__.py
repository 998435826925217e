"""Block importance scores. Each scorer returns a tensor of scores and cuts nothing."""

from .bi import bi_scores
from .common import candidate_blocks, lowest, skip_one_scores
from .mi import mi_scores
from .sleb import sleb_scores

__all__ = ["bi_scores", "candidate_blocks", "lowest", "mi_scores", "skip_one_scores", "sleb_scores"]
