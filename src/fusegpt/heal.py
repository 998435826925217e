"""Recovery training ("healing") of a pruned model: from its own next-token loss, or distilled from the
dense teacher it was pruned from.

``loss``:

* ``lm`` — the next-token cross-entropy of the pruned model alone (LLM-Pruner's and SliceGPT's
  recovery; the ``paper`` preset);
* ``kd`` — forward KL from the dense teacher's next-token distribution (Minitron / NVIDIA
  Model-Optimizer's production default: T = 1, LM loss off), :mod:`fusegpt.distill`;
* ``kd+lm`` — ``(1 − lm_weight)·kd + lm_weight·lm``.

``hidden_weight`` adds the intermediate term: the kept blocks' outputs against the teacher's at the
same original blocks (needs the teacher online). The teacher's signal (``teacher_signal``) is either
``online`` (the teacher beside the student) or ``topk`` (its top-``topk`` logits per position computed
once and streamed from disk); ``auto`` = ``topk`` unless the hidden-state term needs the model.

``trainable``: ``lora`` (peft LoRA on every linear layer of the decoder, merged back; the LM head
frozen), ``full`` (every weight of the last ``full_blocks`` blocks and, with ``train_head``, the LM head:
"Reassessing layer pruning" finds this beats LoRA after depth pruning), ``norms`` (the norm weights only),
``patches`` (only LinearPatch matrices: the paper's optional refinement). Either way the output is the
same architecture: a stock checkpoint (depth, fused, uniform width) or a ``load_pruned`` one.

Presets: ``paper`` = LLM-Pruner's recipe scale (LoRA rank 8, lr 1e-4, 2 epochs, LM loss) on 512 × 2048
tokens; ``cpu`` = 64 × 256 tokens, 1 epoch (16 steps; a few minutes for the embedded SmolLM2-135M on 2
cores) at lr 3e-3 with the LM loss, the best perplexity measured there (benchmarks/RESULTS.md §13: at 3e-3
against 1e-3, ReplaceMe 25% healed to 33.84 / 44.35 against 36.37 / 47.27, SLEB 35.94 / 47.55 against
40.05 / 53.24, MI+FT 32.50 / 44.58 against 33.87 / 46.62; 2e-4, the first rate, healed far less). The
loss stays ``lm`` by default because it needs no teacher; where the teacher is at hand ``kd+lm`` matched
LM on the healing text's domain and beat it by 1-1.6% on the other, closer to the teacher, and ``kd``
is the choice when agreement with the dense model matters more than perplexity.
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
from .distill import OnlineTeacher, TopKTeacher, hidden_loss, kd_loss, precompute_topk
from .errors import ConfigError, TrainingDiverged
from .fusion.group_training import lr_factor
from .offload import offloader_of
from .report import HealResult
from .settings import Settings, check, setting
from .utils import PeakMemory

logger = logging.getLogger(__name__)

LOSSES = ("lm", "kd", "kd+lm")
TRAINABLES = ("lora", "full", "norms", "patches")
SIGNALS = ("auto", "online", "topk")


@dataclass
class HealConfig(Settings):
    """Settings of recovery training (unset = the preset's / default value, as for methods)."""

    label: ClassVar[str] = "heal"
    DEFAULTS: ClassVar[dict[str, Any]] = {"source": "wiki", "seed": 0, "lora_alpha": 16, "lora_dropout": 0.0,
                                          "batch_size": 4, "warmup": 0.05, "temperature": 1.0, "lm_weight": 0.5,
                                          "hidden_weight": 0.0, "teacher_signal": "auto", "topk": 64, "kd_tail": "bucket",
                                          "trainable": "lora", "full_blocks": 2, "train_head": True}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"nsamples": 512, "seqlen": 2048, "epochs": 2, "lr": 1e-4, "lora_rank": 8, "loss": "lm"},
        "cpu": {"nsamples": 64, "seqlen": 256, "epochs": 1, "lr": 3e-3, "lora_rank": 8, "loss": "lm"},
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
    loss: str | None = setting("choice", "lm (the pruned model's next-token loss), kd (KL from the dense teacher), "
                               "kd+lm", choices=LOSSES)
    temperature: float | None = setting("float", "distillation temperature T (the loss is T²·KL at T)", low=0.0,
                                        open_low=True)
    lm_weight: float | None = setting("float", "kd+lm: the LM loss's share", low=0.0, high=1.0)
    hidden_weight: float | None = setting("float", "weight of the kept blocks' hidden-state term (0 = off; needs "
                                          "the teacher online)", low=0.0)
    teacher_signal: str | None = setting("choice", "online (teacher beside the student), topk (its top-k logits "
                                         "computed once, from disk), auto (topk unless hidden_weight needs online)",
                                         choices=SIGNALS)
    topk: int | None = setting("int", "teacher logits kept per position with teacher_signal=topk", low=1)
    kd_tail: str | None = setting("choice", "top-k KD: bucket (the rest of the vocabulary as one more outcome: the "
                                  "student is held to the teacher's mass outside the k) or renormalise (over the k "
                                  "alone, LinearPatch's reference)", choices=("bucket", "renormalise"))
    trainable: str | None = setting("choice", "lora (merged back), full (the last full_blocks blocks and the LM "
                                    "head), norms, patches (LinearPatch matrices only)", choices=TRAINABLES)
    full_blocks: int | None = setting("int", "trainable=full: last blocks trained whole", low=0)
    train_head: bool | None = setting("bool", "trainable=full: train the LM head too (tied: the embeddings too)")

    def sources(self) -> list[str]:
        return [self.source]

    def plan_placement(self, offload: bool, device_type: str) -> None:
        """Healing trains the whole model at once: refused layer-wise (before anything is loaded)."""
        check(not offload, "healing trains the whole model and cannot run layer-wise (--offload, or a --max-memory "
                           "budget that needs it); heal on a device the model fits, or drop --heal")

    def check_across(self) -> None:
        super().check_across()
        check(not (self.hidden_weight and self.teacher_signal == "topk"),
              "hidden_weight needs the teacher's hidden states: use teacher_signal=online (or auto)")
        check(not (self.trainable == "full" and self.full_blocks == 0 and self.train_head is False),
              "trainable=full with full_blocks=0 and train_head=False trains nothing")

    @property
    def uses_teacher(self) -> bool:
        return self.loss in ("kd", "kd+lm")

    @property
    def signal(self) -> str:
        """The teacher signal this config resolves to (``online`` or ``topk``)."""
        if self.teacher_signal != "auto":
            return self.teacher_signal
        return "online" if self.hidden_weight else "topk"

    def windows(self) -> list[tuple[str, int, str]]:
        return [(self.source, self.nsamples * self.seqlen, "heal nsamples × seqlen")]

    def teacher_cost(self, vocab: int, teacher_bytes: int) -> str:
        """What the teacher signal costs, in words (for the plan)."""
        if not self.uses_teacher:
            return "no teacher (loss=lm)"
        if self.signal == "online":
            return f"teacher online beside the student: {teacher_bytes / 1e9:.2f} GB of weights, a forward per step"
        disk = self.nsamples * self.seqlen * min(self.topk, vocab) * 6
        return (f"teacher top-{self.topk} logits computed once, {disk / 1e6:.1f} MB on disk; the teacher is freed "
                "before training")


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("healing with LoRA needs peft: pip install 'fusegpt[heal]' (or pip install peft)") from None
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


@torch.no_grad()
def mean_kd(model: nn.Module, windows: torch.Tensor, teacher, batch_size: int, temperature: float,
            tail: str = "bucket") -> float:
    """Mean distillation loss of ``model`` against ``teacher`` over ``windows``."""
    dev = next(p for p in model.parameters() if not p.is_meta).device
    tot = 0.0
    for b, ids in enumerate(windows.split(batch_size)):
        idx = torch.arange(b * batch_size, b * batch_size + ids.shape[0])
        ids = ids.to(dev)
        tot += float(kd_loss(model(ids).logits, teacher.batch(idx, ids), temperature, tail)) * ids.shape[0]
    return tot / windows.shape[0]


def make_teacher(teacher_model: nn.Module, windows: torch.Tensor, cfg: HealConfig):
    """The teacher's signal for ``windows``: the model online, or its top-k logits (computed now)."""
    if cfg.signal == "online":
        return OnlineTeacher(teacher_model, hidden=bool(cfg.hidden_weight))
    return precompute_topk(teacher_model, windows, cfg.topk, cfg.batch_size, temperature=cfg.temperature)


def _trainables(model: nn.Module, cfg: HealConfig) -> list[nn.Parameter]:
    from .models import get_adapter
    from .patching import patches_of

    a = get_adapter(model)
    if cfg.trainable == "norms":
        mods = [m for b in a.layers for m in a.norm_modules(b)] + [a.final_norm]
        return [p for m in mods for p in m.parameters()]
    if cfg.trainable == "patches":
        ps = [p for patch in patches_of(a) for p in patch.parameters()]
        if not ps:
            raise ConfigError("trainable=patches: this model has no LinearPatch (prune with --set linear_patch=true)")
        return ps
    blocks = list(a.layers)[len(a.layers) - cfg.full_blocks:] if cfg.full_blocks else []
    params = [p for b in blocks for p in b.parameters()]
    if cfg.train_head:
        params += list(a.lm_head.parameters())
    return list({id(p): p for p in params}.values())  # a tied head is the embedding: once


def heal(model: nn.Module, tokenizer, config: HealConfig | None = None, teacher_model: nn.Module | None = None,
         teacher=None, teacher_name: str | None = None) -> tuple[nn.Module, HealResult]:
    """Train ``model`` as ``config`` says and return it (the same architecture, plain modules) and a record.

    The teacher (for ``loss=kd`` / ``kd+lm``): ``teacher`` (a prepared signal: an
    :class:`~fusegpt.distill.OnlineTeacher`, or a :class:`~fusegpt.distill.TopKTeacher` of these very
    windows), or ``teacher_model``, from which the signal is made here. ``teacher_name`` goes into the record.
    """
    if offloader_of(model) is not None:
        raise ConfigError("healing trains the whole model and cannot run layer-wise (--offload); load it resident")
    dev = next(p for p in model.parameters() if not p.is_meta).device
    cfg = (config or HealConfig()).resolve(dev.type)
    check_source(cfg.source)
    if cfg.uses_teacher and teacher is None and teacher_model is None:
        raise ConfigError(f"heal loss={cfg.loss} distils from the dense teacher: give --teacher DENSE (or heal a "
                          "folder whose report.json names a model that can be loaded), or use --set loss=lm")
    windows = calibration_windows(tokenizer, cfg.source, cfg.nsamples, cfg.seqlen, cfg.seed)
    with PeakMemory(dev) as mem:
        if cfg.uses_teacher and teacher is None:
            teacher = make_teacher(teacher_model, windows, cfg)
        try:
            model, record = _train(model, windows, cfg, teacher, dev)
        finally:
            if teacher is not None and teacher_model is not None:
                teacher.close()
    record.teacher = teacher_name
    record.peak_memory_mb = round(mem.peak_mb, 1)
    return model, record


def _train(model: nn.Module, windows: torch.Tensor, cfg: HealConfig, teacher, dev) -> tuple[nn.Module, HealResult]:
    from .models import get_adapter

    torch.manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    before = mean_loss(model, windows, cfg.batch_size)
    kd_before = mean_kd(model, windows, teacher, cfg.batch_size, cfg.temperature, cfg.kd_tail) \
        if teacher is not None else None
    flags = {id(q): q.requires_grad for q in model.parameters()}
    pm: Any = model  # the peft wrapper under LoRA
    if cfg.trainable == "lora":
        peft = _peft()
        lcfg = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft asks transformers for a renamed attribute (a FutureWarning per call)
            warnings.simplefilter("ignore", FutureWarning)
            pm = peft.get_peft_model(model, lcfg)
        params = [q for q in pm.parameters() if q.requires_grad]
    else:
        for q in model.parameters():
            q.requires_grad_(False)
        params = _trainables(model, cfg)
        for q in params:
            q.requires_grad_(True)
    origin = get_adapter(model).origin
    n_teacher_layers = None
    if teacher is not None and getattr(teacher, "hidden", False):
        n_teacher_layers = get_adapter(teacher.model).num_layers
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
    bar = tqdm(total=total, desc=f"heal ({cfg.loss}, {cfg.trainable})", unit="step")
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        run = []
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            ids = windows[idx].to(dev)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, total, warm)
            out = pm(ids, output_hidden_states=bool(cfg.hidden_weight), use_cache=False)
            logits = out.logits.float()
            loss = logits.new_zeros(())
            if cfg.loss in ("lm", "kd+lm"):
                lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                loss = loss + (lm if cfg.loss == "lm" else cfg.lm_weight * lm)
            if teacher is not None:
                tb = teacher.batch(idx, ids)
                kd = kd_loss(logits, tb, cfg.temperature, cfg.kd_tail)
                loss = loss + (kd if cfg.loss == "kd" else (1 - cfg.lm_weight) * kd)
                if cfg.hidden_weight and tb.hidden is not None:
                    loss = loss + cfg.hidden_weight * hidden_loss(out.hidden_states, tb.hidden, origin,
                                                                  n_teacher_layers or len(origin))
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
    merged = pm.merge_and_unload() if cfg.trainable == "lora" else model
    merged.eval()
    for q in merged.parameters():
        q.requires_grad_(flags.get(id(q), True))
    if was_training:
        merged.train()
    after = mean_loss(merged, windows, cfg.batch_size)
    kd_after = mean_kd(merged, windows, teacher, cfg.batch_size, cfg.temperature, cfg.kd_tail) \
        if teacher is not None else None
    record = HealResult(settings=cfg.to_dict(), loss_before=before, loss_after=after, loss_per_epoch=losses,
                        steps=step, wall_time_s=round(time.perf_counter() - t0, 1), loss=cfg.loss,
                        trained=cfg.trainable, trainable_params=sum(q.numel() for q in params),
                        teacher_signal=teacher.kind if teacher is not None else None,
                        kd_before=kd_before, kd_after=kd_after)
    logger.info("healed: LM loss %.4f -> %.4f%s in %d steps", before, after,
                f", KD {kd_before:.4f} -> {kd_after:.4f}" if kd_before is not None else "", step)
    return merged, record


__all__ = ["LOSSES", "SIGNALS", "TRAINABLES", "HealConfig", "OnlineTeacher", "TopKTeacher", "heal", "make_teacher",
           "mean_loss"]
