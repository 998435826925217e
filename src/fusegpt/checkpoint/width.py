"""Checkpoints of width-pruned models: per-layer head counts and FFN widths in the config.

Stock ``transformers`` configs hold one ``num_attention_heads`` / ``intermediate_size`` for all
layers, so a SlimGPT model cannot be described by them. :func:`mark_width_checkpoint` (called
by :func:`fusegpt.checkpoint.save_pruned` after ``save_pretrained``) rewrites ``config.json``:

* ``fusegpt_widths`` = ``{"format": 1, "model_type": <the real one>, "num_attention_heads":
  [...], "num_key_value_heads": [...], "intermediate_size": [...]}``, one entry per layer;
* ``model_type`` = :data:`MARKER_MODEL_TYPE`, a type transformers does not know, whose name says
  what to do: ``AutoModelForCausalLM.from_pretrained`` then stops at once with
  "model type `fusegpt_width_pruned-load_with-fusegpt.load_pruned` ... does not recognize",
  instead of a shape mismatch deep inside the weight loading.

:func:`load_width_pruned` (behind ``fusegpt.load_pruned`` and ``fusegpt eval --model DIR``)
builds the model from the real config, shrinks each layer's projections to the saved widths
through the adapter, and loads the safetensors weights strictly. The KV cache works as usual
(``DynamicCache``); a static cache sized from ``config.num_key_value_heads`` does not fit
layers whose K/V heads were pruned.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedModelError
from ..models import DecoderAdapter, get_adapter
from ..patching import PATCH_KEY, apply_patch_layout, patch_layout
from .sliced import SLICED_KEY, apply_sliced_layout, sliced_layout

logger = logging.getLogger(__name__)

WIDTH_KEY = "fusegpt_widths"  # config key that marks a width-pruned checkpoint
MARKER_MODEL_TYPE = "fusegpt_width_pruned-load_with-fusegpt.load_pruned"
FORMAT = 1
_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def read_config_json(folder: str | Path) -> dict:
    """``folder/config.json`` as a dict, or a :class:`ModelLoadError` that names the file."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); the checkpoint's config is corrupt: restore it or "
                             "save the model again") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object; the checkpoint's config is corrupt")
    return raw


def is_width_pruned(path: str | Path) -> bool:
    """True for a folder whose config.json carries per-layer widths or a sliced stream (SliceGPT):
    a checkpoint that :func:`load_width_pruned` (``fusegpt.load_pruned``) rebuilds."""
    if not (Path(path) / "config.json").is_file():
        return False
    raw = read_config_json(path)
    return WIDTH_KEY in raw or SLICED_KEY in raw or PATCH_KEY in raw


def layer_widths(adapter: DecoderAdapter) -> dict[str, list[int]]:
    """Per-layer query heads, K/V heads and FFN widths of the model behind ``adapter``."""
    blocks = list(adapter.layers)
    return {
        "num_attention_heads": [adapter.num_heads(b) for b in blocks],
        "num_key_value_heads": [adapter.num_kv_heads(b) for b in blocks],
        "intermediate_size": [adapter.intermediate_size(b) for b in blocks],
    }


def is_width_pruned_model(model: nn.Module) -> bool:
    """True when some layer's widths differ from what the config says for all layers."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    adapter = _adapter_or_none(model)
    if adapter is None:
        return False
    if not all(isinstance(adapter.linear_roles(b).get(r), nn.Linear) for b in adapter.layers for r in _ROLES):
        return False  # families without the LLaMA layout (fused qkv, no gate) are never width-pruned
    if getattr(cfg, "intermediate_size", None) is None:
        return False
    widths = layer_widths(adapter)
    uniform = {
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
    }
    return any(any(v != uniform[k] for v in vals) for k, vals in widths.items())


def needs_load_pruned(model: nn.Module) -> bool:
    """True for a width-pruned, sliced or LinearPatch-ed model: its checkpoint is rebuilt by ``load_pruned``."""
    return is_width_pruned_model(model) or _sliced_layout(model) is not None or _patch_layout(model) is not None


def mark_width_checkpoint(model: nn.Module, folder: str | Path) -> bool:
    """If ``model`` is width-pruned or sliced, rewrite ``folder/config.json`` as a fusegpt width checkpoint."""
    width = is_width_pruned_model(model)
    sliced = _sliced_layout(model)
    patches = _patch_layout(model)
    if not width and sliced is None and patches is None:
        return False
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    real = cfg["model_type"]
    if width:
        cfg[WIDTH_KEY] = {"format": FORMAT, "model_type": real, **layer_widths(get_adapter(model)),
                          "note": "per-layer widths of a width-pruned (SlimGPT) checkpoint; load with "
                                  "fusegpt.load_pruned(path)"}
    if sliced is not None:
        cfg[SLICED_KEY] = {**sliced, "model_type": real}
    if patches is not None:
        cfg[PATCH_KEY] = {**patches, "model_type": real,
                          "note": "LinearPatch matrices on the residual stream; load with fusegpt.load_pruned(path)"}
    cfg["model_type"] = MARKER_MODEL_TYPE
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return True


def _adapter_or_none(model: nn.Module) -> DecoderAdapter | None:
    try:
        return get_adapter(model)
    except UnsupportedModelError:  # no adapter: fusegpt never width-pruned, sliced or patched it
        return None


def _patch_layout(model: nn.Module) -> dict | None:
    adapter = _adapter_or_none(model)
    return patch_layout(adapter) if adapter is not None else None


def _sliced_layout(model: nn.Module) -> dict | None:
    adapter = _adapter_or_none(model)
    return sliced_layout(adapter) if adapter is not None else None


def _shrunk(lin: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> nn.Linear:
    return nn.Linear(in_features or lin.in_features, out_features or lin.out_features, bias=lin.bias is not None,
                     device=lin.weight.device, dtype=lin.weight.dtype)


def apply_widths(adapter: DecoderAdapter, widths: dict[str, list[int]]) -> None:
    """Replace each layer's projections with (uninitialised) ones of the saved widths."""
    d = adapter.head_dim
    n = adapter.num_layers
    for key, vals in widths.items():
        if key in ("num_attention_heads", "num_key_value_heads", "intermediate_size") and len(vals) != n:
            raise ModelLoadError(f"{WIDTH_KEY}.{key} lists {len(vals)} layers but the config has {n}")
    for i, block in enumerate(adapter.layers):
        h, kv, ffn = (widths["num_attention_heads"][i], widths["num_key_value_heads"][i],
                      widths["intermediate_size"][i])
        r = adapter.linear_roles(block)
        adapter.set_linear(block, "q_proj", _shrunk(r["q_proj"], out_features=h * d))
        adapter.set_linear(block, "k_proj", _shrunk(r["k_proj"], out_features=kv * d))
        adapter.set_linear(block, "v_proj", _shrunk(r["v_proj"], out_features=kv * d))
        adapter.set_linear(block, "o_proj", _shrunk(r["o_proj"], in_features=h * d))
        adapter.set_linear(block, "gate_proj", _shrunk(r["gate_proj"], out_features=ffn))
        adapter.set_linear(block, "up_proj", _shrunk(r["up_proj"], out_features=ffn))
        adapter.set_linear(block, "down_proj", _shrunk(r["down_proj"], in_features=ffn))
        adapter.set_attention_geometry(block, h, kv)


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} holds no .safetensors weights")
    from safetensors import SafetensorError

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"the weights in {f} cannot be read ({e}); the file is truncated or corrupt") from None
    return state


def _build(config, no_init_weights) -> nn.Module:
    """The model class for ``config`` (causal LM, else image-text-to-text for LLaVA), SDPA where the
    family has it, else eager attention."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    last: Exception | None = None
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        for attn in ("sdpa", "eager"):
            try:
                with no_init_weights():
                    return auto.from_config(config, attn_implementation=attn)
            except ValueError as e:  # no such mapping, or no SDPA for this family
                last = e
    raise ModelLoadError(f"cannot build a {config.model_type} model from the saved config: {last}")


def folder_tokenizer(folder: str | Path):
    """The tokenizer saved in a checkpoint folder (None when it holds none), loaded without the weights."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # the tokenizer peeks at config.json and would warn about a width checkpoint's marker model_type
    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(prev)


def load_width_pruned(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Rebuild a width-pruned checkpoint at its per-layer widths: ``(model, tokenizer or None)``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(path)
    raw = read_config_json(folder)
    widths = raw.pop(WIDTH_KEY, None)
    sliced = raw.pop(SLICED_KEY, None)
    patches = raw.pop(PATCH_KEY, None)
    if not widths and not sliced and not patches:
        raise ModelLoadError(f"{folder} is not a width-pruned fusegpt checkpoint (no {WIDTH_KEY} or {SLICED_KEY} in "
                         "config.json)")
    if widths and widths.get("format", FORMAT) > FORMAT:
        raise ModelLoadError(f"{folder} was saved by a newer fusegpt (width format {widths['format']}); upgrade fusegpt")
    raw["model_type"] = (widths or sliced or patches)["model_type"]
    config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    model = _build(config, no_init_weights)
    adapter = get_adapter(model)
    if widths:
        apply_widths(adapter, widths)
    if sliced:
        apply_sliced_layout(adapter, sliced)
    if patches:
        apply_patch_layout(adapter, patches)
    state = _read_state(folder)
    saved_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(f"{folder}: weights do not match the saved widths (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.to(device=device, dtype=dtype or saved_dtype).eval()
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    tokenizer = folder_tokenizer(folder)
    logger.info("loaded width-pruned %s (%s, %d layers%s)", folder, raw["model_type"], adapter.num_layers,
                f", stream sliced to {sliced['embedding']}" if sliced else "")
    return model, tokenizer
