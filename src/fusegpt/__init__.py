"""fusegpt: structured pruning of LLMs that keeps them good.

    from fusegpt import compress, evaluate, load_model, MIConfig, EvalConfig
    model, tok = load_model()                     # embedded SmolLM2-135M by default
    model, report = compress(model, tok, MIConfig(sparsity=0.25), eval_config=EvalConfig())
"""

from .api import compress, evaluate, register_method
from .checkpoint import save_pruned
from .config import (
    METHOD_CONFIGS,
    BlockPruneConfig,
    CalibrationConfig,
    ConfigError,
    EvalConfig,
    FuseGPTConfig,
    MagnitudeWidthConfig,
    MIConfig,
    MIFTConfig,
    PruneConfig,
    ShortGPTConfig,
    SLEBConfig,
    SlimGPTConfig,
    config_for,
)
from .loading import load_model
from .report import Report, StepReport

__version__ = "0.1.0"


def load_pruned(path, dtype=None, device="cpu"):
    """Load any fusegpt checkpoint (depth-pruned, fused or width-pruned): ``(model, tokenizer)``."""
    from .checkpoint import load_pruned as _load

    return _load(path, dtype=dtype, device=device)


__all__ = [
    "METHOD_CONFIGS",
    "BlockPruneConfig",
    "CalibrationConfig",
    "ConfigError",
    "EvalConfig",
    "FuseGPTConfig",
    "MagnitudeWidthConfig",
    "MIConfig",
    "MIFTConfig",
    "PruneConfig",
    "Report",
    "SLEBConfig",
    "SlimGPTConfig",
    "ShortGPTConfig",
    "StepReport",
    "compress",
    "config_for",
    "evaluate",
    "load_model",
    "load_pruned",
    "register_method",
    "save_pruned",
]
