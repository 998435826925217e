"""Memory and time estimates of FuseGPT and MI+FT (see :mod:`fusegpt.memory` for the notation).

Memory, per removed block (group of ``g`` blocks, fine-tuning set ``N×T_ft``, training batch
``B_ft``, LoRA rank ``r``, coefficient rank ``r_c``, ``m`` kept terms): the MI ranking's cached
states; cached group inputs and teacher outputs ``2·N·T_ft·h·b``; trainable factors with fp32
value, gradient and two Adam moments ``16·(g−1)·(r + m·r_c)·Σ_roles(in+out)``; fp32 effective
weights and their gradients ``2·(g−1)·P_blk·4``; autograd activations
``TRAINING_ACTIVATIONS·(g−1)·act(B_ft, T_ft)`` (saved tensors and their gradients, about twice a
forward's).

Time, per removed block: one MI ranking of the current model, the group's inputs and teacher
outputs, the loss before and after training, and ``epochs`` passes of forward + backward
through the ``g − 1`` student blocks; with validation, the validation windows' states and a
student pass per epoch; with ``fuse-trial``, one pass over both window sets plus each candidate's
short training and a run to the last block.
"""

from __future__ import annotations

from ...memory import TRAINING_ACTIVATIONS, EstimateEnv, ModelGeometry, act_bytes
from ...settings import blocks_to_remove
from ...timing import BACKWARD, block_flops, seconds
from ..block_scoring import iterative_flops, scoring_memory
from .config import GroupTrainConfig


def group_memory(g: ModelGeometry, cfg: GroupTrainConfig, env: EstimateEnv, fuse: bool) -> dict[str, dict[str, int]]:
    gs = min(cfg.group_size, g.n_layers)
    coef_rank, max_terms = cfg.fusion()
    terms = max(1, max_terms or 1) if fuse else 0
    trainable = (gs - 1) * (cfg.lora_rank + terms * (coef_rank if fuse else 0)) * g.roles_io
    blk = env.resident_block(g)
    return {
        f"{cfg.method} MI ranking": scoring_memory(g, cfg, env, batch=cfg.mi_batch_size),
        f"{cfg.method} group training": {
            # the group, plus each student's copies of fused weights (separate once stored)
            "resident blocks": blk * (gs + (gs - 1) * terms),
            "group inputs+targets": 2 * cfg.ft_nsamples * cfg.ft_seqlen * g.hidden * env.nbytes,
            "trainable+Adam": 16 * trainable,
            "effective weights+grads": 2 * (gs - 1) * g.block_params * 4,
            "activations": int(TRAINING_ACTIVATIONS * (gs - 1)
                               * act_bytes(g, cfg.batch_size, cfg.ft_seqlen, 4, scores=env.scores)),
        },
    }


def group_seconds(g: ModelGeometry, cfg: GroupTrainConfig, env: EstimateEnv, fuse: bool) -> float:
    k = blocks_to_remove(g.n_layers, cfg.sparsity)
    ft_tokens = cfg.ft_nsamples * cfg.ft_seqlen
    blk = block_flops(g, ft_tokens, cfg.ft_seqlen)
    total = 0.0
    for it in range(k):
        n = g.n_layers - it
        gs = min(cfg.group_size, n)
        total += iterative_flops(g, cfg, n, 1, head=False)  # the MI ranking
        total += blk * (n / 2 + gs)  # states entering the group (on average half the model) + teacher
        total += blk * (gs - 1) * (2 + cfg.epochs * (1 + BACKWARD))  # loss before/after + training
        if cfg.val_nsamples:  # validation before training and after every epoch
            val_blk = block_flops(g, cfg.val_nsamples * cfg.ft_seqlen, cfg.ft_seqlen)
            total += val_blk * (n / 2 + gs + (gs - 1) * (cfg.epochs + 2))
        if cfg.selection == "fuse-trial":  # one pass for the cached states, then each candidate's trial
            cal_blk = block_flops(g, cfg.nsamples * cfg.seqlen, cfg.seqlen)
            total += (blk + cal_blk) * n
            total += cfg.trial_candidates * (blk * (gs - 1) * (1 + cfg.trial_epochs * (1 + BACKWARD)) + cal_blk * n / 2)
    return seconds(total, env)
