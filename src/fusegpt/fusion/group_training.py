"""Knowledge learning local to a partial group (ALGORITHMS.md §2, steps 2, 4, 5).

The group's input states are cached (out of autograd); the teacher is the group with the
removed block still in it, the student the group without it. Only the group's trainable
factors (and norms) hold gradients and optimizer state.

Losses (``loss`` setting), with H the student and T the teacher output, (batch, seq, hidden):

- ``kl-batch``: the paper's KL(softmax(T, dim=batch) || softmax(H, dim=batch)), summed and
  divided by the batch size. Blind to shifts common to the batch (measured to hurt here).
- ``mse``: mean squared error of the group output.
- ``cosine``: 1 − mean cosine similarity per token.
- ``mse+cosine``: their sum (scale-aware and direction-aware).
- ``kl-logits``: "logit lens": KL between next-token distributions of final norm + LM head
  applied to T and H (the head stays frozen); costly for large vocabularies.

``sink_ratio`` (0 = off): before any loss, a token whose teacher output norm exceeds
``sink_ratio`` × the median token norm of its sequence has H and T scaled alike by
``sink_ratio · median / norm`` (:func:`damp_sinks`), so its error counts relative to its size.
Why: the first token of every window carries the model's massive "attention sink" activation
(norm ~23,000 against a median of ~200 on the embedded model, RESULTS.md §7); a 1% drift of that
one token's norm weighs as much in the MSE as ~40 ordinary tokens' whole error, so training
spends itself on the sink, and groups that contain the blocks writing it jump in their first epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models import DecoderAdapter

logger = logging.getLogger(__name__)

LOSSES = ("kl-batch", "mse", "cosine", "mse+cosine", "kl-logits")


def group_window(p: int, n_layers: int, size: int) -> list[int]:
    """The partial group around block ``p``: ``size`` blocks including it.

    ``size // 2`` blocks before ``p`` and the rest after (4 and 3 for the default 8, as the
    reference code), shifted to stay inside ``[0, n_layers)``; all blocks if fewer than ``size``.
    """
    if not 0 <= p < n_layers:
        raise ValueError(f"block {p} out of range for {n_layers} blocks")
    if size < 1:
        raise ValueError(f"group size must be >= 1, got {size}")
    size = min(size, n_layers)
    start = min(max(0, p - size // 2), n_layers - size)
    return list(range(start, start + size))


def kl_batch_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The paper's loss: KL with softmax over the batch dimension, summed, divided by batch size."""
    return F.kl_div(F.log_softmax(h.float(), dim=0), F.log_softmax(t.float(), dim=0),
                    reduction="sum", log_target=True) / h.shape[0]


def mse_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(h.float(), t.float())


def cosine_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(h.float(), t.float(), dim=-1).mean()


def damp_sinks(h: torch.Tensor, t: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale H and T alike at tokens whose teacher norm exceeds ``ratio`` × their sequence's median
    token norm, down to that bound (``ratio`` <= 0: unchanged). Weights come from T, no gradient."""
    if ratio <= 0:
        return h, t
    with torch.no_grad():
        n = t.float().norm(dim=-1, keepdim=True)
        med = n.median(dim=-2, keepdim=True).values
        w = (ratio * med / n.clamp_min(1e-12)).clamp(max=1.0)
    return h * w, t * w


def make_loss(name: str, adapter: DecoderAdapter | None = None,
              sink_ratio: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function of ``name`` (one of :data:`LOSSES`), with sinks damped (:func:`damp_sinks`)
    when ``sink_ratio`` > 0."""
    fn = _plain_loss(name, adapter)
    if sink_ratio <= 0:
        return fn
    return lambda h, t: fn(*damp_sinks(h, t, sink_ratio))


def _plain_loss(name: str, adapter: DecoderAdapter | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "kl-batch":
        return kl_batch_loss
    if name == "mse":
        return mse_loss
    if name == "cosine":
        return cosine_loss
    if name == "mse+cosine":
        return lambda h, t: mse_loss(h, t) / t.float().pow(2).mean().clamp_min(1e-12) + cosine_loss(h, t)
    if name == "kl-logits":
        if adapter is None:
            raise ValueError("kl-logits needs the adapter (final norm and LM head)")

        def kl_logits(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            lh = F.log_softmax(adapter.logits(h).float(), dim=-1).flatten(0, -2)
            with torch.no_grad():
                lt = F.log_softmax(adapter.logits(t).float(), dim=-1).flatten(0, -2)
            return F.kl_div(lh, lt, reduction="batchmean", log_target=True)

        return kl_logits
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


@dataclass
class TrainSettings:
    """What :func:`train_group` needs (resolved from the method config)."""

    epochs: int
    batch_size: int
    lr_coef: float
    lr_base: float
    loss: str
    seed: int
    max_retries: int = 2
    retry_lr_factor: float = 0.1
    amp_dtype: torch.dtype | None = None  # autocast dtype on CUDA; None = no autocast
    warmup: float = 0.0  # share of the steps with a linear learning-rate warm-up (0 = none)
    clip_grad: float = 0.0  # max gradient norm (0 = no clipping)
    keep_best: bool = False  # restore the epoch with the lowest validation loss (epoch 0 = untrained)
    sink_ratio: float = 0.0  # damp tokens above this × the median norm in the loss (0 = off)


@dataclass
class TrainResult:
    """Per-epoch mean loss of the accepted run, retries, and whether it diverged for good."""

    loss_per_epoch: list[float] = field(default_factory=list)
    val_loss_per_epoch: list[float] = field(default_factory=list)  # [0] = before training
    best_epoch: int | None = None  # the epoch kept (0 = the untrained start) when keep_best
    loss_start: float = float("nan")
    retries: int = 0
    lr_scale: float = 1.0
    diverged: bool = False
    steps: int = 0


@dataclass
class GroupResult:
    """What fusing (or fine-tuning) one partial group did, one per removed block: the record the loop,
    the run state, ``report.json`` (``iterations[i]`` and ``details.groups``) and the report page share.

    Losses are the group loss on the training windows (``loss_start`` before training, ``loss_end``
    after, ``loss_per_epoch``) and on the held-in validation windows (``val_loss_per_epoch[0]`` =
    before training, ``val_end`` = what the group kept). ``fused``: the block went in as fusion terms
    (False for MI+FT and for a group that fell back to plain removal: ``diverged`` or ``reverted``).
    """

    loss_start: float
    loss_per_epoch: list[float] = field(default_factory=list)
    loss_end: float | None = None
    worse: bool | None = None
    retries: int = 0
    lr_scale: float = 1.0
    fused: bool = False
    diverged: bool = False
    reverted: bool = False
    val_start: float | None = None
    val_loss_per_epoch: list[float] | None = None
    best_epoch: int | None = None
    val_end: float | None = None
    linear_fold: list[dict] | None = None
    trial_scores: dict[str, float] | None = None
    group: list[int] = field(default_factory=list)  # original indices, the removed block included
    removed: int | None = None  # original index

    @property
    def fell_back(self) -> bool:
        return self.diverged or self.reverted

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> GroupResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Diverged(RuntimeError):
    """A non-finite loss or gradient during group training."""


def _snapshot(params: Sequence[nn.Parameter], opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    import copy

    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _restore(params: Sequence[nn.Parameter], opt: torch.optim.Optimizer, snap) -> None:
    vals, opt_state = snap
    with torch.no_grad():
        for p, v in zip(params, vals, strict=True):
            p.copy_(v)
    opt.load_state_dict(opt_state)


def run_group(adapter: DecoderAdapter, blocks: Sequence[int], h: torch.Tensor, ctx) -> torch.Tensor:
    """Run the current blocks at ``blocks`` (indices into ``adapter.layers``) on ``h``."""
    for i in blocks:
        h = adapter.run_block(adapter.layers[i], h, ctx, i)
    return h


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine annealing to 0 over the rest.

    With no warm-up this is the reference's cosine over all steps, ``0.5·(1 + cos(π·step/total))``.
    """
    if warmup_steps <= 0:
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(total - warmup_steps, 1)))


def train_group(
    adapter: DecoderAdapter,
    student: Sequence[int],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    coef_params: Sequence[nn.Parameter],
    base_params: Sequence[nn.Parameter],
    settings: TrainSettings,
    desc: str = "group",
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``coef_params`` (lr_coef) and ``base_params`` (lr_base) so that the blocks
    ``student`` map ``inputs`` to ``targets``. Adam (0.9, 0.95), eps 1e-8, no weight decay,
    cosine annealing over epochs × batches, after a linear warm-up over ``settings.warmup`` of the
    steps; gradients clipped to norm ``settings.clip_grad`` when > 0.

    ``val``: held-in (inputs, targets) on which the loss is measured before training and after
    every epoch; with ``settings.keep_best`` the trained values of the best epoch (possibly the
    untrained start) are restored at the end.

    Divergence: every step's loss and gradients are checked *before* the update. A non-finite
    value restores the group (factors and optimizer state) to its state at the start of that
    epoch, multiplies the learning rates by ``retry_lr_factor`` and redoes the epoch; after
    ``max_retries`` such retries the result says ``diverged`` and the caller falls back.
    """
    params = [*coef_params, *base_params]
    groups = []
    if coef_params:
        groups.append({"params": list(coef_params), "lr": settings.lr_coef, "base_lr": settings.lr_coef})
    if base_params:
        groups.append({"params": list(base_params), "lr": settings.lr_base, "base_lr": settings.lr_base})
    result = TrainResult()
    if not groups or settings.epochs <= 0:
        return result
    opt = torch.optim.Adam(groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    device = adapter.device
    amp = settings.amp_dtype is not None and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp and settings.amp_dtype == torch.float16 else None
    autocast = (lambda: torch.autocast("cuda", dtype=settings.amp_dtype)) if amp else nullcontext
    loss_fn = make_loss(settings.loss, adapter, settings.sink_ratio)
    n = inputs.shape[0]
    bs = min(settings.batch_size, n)
    n_batches = math.ceil(n / bs)
    total = settings.epochs * n_batches
    gen = torch.Generator().manual_seed(settings.seed)
    orders = [torch.randperm(n, generator=gen) for _ in range(settings.epochs)]
    ctx = adapter.context(inputs[:bs].to(device))
    ctx_by_bs = {bs: ctx}
    warmup_steps = int(math.ceil(settings.warmup * total)) if settings.warmup > 0 else 0
    best: tuple[float, int, list[torch.Tensor]] | None = None
    if val is not None:
        v0 = eval_loss(adapter, student, val[0], val[1], settings.loss, bs, settings.sink_ratio)
        result.val_loss_per_epoch.append(v0)
        best = (v0, 0, [p.detach().clone() for p in params])
    scale = 1.0
    step = 0
    epoch = 0
    bar = tqdm(total=total, desc=desc, leave=False, unit="step")
    while epoch < settings.epochs:
        snap = _snapshot(params, opt)
        step0 = step
        losses: list[float] = []
        try:
            for b in range(n_batches):
                idx = orders[epoch][b * bs:(b + 1) * bs]
                x = inputs[idx].to(device)
                t = targets[idx].to(device)
                if x.shape[0] not in ctx_by_bs:
                    ctx_by_bs[x.shape[0]] = adapter.context(x)
                factor = scale * lr_factor(step, total, warmup_steps)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
                with autocast():
                    out = run_group(adapter, student, x, ctx_by_bs[x.shape[0]])
                    loss = loss_fn(out.float(), t.float())
                if not torch.isfinite(loss):
                    raise Diverged(f"non-finite loss at step {step}")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if settings.clip_grad > 0:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(params, settings.clip_grad)
                    scaler.step(opt)  # skips steps with inf gradients (fp16 loss scaling)
                    scaler.update()
                else:
                    loss.backward()
                    if not all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
                        raise Diverged(f"non-finite gradient at step {step}")
                    if settings.clip_grad > 0:
                        torch.nn.utils.clip_grad_norm_(params, settings.clip_grad)
                    opt.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
        except Diverged as e:
            _restore(params, opt, snap)
            opt.zero_grad(set_to_none=True)
            bar.update(step0 - step)
            step = step0
            result.retries += 1
            if result.retries > settings.max_retries:
                logger.warning("%s: %s; gave up after %d retries", desc, e, settings.max_retries)
                result.diverged = True
                break
            scale *= settings.retry_lr_factor
            logger.warning("%s: %s; restored epoch %d, retrying with lr x%g", desc, e, epoch, scale)
            continue
        result.loss_per_epoch.append(sum(losses) / max(len(losses), 1))
        epoch += 1
        if val is not None:
            v = eval_loss(adapter, student, val[0], val[1], settings.loss, bs, settings.sink_ratio)
            result.val_loss_per_epoch.append(v)
            if best is not None and v < best[0]:
                best = (v, epoch, [p.detach().clone() for p in params])
            logger.info("%s epoch %d/%d: train loss %.6g, validation %.6g", desc, epoch, settings.epochs,
                        result.loss_per_epoch[-1], v)
        else:
            logger.info("%s epoch %d/%d: loss %.6g", desc, epoch, settings.epochs, result.loss_per_epoch[-1])
    bar.close()
    opt.zero_grad(set_to_none=True)
    if settings.keep_best and best is not None and not result.diverged:
        result.best_epoch = best[1]
        with torch.no_grad():
            for p, kept in zip(params, best[2], strict=True):
                p.copy_(kept)
    result.lr_scale = scale
    result.steps = step
    return result


@torch.no_grad()
def eval_loss(adapter: DecoderAdapter, student: Sequence[int], inputs: torch.Tensor, targets: torch.Tensor,
              loss: str, batch_size: int, sink_ratio: float = 0.0) -> float:
    """Mean loss of the current student over all samples (no gradients), sinks damped as in training."""
    fn = make_loss(loss, adapter, sink_ratio)
    tot, cnt = 0.0, 0
    ctx = None
    for x, t in zip(inputs.split(batch_size), targets.split(batch_size), strict=True):
        x, t = x.to(adapter.device), t.to(adapter.device)
        if ctx is None or ctx.position_ids.shape[-1] != x.shape[1] or x.shape[0] != batch_size:
            ctx = adapter.context(x)
        out = run_group(adapter, student, x, ctx)
        tot += float(fn(out.float(), t.float())) * x.shape[0]
        cnt += x.shape[0]
    return tot / max(cnt, 1)
