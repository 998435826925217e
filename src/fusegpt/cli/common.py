"""What every command shares: the usage error, --set parsing, the table printer, device flags."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from ..api import Placement
from ..checkpoint import is_width_pruned
from ..errors import FusegptError
from ..loading import load_model, read_config, resolve_model_path

EMBEDDED_ALIASES = ("embedded", "dense", "default")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not already say what the default is, and not for
    unset (None) or off (False) defaults."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        return super()._get_help_string(action)


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` that keeps the description's line breaks (method lists)."""


class UsageError(FusegptError):
    """Bad command-line input found before any long work; printed as one line, exit code 2."""


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def settings_from(pairs: list[str] | None, flag: str = "--set") -> dict:
    """``--set KEY=VALUE`` pairs as a dict (values read as Python literals where they parse); a key
    given twice is refused (which one was meant?)."""
    out: dict = {}
    for p in pairs or []:
        if "=" not in p:
            raise UsageError(f"{flag} expects KEY=VALUE, got {p!r} ({flag} help lists the settings)")
        k, v = p.split("=", 1)
        key = k.strip().replace("-", "_")
        if key in out:
            raise UsageError(f"{flag} {key} given twice ({out[key]!r} and {parse_value(v.strip())!r}); give it once")
        out[key] = parse_value(v.strip())
    return out


def wants_help(pairs: list[str] | None) -> bool:
    """``--set help``: list the settings instead of running."""
    return any(p.strip() in ("help", "?") for p in pairs or [])


def csv(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def check_model(spec: str | None, need_adapter: bool = True) -> str:
    path = resolve_model_path(spec)
    if Path(path).exists() and not is_width_pruned(path):
        read_config(path, need_adapter)
    return path


def _fmt(x) -> str:
    return f"{x:,.3f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def print_table(rows: list[tuple], header: tuple) -> None:
    cells = [tuple(_fmt(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def device_map(spec: str | None):
    if spec is None or spec in ("auto", "balanced", "balanced_low_0", "sequential"):
        return spec
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        return json.loads(p.read_text())
    raise UsageError(f"--device-map {spec!r}: give auto, balanced, sequential or a .json file of module -> device")


def dtype_of(args):
    import torch

    name = getattr(args, "dtype", "auto")
    return None if name == "auto" else getattr(torch, name)


def placement_of(args) -> Placement:
    if args.offload and args.device_map:
        raise UsageError("--offload and --device-map exclude each other: offload runs layer-wise on one device, "
                         "a device map spreads the model over several")
    return Placement(device=args.device, dtype=dtype_of(args), offload=args.offload,
                     offload_folder=args.offload_folder, device_map=device_map(args.device_map),
                     max_memory=getattr(args, "max_memory", None))


def load(args, offload: str | None, need_adapter: bool = True):
    """Load the model as the device flags say (resident, layer-wise, or over several GPUs)."""
    p = placement_of(args)
    return load_model(args.model, dtype=p.dtype, device=p.device, offload=offload,
                      offload_folder=p.offload_folder, device_map=p.device_map, need_adapter=need_adapter)


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local folder, hub id (owner/name) or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights' dtype: auto = float32 on CPU, bfloat16 on CUDA (Hessians, merges and trained "
                        "parameters are float32 whatever this says)")
    p.add_argument("--offload", choices=("cpu", "disk"), default=None,
                   help="layer-wise execution: keep the decoder blocks in host memory (cpu) or on disk and bring each "
                        "onto --device only while it is used (models larger than device memory)")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="where --offload disk keeps edited blocks (default: a temporary folder, removed at exit)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread the model over several GPUs with accelerate: auto, balanced, sequential, or a JSON "
                        "file mapping module names to devices")


EVAL_DEFAULTS = {"data": ("wiki", "news"), "seqlen": 512, "max_tokens": 32768}


def add_before_after_eval_args(p: argparse.ArgumentParser) -> None:
    """Perplexity before and after the command's work (prune, heal)."""
    p.add_argument("--eval-data", nargs="+", default=None, help="perplexity sources before/after (default wiki news)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window length (default 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on evaluation tokens per source (default 32768)")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity")
    p.add_argument("--fidelity", action="store_true",
                   help="also measure fidelity to the dense teacher on the same text: KL, top-1 agreement, and how "
                        "many greedy tokens match before the first difference (keeps a copy of the dense model)")


def eval_config_of(args, base=None):
    """The evaluation the flags ask for; unset flags take ``base``'s values (a recipe's), then the defaults."""
    from ..settings import EvalConfig

    if args.no_eval:
        return None
    d = dict(EVAL_DEFAULTS) if base is None else {"data": base.data, "seqlen": base.seqlen,
                                                    "max_tokens": base.max_tokens}
    for key, flag in (("data", "eval_data"), ("seqlen", "eval_seqlen"), ("max_tokens", "max_tokens")):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    return EvalConfig(data=tuple(d["data"]), seqlen=d["seqlen"], max_tokens=d["max_tokens"],
                      fidelity=bool(getattr(args, "fidelity", False)) or bool(base is not None and base.fidelity))


def add_settings_args(p: argparse.ArgumentParser, set_help: str) -> None:
    """The settings every method has (preset, calibration, seed) as flags, and ``--set`` for the rest."""
    from ..settings import PRESETS

    p.add_argument("--preset", default=None, choices=PRESETS,
                   help="settings preset for every method (default: paper on CUDA, cpu otherwise)")
    p.add_argument("--calib", default=None, help="calibration source (default: the method's: wiki, news for slimgpt)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: the preset's)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="seed for calibration sampling and training (default 0)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)


def merged_settings(args) -> dict:
    """The flags' settings and ``--set``'s, refusing the same setting given twice."""
    flags = dict(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, calib_source=args.calib,
                 preset=args.preset)
    extra = settings_from(args.set)
    if "sparsity" in extra:
        raise UsageError("give the sparsity with --sparsity, not --set sparsity=...")
    twice = sorted(k for k, v in flags.items() if v is not None and k in extra)
    if twice:
        raise UsageError(f"{', '.join(twice)} given both as a flag and with --set; give it once")
    return {**flags, **extra}
