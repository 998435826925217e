"""Width-pruning machinery: block geometry, budget plans, structural edits, the block-by-block pass."""

from .edit import apply_ffn_pruning, apply_head_pruning, head_units, heads_kept, shrink_linear
from .geometry import NEEDED_ROLES, BlockWidth, block_width, decoder_params, head_options, width_roles
from .plan import WIDTH_SCHEDULES, LayerPlan, WidthPlan, plan_widths, schedule_shape
from .run import UnitChooser, prune_widths

__all__ = ["NEEDED_ROLES", "WIDTH_SCHEDULES", "BlockWidth", "LayerPlan", "UnitChooser", "WidthPlan",
           "apply_ffn_pruning", "apply_head_pruning", "block_width", "decoder_params", "head_options",
           "head_units", "heads_kept", "plan_widths", "prune_widths", "schedule_shape", "shrink_linear",
           "width_roles"]
