"""fusegpt: structured pruning of LLMs that keeps them good.

    import fusegpt
    result = fusegpt.prune(None, fusegpt.MIConfig(sparsity=0.25), output="runs/mi25")   # the whole run
    model, tok = fusegpt.load_model()                                                   # or in memory:
    model, report = fusegpt.compress(model, tok, fusegpt.MIConfig(sparsity=0.25))
"""

from .api import (
    Placement,
    PruneResult,
    RunPlan,
    compress,
    configs_for,
    estimate_memory,
    estimate_seconds,
    evaluate,
    heal_checkpoint,
    plan_run,
    prune,
)
from .checkpoint import save_pruned
from .heal import HealConfig, heal
from .loading import load_model, load_pruned
from .methods import (
    BlockPruneConfig,
    FuseGPTConfig,
    GroupTrainConfig,
    LLMPrunerConfig,
    MagnitudeWidthConfig,
    Method,
    MIConfig,
    MIFTConfig,
    ReplaceMeConfig,
    ShortGPTConfig,
    SLEBConfig,
    SliceGPTConfig,
    SlimGPTConfig,
    config_for,
    register,
)
from .methods import names as method_names
from .report import Report, StepReport
from .runstate import Interrupted
from .settings import CalibrationConfig, ConfigError, EvalConfig, PruneConfig

__version__ = "0.1.0"

__all__ = [
    "BlockPruneConfig",
    "CalibrationConfig",
    "ConfigError",
    "EvalConfig",
    "FuseGPTConfig",
    "GroupTrainConfig",
    "HealConfig",
    "Interrupted",
    "LLMPrunerConfig",
    "MIConfig",
    "MIFTConfig",
    "MagnitudeWidthConfig",
    "Method",
    "Placement",
    "PruneConfig",
    "PruneResult",
    "ReplaceMeConfig",
    "Report",
    "RunPlan",
    "SLEBConfig",
    "ShortGPTConfig",
    "SliceGPTConfig",
    "SlimGPTConfig",
    "StepReport",
    "compress",
    "config_for",
    "configs_for",
    "estimate_memory",
    "estimate_seconds",
    "evaluate",
    "heal",
    "heal_checkpoint",
    "load_model",
    "load_pruned",
    "method_names",
    "plan_run",
    "prune",
    "register",
    "save_pruned",
]
