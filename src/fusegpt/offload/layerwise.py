"""Layer-wise models: attach a block store to a loaded model, load a checkpoint lazily block by
block, and save one block by block as a sharded safetensors checkpoint.

The embeddings, final norm and LM head stay on the compute device; the blocks live in a
:class:`~fusegpt.offload.store.BlockOffloader`. So the peak memory of a run is the non-block
weights, the blocks in use at once (one for scoring, perplexity and OBS; a FuseGPT group), and the
activations, instead of the whole model. Blocks of a checkpoint on disk are read lazily from its
own safetensors files (:func:`load_offloaded`), so a model bigger than memory never has to be
materialised.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..models import adapter_class, get_adapter
from .store import BlockOffloader, _assign, _tensors, offloader_of, set_offloader

logger = logging.getLogger(__name__)


def attach(model: nn.Module, device: str | torch.device = "cpu", storage: str = "disk",
           folder: str | Path | None = None) -> BlockOffloader:
    """Offload every decoder block of a loaded ``model``; the rest goes to ``device``."""
    if offloader_of(model) is not None:
        raise ValueError("this model is already offloaded")
    adapter = get_adapter(model)
    off = BlockOffloader(device, storage, folder)
    for block in adapter.layers:
        off.offload(block, write=True)
    moved: dict[int, torch.Tensor] = {}  # tied tensors stay tied
    for name, t in _tensors(model).items():  # non-block weights (blocks are on meta and stay there)
        if not t.is_meta and t.device != off.device:
            if id(t) not in moved:
                moved[id(t)] = t.detach().to(off.device)
            _assign(model, name, moved[id(t)])
    set_offloader(model, off)
    logger.info("offloaded %d blocks to %s (compute on %s)", adapter.num_layers, storage, off.device)
    return off


def _checkpoint_index(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a (sharded or single-file) checkpoint folder."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in wm.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors(.index.json); layer-wise loading needs safetensors")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt", device="cpu") as f:
        return {k: single for k in f.keys()}


def load_offloaded(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   storage: str = "disk", folder: str | Path | None = None) -> nn.Module:
    """Build the model of the checkpoint folder ``path`` without materialising its blocks.

    The non-block weights are read to ``device``; each block is read from the checkpoint's own
    safetensors files the first time it is used (and from the store after it is edited).
    """
    try:
        from accelerate import init_empty_weights
    except ImportError as e:  # pragma: no cover - accelerate ships with the hub extra
        raise ImportError("layer-wise loading needs accelerate: pip install 'fusegpt[hub]'") from e
    import transformers
    from safetensors import safe_open


    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    cls = adapter_class(config.model_type)
    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    auto = getattr(transformers, cls.auto_class)
    config._attn_implementation = cls.attn_implementation
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are built as stock does
        model = auto.from_config(config, attn_implementation=cls.attn_implementation, dtype=dtype)
    adapter = get_adapter(model)
    files = _checkpoint_index(path)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    prefixes = adapter.block_prefixes()
    off = BlockOffloader(device, storage, folder)
    off._source_dtype = dtype
    rest = {key: file for key, file in files.items() if not key.startswith(tuple(prefixes))}
    for block, pre in zip(adapter.layers, prefixes, strict=True):
        src = {k[len(pre):]: (f, k) for k, f in files.items() if k.startswith(pre)}
        if not src:
            raise KeyError(f"checkpoint {path} has no tensors for {pre.rstrip('.')}")
        off._sources[off.uid(block)] = src
    by_file: dict[Path, list[str]] = {}
    for k, f in rest.items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for k in keys:
                if k not in names:
                    logger.debug("checkpoint tensor %s is not in the model; ignored", k)
                    continue
                t = sf.get_tensor(k)
                _assign(model, k, (t.to(dtype) if t.is_floating_point() else t).to(device))
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(tuple(prefixes))]
    if still:
        raise KeyError(f"checkpoint {path} lacks {still[:3]}")
    set_offloader(model, off)
    model.eval()
    logger.info("loaded %s layer-wise: %d blocks stay on %s until used", path, adapter.num_layers, storage)
    return model


def save_offloaded(model: nn.Module, out: Path, max_shard_blocks: int = 1) -> None:
    """Write ``model``'s weights as a sharded safetensors checkpoint, one block at a time.

    Same tensor names as ``save_pretrained`` (tied weights written once), plus the config and
    generation config, so stock ``from_pretrained`` loads the folder.
    """
    from safetensors.torch import save_file

    off = offloader_of(model)
    adapter = get_adapter(model)
    prefixes = adapter.block_prefixes()
    weight_map: dict[str, str] = {}
    total = 0
    n_shards = adapter.num_layers + 1
    written: set[int] = set()

    def shard(i: int) -> str:
        return f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"

    for i, (block, pre) in enumerate(zip(adapter.layers, prefixes, strict=True)):
        with off.use([block]):
            flat = {pre + n: t.detach().to("cpu").contiguous() for n, t in block.state_dict().items()}
            save_file(flat, str(out / shard(i)), metadata={"format": "pt"})
        for k, t in flat.items():
            weight_map[k] = shard(i)
            total += t.numel() * t.element_size()
    rest = {}
    block_keys = tuple(prefixes)
    for k, t in model.state_dict(keep_vars=True).items():
        if k.startswith(block_keys) or t.is_meta:
            continue
        if t.data_ptr() in written:  # tied (lm_head = embed_tokens): written once, like save_pretrained
            continue
        written.add(t.data_ptr())
        rest[k] = t.detach().to("cpu").contiguous()
        total += rest[k].numel() * rest[k].element_size()
        weight_map[k] = shard(n_shards - 1)
    save_file(rest, str(out / shard(n_shards - 1)), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    model.config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
