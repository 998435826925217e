"""Recovery fine-tuning ("healing") of a pruned model: LoRA on the next-token loss, merged back.

What LLM-Pruner and SliceGPT users do after pruning, for every method here: peft LoRA adapters
on every linear layer of the decoder (``target_modules="all-linear"``: the LM head stays frozen),
trained on seeded windows of a text source with AdamW, then merged into the weights
(``merge_and_unload``), so the output is again a stock checkpoint (depth, fused) or a
``load_pruned`` one (width). Needs the ``heal`` extra (``peft``).

Presets: ``paper`` = LLM-Pruner's recipe scale (rank 8, lr 1e-4, 2 epochs) on 512 × 2048 tokens;
``cpu`` = rank 8, lr 2e-4, 1 epoch on 64 × 256 tokens (a few minutes for the embedded
SmolLM2-135M on 2 cores).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import calibration_windows, check_source
from .errors import ConfigError, TrainingDiverged
from .fusion.group_training import lr_factor
from .offload import offloader_of
from .report import HealResult
from .settings import Settings, check, setting

logger = logging.getLogger(__name__)


@dataclass
class HealConfig(Settings):
    """Settings of recovery fine-tuning (unset = the preset's / default value, as for methods)."""

    label: ClassVar[str] = "heal"
    DEFAULTS: ClassVar[dict[str, Any]] = {"source": "wiki", "seed": 0, "lora_alpha": 16, "lora_dropout": 0.0,
                                          "batch_size": 4, "warmup": 0.05}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"nsamples": 512, "seqlen": 2048, "epochs": 2, "lr": 1e-4, "lora_rank": 8},
        "cpu": {"nsamples": 64, "seqlen": 256, "epochs": 1, "lr": 2e-4, "lora_rank": 8},
    }

    source: str | None = setting("str", "healing text: wiki, news, wikitext2, c4, ptb or a .txt/.jsonl file")
    nsamples: int | None = setting("int", "healing windows", low=1)
    seqlen: int | None = setting("int", "tokens per healing window", low=2)
    seed: int | None = setting("int", "seed of the windows, their order and the adapters' initialisation", low=0)
    epochs: int | None = setting("int", "passes over the healing windows", low=1)
    batch_size: int | None = setting("int", "windows per step", low=1)
    lr: float | None = setting("float", "AdamW learning rate", low=0.0, open_low=True)
    lora_rank: int | None = setting("int", "LoRA rank", low=1)
    lora_alpha: int | None = setting("int", "LoRA alpha", low=1)
    lora_dropout: float | None = setting("float", "LoRA dropout", low=0.0, high=1.0)
    warmup: float | None = setting("float", "share of the steps with a linear learning-rate warm-up", low=0.0,
                                   high=1.0)

    def sources(self) -> list[str]:
        return [self.source]

    def plan_placement(self, offload: bool, device_type: str) -> None:
        """Healing trains the whole model at once: refused layer-wise (before anything is loaded)."""
        check(not offload, "healing trains the whole model and cannot run layer-wise (--offload, or a --max-memory "
                           "budget that needs it); heal on a device the model fits, or drop --heal")

    def windows(self) -> list[tuple[str, int, str]]:
        return [(self.source, self.nsamples * self.seqlen, "heal nsamples × seqlen")]


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("healing needs peft: pip install 'fusegpt[heal]' (or pip install peft)") from None
    return peft


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy of ``model`` over ``windows``."""
    dev = next(p for p in model.parameters() if not p.is_meta).device
    tot, n = 0.0, 0
    for ids in windows.split(batch_size):
        ids = ids.to(dev)
        logits = model(ids).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        tot += float(loss)
        n += ids[:, 1:].numel()
    return tot / max(n, 1)


def heal(model: nn.Module, tokenizer, config: HealConfig | None = None) -> tuple[nn.Module, HealResult]:
    """Fine-tune ``model`` with LoRA on the next-token loss and merge the adapters back.

    Returns the merged model (the same architecture, plain linear layers) and a record: the
    resolved settings with their origins, the training loss before and after on the healing
    windows, the loss per epoch, steps and wall time.
    """
    peft = _peft()
    if offloader_of(model) is not None:
        raise ConfigError("healing trains the whole model and cannot run layer-wise (--offload); load it resident")
    dev = next(p for p in model.parameters() if not p.is_meta).device
    cfg = (config or HealConfig()).resolve(dev.type)
    check_source(cfg.source)
    windows = calibration_windows(tokenizer, cfg.source, cfg.nsamples, cfg.seqlen, cfg.seed)
    torch.manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    before = mean_loss(model, windows, cfg.batch_size)
    lcfg = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    flags = {id(q): q.requires_grad for q in model.parameters()}
    with warnings.catch_warnings():  # peft asks transformers for a renamed attribute (a FutureWarning per call)
        warnings.simplefilter("ignore", FutureWarning)
        pm = peft.get_peft_model(model, lcfg)
    params = [q for q in pm.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = windows.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = int(math.ceil(cfg.warmup * total))
    pm.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    bar = tqdm(total=total, desc="heal", unit="step")
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        run = []
        for b in range(steps_per_epoch):
            ids = windows[order[b * cfg.batch_size:(b + 1) * cfg.batch_size]].to(dev)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, total, warm)
            logits = pm(ids).logits.float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"healing diverged at step {step} (non-finite loss); lower lr (--set lr=...)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            run.append(float(loss.detach()))
            step += 1
            bar.update(1)
        losses.append(sum(run) / max(len(run), 1))
        logger.info("heal epoch %d/%d: loss %.4f", len(losses), cfg.epochs, losses[-1])
    bar.close()
    merged = pm.merge_and_unload()
    merged.eval()
    for q in merged.parameters():
        q.requires_grad_(flags.get(id(q), True))
    if was_training:
        merged.train()
    after = mean_loss(merged, windows, cfg.batch_size)
    record = HealResult(settings=cfg.to_dict(), loss_before=before, loss_after=after, loss_per_epoch=losses,
                        steps=step, wall_time_s=round(time.perf_counter() - t0, 1))
    logger.info("healed: training loss %.4f -> %.4f in %d steps", before, after, step)
    return merged, record
