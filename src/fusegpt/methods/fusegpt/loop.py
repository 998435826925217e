"""FuseGPT: learnable layers fusion (ALGORITHMS.md §2), and its MI+FT ablation.

Per iteration, until ceil(L·s) blocks are gone:

1. rank blocks by MI on the current (already fused) model; p = the lowest;
2. partial group of ``group_size`` blocks around p (:func:`group_window`);
3. fusion: every linear layer of every other group block becomes a :class:`FusedLinear` with a
   new ``(C D) ⊙ W_p`` term (p materialised first if it was fused itself);
4. knowledge learning local to the group (:func:`train_group`): inputs are the current model's
   states entering the group on the fine-tuning set, the teacher is the group with p;
5. drop p. At the end every fused layer is merged into a plain ``nn.Linear`` (fp32, cast back),
   so the checkpoint is an ordinary one that stock ``transformers`` loads.

MI+FT (``mi+ft``, :mod:`fusegpt.methods.mi_ft`) runs the same loop without step 3: LoRA and
norms of the group are trained.

Deviations from the paper, all settings (see ``GROUP_TRAIN_PRESETS`` in
:mod:`fusegpt.methods.fusegpt.config`):
the ``cpu`` preset uses the MSE loss (the paper's batch-softmax KL measured worse than no
training here), LoRA at the coefficients' learning rate, and smaller ranks, sets and epochs.
Older fused terms are merged into the frozen weight after training (not before), so a failed
training can restore the group exactly.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ...blocks import remove_blocks, scores_by_origin
from ...data import calibration_windows, heldout_windows
from ...fusion import (
    FusedLinear,
    GroupResult,
    TrainSettings,
    eval_loss,
    frozen_weight,
    fused_roles,
    group_window,
    run_group,
    train_group,
)
from ...importance import candidate_blocks, lowest, mi_scores
from ...models import DecoderAdapter
from ...report import StepReport
from ...runstate import RunContext
from ..block_scoring import fold_before_removal, fold_windows
from .config import GroupTrainConfig
from .state import has_state, load_state, save_state

logger = logging.getLogger(__name__)

__all__ = ["merge_model", "run_group_pruning"]


def _amp_dtype(adapter: DecoderAdapter, setting: str) -> torch.dtype | None:
    """Autocast dtype for training on CUDA (None on CPU, the tested path)."""
    if adapter.device.type != "cuda" or setting == "fp32":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    return adapter.dtype if adapter.dtype in (torch.bfloat16, torch.float16) else None


def _states_entering(adapter: DecoderAdapter, ids: torch.Tensor, start: int, batch_size: int) -> torch.Tensor:
    """Hidden states entering block ``start`` of the current model, for all of ``ids`` (no grad)."""
    return _states_at(adapter, ids, {start}, batch_size)[start]


@torch.no_grad()
def _states_at(adapter: DecoderAdapter, ids: torch.Tensor, indices: set[int], batch_size: int) -> dict[int, torch.Tensor]:
    """States entering blocks ``indices`` (``num_layers`` = the last block's output) for all of
    ``ids``, in one block-outer pass that stops at the deepest index (no grad)."""
    chunks = [adapter.embed(c.to(adapter.device)) for c in ids.split(batch_size)]
    ctxs = adapter.contexts(chunks)
    out = {}
    for i in range(max(indices) + 1):
        if i in indices:
            out[i] = torch.cat([h.to(adapter.device) for h in chunks])
        if i < max(indices):
            chunks = adapter.run_layerwise(chunks, ctxs, i, i + 1)
    return out


@torch.no_grad()
def _group_outputs(adapter: DecoderAdapter, blocks: list[int], inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = []
    ctx = None
    for x in inputs.split(batch_size):
        if ctx is None or x.shape[0] != batch_size:
            ctx = adapter.context(x)
        outs.append(run_group(adapter, blocks, x, ctx))
    return torch.cat(outs)


def merge_model(adapter: DecoderAdapter) -> int:
    """Merge every fused layer into a plain ``nn.Linear`` (fp32, cast back); returns the count."""
    n = 0
    for i, block in enumerate(adapter.layers):
        fused = fused_roles(adapter.linear_roles(block))
        if not fused:
            continue
        with adapter.using([i], write=True):
            for role, mod in fused.items():
                adapter.set_linear(block, role, mod.to_linear())
                n += 1
    return n


def _fuse_group(adapter: DecoderAdapter, p: int, student: list[int], cfg: GroupTrainConfig, fuse: bool) -> list[FusedLinear]:
    """Wrap the student blocks' linears (LoRA) and, with ``fuse``, add p's weights as new terms."""
    p_roles = adapter.linear_roles(adapter.layers[p]) if fuse else {}
    p_weights = {role: frozen_weight(m) for role, m in p_roles.items()}  # shared by the whole group
    out = []
    for j in student:
        block = adapter.layers[j]
        for role, lin in adapter.linear_roles(block).items():
            if cfg.lora_restart and isinstance(lin, FusedLinear):
                lin.restart_lora()
            fl = FusedLinear.from_linear(lin, cfg.lora_rank)
            if fuse:
                w, b = p_weights[role]
                dev = fl.weight.device  # p may sit on another GPU under a device map
                fl.add_term(w.to(dev), None if b is None else b.to(dev), rank=cfg.fusion()[0])
            if fl is not lin:
                adapter.set_linear(block, role, fl)
            out.append(fl)
    return out


def _fuse_and_train(adapter: DecoderAdapter, p: int, group: list[int], ft: torch.Tensor, fuse: bool, it: int,
                    seed: int, cfg: GroupTrainConfig, val: torch.Tensor | None = None,
                    fold: Callable[[], list] | None = None) -> GroupResult:
    """Steps 3–4 for block ``p`` (current index) and its ``group``; p is not removed here.

    ``val``: held-in validation windows (see :class:`GroupTrainConfig`). On an offloaded model the
    group's blocks stay on the device for the whole step and are written back to the store afterwards.
    """
    with adapter.using(group, write=True):
        return _fuse_and_train_resident(adapter, p, group, ft, fuse, it, seed, cfg, val, fold=fold)


def _fuse_and_train_resident(adapter: DecoderAdapter, p: int, group: list[int], ft: torch.Tensor | None, fuse: bool,
                             it: int, seed: int, cfg: GroupTrainConfig, val: torch.Tensor | None = None,
                             cached: tuple[torch.Tensor, torch.Tensor] | None = None,
                             fold: Callable[[], list] | None = None) -> GroupResult:
    """``cached``: the group's (inputs, teacher outputs) on the training windows, when already known.
    ``fold``: ``linear_fold``'s fit-and-fold of p's map into its predecessor, run once the teacher
    outputs are taken (the teacher is the model with p, before the fold) and before training."""
    bs = cfg.batch_size
    student = [j for j in group if j != p]
    if cached is not None:
        inputs, targets = cached
    else:
        inputs = _states_entering(adapter, ft, group[0], bs)
        targets = _group_outputs(adapter, group, inputs, bs)
    val_pair = None
    if val is not None:
        v_in = _states_entering(adapter, val, group[0], bs)
        val_pair = (v_in, _group_outputs(adapter, group, v_in, bs))
    folds = fold() if fold is not None else []
    # what a fallback restores: the modules per role, the number of terms, every trainable value
    before = {(j, role): (m, len(m.terms) if isinstance(m, FusedLinear) else 0)
              for j in student for role, m in adapter.linear_roles(adapter.layers[j]).items()}
    torch.manual_seed(seed * 100003 + it)  # initial A, D: identical on resume
    fused = _fuse_group(adapter, p, student, cfg, fuse)
    lora = [q for fl in fused for q in fl.trainable()[0]]
    coef = [q for fl in fused for q in fl.trainable()[1]]
    norms = [q for j in student for m in adapter.norm_modules(adapter.layers[j]) for q in m.parameters()] \
        if cfg.train_norms else []
    snapshot = [q.detach().clone() for q in (*lora, *coef, *norms)]
    amp = _amp_dtype(adapter, cfg.amp_dtype)
    norm_dtypes = [q.dtype for q in norms]
    if amp is not None:  # fp32 master weights for trained norms
        for q in norms:
            q.data = q.data.float()
    settings = TrainSettings(
        epochs=cfg.epochs, batch_size=bs, lr_coef=cfg.rates()[0] if fuse else 0.0,
        lr_base=cfg.rates()[1], loss=cfg.loss, seed=seed * 1009 + it,
        max_retries=cfg.max_retries, retry_lr_factor=cfg.retry_lr_factor, amp_dtype=amp,
        warmup=cfg.warmup, clip_grad=cfg.clip_grad, keep_best=cfg.keep_best, sink_ratio=cfg.sink_ratio,
    )
    info = GroupResult(loss_start=eval_loss(adapter, student, inputs, targets, cfg.loss, bs, cfg.sink_ratio),
                       linear_fold=folds or None)
    for q in (*lora, *coef, *norms):
        q.requires_grad_(True)
    try:
        res = train_group(adapter, student, inputs, targets, coef if fuse else [], [*lora, *norms], settings,
                          desc=f"{'fuse' if fuse else 'ft'} {it + 1}", val=val_pair)
    finally:
        for q in (*lora, *coef, *norms):
            q.requires_grad_(False)
            q.grad = None
        for q, dt in zip(norms, norm_dtypes, strict=True):
            q.data = q.data.to(dt)
    failed = res.diverged
    if not res.diverged:
        info.loss_end = eval_loss(adapter, student, inputs, targets, cfg.loss, bs, cfg.sink_ratio)
        info.worse = info.loss_end >= info.loss_start
        failed = bool(cfg.revert_if_worse and info.worse)
    info.loss_per_epoch, info.retries, info.lr_scale = res.loss_per_epoch, res.retries, res.lr_scale
    info.fused, info.diverged, info.reverted = fuse and not failed, res.diverged, failed and not res.diverged
    if val_pair is not None:
        info.val_loss_per_epoch, info.best_epoch = res.val_loss_per_epoch, res.best_epoch
        info.val_start = res.val_loss_per_epoch[0] if res.val_loss_per_epoch else None
    if failed:
        with torch.no_grad():
            for q, v in zip((*lora, *coef, *norms), snapshot, strict=True):
                q.data = v.to(q.dtype)
        for (j, role), (mod, n_terms) in before.items():
            if isinstance(mod, FusedLinear):
                mod.terms = nn.ModuleList(list(mod.terms)[:n_terms])
            adapter.set_linear(adapter.layers[j], role, mod)
        why = "diverged" if res.diverged else f"did not lower the loss ({info.loss_start:.4g} -> {info.loss_end:.4g})"
        logger.warning("training %s for block %d; kept the plain removal for it", why, adapter.origin[p])
    elif fuse and cfg.fusion()[1]:
        for fl in fused:
            fl.merge_oldest(cfg.fusion()[1])
    if val_pair is not None:
        info.val_end = eval_loss(adapter, student, val_pair[0], val_pair[1], cfg.loss, bs, cfg.sink_ratio)
    return info




@torch.no_grad()
def _final_distance(adapter: DecoderAdapter, student: list[int], after: int, h_in: torch.Tensor, ref: torch.Tensor,
                    batch_size: int) -> float:
    """1 − mean cos between the last hidden state of (student blocks, then blocks ``after``…) and ``ref``."""
    tot, n = 0.0, 0
    for x, r in zip(h_in.split(batch_size), ref.split(batch_size), strict=True):
        ctx = adapter.context(x)
        h = run_group(adapter, student, x, ctx)
        h = adapter.run_blocks(h, after, adapter.num_layers, ctx)
        cos = torch.nn.functional.cosine_similarity(h.float(), r.float(), dim=-1)
        tot += float(cos.sum())
        n += cos.numel()
    return 1.0 - tot / max(n, 1)


def fuse_trial(adapter: DecoderAdapter, scores: torch.Tensor, calib: torch.Tensor, ft: torch.Tensor, fuse: bool,
               it: int, seed: int, cfg: GroupTrainConfig) -> tuple[int, dict[str, float]]:
    """Selection by trial fusion (the reference's ``--fuse-eval``): returns the block to remove and
    every candidate's trial score by original index.

    Each of the ``trial_candidates`` lowest-MI blocks is fused into its group and trained for
    ``trial_epochs`` (ranks ``trial_rank``), then scored by how far the model's last hidden state on
    the ranking windows moves (1 − cos, as MI); the group is put back before the next candidate.
    The states entering and leaving every candidate group are computed once per iteration for
    all candidates (one pass over the training windows and one over the ranking windows).
    """
    n = adapter.num_layers
    k = min(cfg.trial_candidates, int((~torch.isnan(scores)).sum()))
    cands = lowest(scores, k)
    groups = {c: group_window(c, n, cfg.group_size) for c in cands}
    bs = cfg.batch_size
    ft_states = _states_at(adapter, ft, {g[0] for g in groups.values()} | {g[-1] + 1 for g in groups.values()}, bs)
    cal_states = _states_at(adapter, calib, {g[0] for g in groups.values()} | {n}, cfg.mi_batch_size)
    trial_cfg = cfg.adjusted("fuse-trial", epochs=cfg.trial_epochs, lora_rank=cfg.trial_rank, val_nsamples=0,
                             keep_best=False, revert_if_worse=False, **({"coef_rank": cfg.trial_rank} if fuse else {}))
    origin = adapter.origin
    out: dict[str, float] = {}
    for c in tqdm(cands, desc=f"fuse-trial {it + 1}", leave=False, unit="cand"):
        g = groups[c]
        saved = {j: copy.deepcopy(adapter.layers[j]) for j in g}
        try:
            _fuse_and_train_resident(adapter, c, g, None, fuse, it, seed, trial_cfg,
                                     cached=(ft_states[g[0]], ft_states[g[-1] + 1]))
            student = [j for j in g if j != c]
            out[str(origin[c])] = _final_distance(adapter, student, g[-1] + 1, cal_states[g[0]], cal_states[n],
                                                  cfg.mi_batch_size)
        finally:
            for j, block in saved.items():
                adapter.layers[j] = block
    best = min(cands, key=lambda c: out[str(origin[c])])
    logger.info("fuse-trial: scores %s; removing block %d", {k2: round(v, 6) for k2, v in out.items()}, origin[best])
    return best, out


def run_group_pruning(ctx: RunContext, cfg: GroupTrainConfig, step: StepReport, fuse: bool) -> None:
    """FuseGPT (``fuse``) or MI+FT: remove ceil(L·s) blocks of ``ctx.adapter``'s model in place."""
    cfg.require_resolved()
    adapter = ctx.adapter
    seed = cfg.seed
    n_layers = adapter.num_layers
    k = n_layers - cfg.plan_layers(n_layers)
    settings = {k2: v for k2, v in cfg.to_dict().items() if k2 != "origins"}  # what a resumed run must match
    if adapter.device.type == "cpu" and cfg.preset == "paper":
        logger.warning("the paper preset on a CPU takes hours even for small models; try preset='cpu'")
    state_dir = ctx.state_dir(cfg.method)
    calib = calibration_windows(ctx.tokenizer, cfg.calib_source, cfg.nsamples, cfg.seqlen, seed)
    ft = calibration_windows(ctx.tokenizer, cfg.ft_source, cfg.ft_nsamples, cfg.ft_seqlen, seed)
    val = heldout_windows(ctx.tokenizer, cfg.ft_source, cfg.val_nsamples, cfg.ft_seqlen, seed, cfg.ft_nsamples) \
        if cfg.val_nsamples else None
    fold_set = fold_windows(ctx, cfg)
    cfg.plan_placement(adapter.offloader is not None, adapter.device.type)  # checked in the plan too
    flags = {id(q): q.requires_grad for q in adapter.model.parameters()}
    start = 0
    if ctx.resume and has_state(state_dir):
        start, ctx.earlier_s = load_state(state_dir, adapter, step, settings)
        step.resumed = {"after_iterations": start, "earlier_wall_time_s": round(ctx.earlier_s, 3)}
    elif ctx.resume:
        logger.warning("--resume: no run state in %s; starting from the beginning", state_dir)
    for q in adapter.model.parameters():
        q.requires_grad_(False)  # only the group in training holds gradients
    step.details.setdefault("groups", [])
    step.details.setdefault("fallbacks", [])
    try:
        for it in tqdm(range(start, k), desc=f"{cfg.method} blocks", unit="block", initial=start, total=k):
            cands = candidate_blocks(adapter.num_layers, cfg.early_barrier, cfg.latter_barrier)
            scores = mi_scores(adapter, calib, cands, cfg.mi_batch_size)
            trial = None
            if cfg.selection == "fuse-trial":
                p, trial = fuse_trial(adapter, scores, calib, ft, fuse, it, seed, cfg)
            else:
                p = lowest(scores, 1)[0]
            group = group_window(p, adapter.num_layers, cfg.group_size)
            origin = adapter.origin
            info = _fuse_and_train(adapter, p, group, ft, fuse, it, seed, cfg, val,
                                   fold=functools.partial(fold_before_removal, adapter, cfg, fold_set, [p]))
            info.trial_scores = trial
            info.group = [origin[j] for j in group]
            by_origin = scores_by_origin(adapter, scores)
            removed = remove_blocks(adapter, [p])
            info.removed = removed[0]
            record = info.to_dict()
            step.add_iteration(by_origin, removed, **{k: v for k, v in record.items() if k != "removed"})
            step.details["groups"].append(record)
            if info.fell_back:
                step.details["fallbacks"].append(removed[0])
            logger.info("%s removed block %d (group %s), loss %.4g -> %s, after training %s%s", cfg.method,
                        removed[0], info.group, info.loss_start, [round(x, 6) for x in info.loss_per_epoch],
                        f"{info.loss_end:.4g}" if info.loss_end is not None else "-",
                        f"; validation {[round(x, 6) for x in info.val_loss_per_epoch]}, kept epoch "
                        f"{info.best_epoch}" if info.val_loss_per_epoch else "")
            if state_dir is not None:
                save_state(state_dir, adapter, step, it + 1, settings, ctx.step_elapsed())
            _after_iteration(it)
        step.details["merged_layers"] = merge_model(adapter)
    finally:
        for q in adapter.model.parameters():
            q.requires_grad_(flags.get(id(q), True))


def _after_iteration(it: int) -> None:
    """Hook after each saved iteration (tests raise here to simulate a kill)."""
