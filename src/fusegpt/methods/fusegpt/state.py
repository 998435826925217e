"""Per-block run state of FuseGPT / MI+FT, for ``--resume`` after an interruption.

After each removed block the state folder (``<output>.state/<step>-<method>/``, :mod:`fusegpt.runstate`)
holds ``state.json`` (settings, blocks kept, the structure of every fused layer, the report so
far) and ``model.pt`` (the model's state dict, fused terms included; tensors shared between
layers stay shared). A layer-wise (offloaded) run writes the non-block weights to ``model.pt``
and each block to ``blocks/<i>.pt`` instead. It is written atomically, so a kill leaves the
previous state intact.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from ...checkpoint.atomic import atomic_write_dir
from ...errors import RunStateError
from ...fusion import FusedLinear, FusionTerm, fused_roles
from ...models import DecoderAdapter
from ...report import StepReport

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def fused_spec(adapter: DecoderAdapter) -> dict[str, dict[str, dict]]:
    """``{block index: {role: FusedLinear.spec()}}`` for every fused layer of the current model."""
    out: dict[str, dict[str, dict]] = {}
    for i, block in enumerate(adapter.layers):
        roles = {r: m.spec() for r, m in fused_roles(adapter.linear_roles(block)).items()}
        if roles:
            out[str(i)] = roles
    return out


def save_state(path: str | Path, adapter: DecoderAdapter, step: StepReport, done: int, settings: dict[str, Any],
               elapsed_s: float = 0.0) -> None:
    """Write the state after ``done`` iterations (atomic replace of ``path``); ``elapsed_s``: the
    step's wall time so far (earlier runs included), so a resumed run reports its whole time."""
    payload = {
        "version": STATE_VERSION,
        "done": done,
        "elapsed_s": round(elapsed_s, 3),
        "settings": settings,
        "origin": adapter.origin,
        "spec": fused_spec(adapter),
        "removed": step.removed,
        "iterations": step.iterations,
        "details": step.details,
    }

    def write(tmp: Path) -> None:
        if adapter.offloader is None:
            torch.save(adapter.model.state_dict(), tmp / "model.pt")
        else:  # layer-wise: the non-block weights, then one file per block, each brought in once
            torch.save({k: v for k, v in adapter.model.state_dict().items() if not v.is_meta}, tmp / "model.pt")
            (tmp / "blocks").mkdir()
            for i, block in enumerate(adapter.layers):
                with adapter.using([i]):
                    torch.save(block.state_dict(), tmp / "blocks" / f"{i}.pt")
        (tmp / "state.json").write_text(json.dumps(payload, indent=1) + "\n")

    atomic_write_dir(path, write, overwrite=True, kind="run state")
    logger.info("saved run state after %d block(s) to %s", done, path)


def _restore_fused(adapter: DecoderAdapter, block, roles: dict[str, dict], sd: dict[str, torch.Tensor]) -> None:
    """Give ``block`` the fused layers of ``roles`` (their specs), with the terms' frozen weights from
    ``sd`` (the block's own state dict); the trainable values are loaded afterwards."""
    names = {id(m): n for n, m in block.named_modules()}
    for role, spec in roles.items():
        lin = adapter.linear_roles(block)[role]
        name = names[id(lin)]
        fl = FusedLinear.from_linear(lin, spec["lora_rank"])
        adapter.set_linear(block, role, fl)
        for m, rank in enumerate(spec["terms"]):
            key = f"{name}.terms.{m}."
            fl.terms.append(FusionTerm(sd[key + "fused_weight"], rank, sd.get(key + "fused_bias"), init=False))


def has_state(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / "state.json").is_file() and (Path(path) / "model.pt").is_file()


def _load_tensors(path: Path, device) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:  # torch.load's ways of failing
        raise RunStateError(f"the run state file {path} cannot be read ({str(e).splitlines()[0][:120]}): it is "
                            "truncated or corrupt; start again with --restart (fusegpt never loads such a file with "
                            "weights_only=False)") from None


def load_state(path: str | Path, adapter: DecoderAdapter, step: StepReport, settings: dict[str, Any]
               ) -> tuple[int, float]:
    """Bring the (freshly loaded, unpruned) model to the saved state; returns the iterations done and the
    wall time they took.

    Refuses a state made with other settings (the result would not match an uninterrupted run).
    """
    path = Path(path)
    try:
        payload = json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunStateError(f"{path / 'state.json'} is not valid JSON ({e}); start again with --restart") from None
    if payload.get("version") != STATE_VERSION:
        raise RunStateError(f"run state in {path} has version {payload.get('version')}; start again with --restart")
    saved = payload["settings"]
    diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if diff:
        raise RunStateError(f"run state in {path} was made with other settings ({', '.join(diff)}); "
                            "give the same settings to continue it, or --restart to start again")
    origin = adapter.origin
    if origin != list(range(adapter.num_layers)) and origin != payload["origin"]:
        raise RunStateError("--resume needs the original (unpruned) model as input")
    keep = [origin.index(o) for o in payload["origin"]]
    adapter.keep_layers(keep)
    sd = _load_tensors(path / "model.pt", adapter.device)
    spec = payload["spec"]
    if adapter.offloader is None:
        for i, (block, pre) in enumerate(zip(adapter.layers, adapter.block_prefixes(), strict=True)):
            _restore_fused(adapter, block, spec.get(str(i), {}), {k[len(pre):]: v for k, v in sd.items()
                                                                  if k.startswith(pre)})
        missing, unexpected = adapter.model.load_state_dict(sd, strict=False)
    else:
        missing, unexpected = adapter.model.load_state_dict(sd, strict=False)
        block_keys = tuple(adapter.block_prefixes())
        missing = [k for k in missing if not k.startswith(block_keys)]
        for i, block in enumerate(adapter.layers):
            sd_b = _load_tensors(path / "blocks" / f"{i}.pt", adapter.device)
            with adapter.using([i], write=True):
                _restore_fused(adapter, block, spec.get(str(i), {}), sd_b)
                m_b, u_b = block.load_state_dict(sd_b, strict=False)
            missing += m_b
            unexpected += u_b
    if missing or unexpected:
        raise RunStateError(f"run state in {path} does not match the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); start again with --restart")
    step.removed = list(payload["removed"])
    step.iterations = list(payload["iterations"])
    step.details = dict(payload["details"])
    logger.info("resumed from %s after %d block(s)", path, payload["done"])
    return int(payload["done"]), float(payload.get("elapsed_s", 0.0))
