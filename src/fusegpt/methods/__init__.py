"""Every pruning method, one place each; importing this package registers them all.

    shortgpt.py  sleb.py  mi.py      block scoring (block_scoring.py holds what they share)
    fusegpt/                          FuseGPT: config with presets, the MI + fusion loop, run state
    mi_ft.py                          MI + FT, FuseGPT's ablation (the same loop without fusion)
    slimgpt/                          SlimGPT: config, OBS choice of heads and channels
    magnitude.py                      width baseline by weight norms (ScoreChooser)
    llm_pruner.py                     LLM-Pruner: Taylor importance, the same chooser
    replaceme.py                      ReplaceMe: spans replaced by a linear map (linear_map.py)
    slicegpt.py                       SliceGPT: PCA rotation and slicing of the stream (fusegpt.slicing)
    registry.py                       the Method records, lookup by name, chain parsing
"""

from . import fusegpt, llm_pruner, magnitude, mi, mi_ft, replaceme, shortgpt, sleb, slicegpt, slimgpt  # noqa: F401  (each registers itself)
from .block_scoring import BlockPruneConfig
from .fusegpt import GROUP_TRAIN_PRESETS, FuseGPTConfig, GroupTrainConfig
from .llm_pruner import LLMPrunerConfig
from .magnitude import MagnitudeWidthConfig
from .mi import MIConfig
from .mi_ft import MIFTConfig
from .registry import Method, config_for, get, method_of, names, parse_chain, register
from .replaceme import ReplaceMeConfig
from .shortgpt import ShortGPTConfig
from .sleb import SLEBConfig
from .slicegpt import SliceGPTConfig
from .slimgpt import SlimGPTConfig

__all__ = ["GROUP_TRAIN_PRESETS", "BlockPruneConfig", "FuseGPTConfig", "GroupTrainConfig", "LLMPrunerConfig", "MIConfig", "MIFTConfig",
           "MagnitudeWidthConfig", "Method", "ReplaceMeConfig", "SLEBConfig", "ShortGPTConfig", "SliceGPTConfig", "SlimGPTConfig", "config_for", "get",
           "method_of", "names", "parse_chain", "register"]
