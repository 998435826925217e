"""The dense teacher's signal for recovery by distillation, and the distillation losses.

Two ways to have the teacher at hand while the pruned student trains on windows ``0 … N−1``:

* :class:`OnlineTeacher`: the teacher model itself, run (no grad) on each batch beside the student:
  exact logits, and hidden states for the optional intermediate term; costs the teacher's weights in
  memory and one teacher forward per step.
* :class:`TopKTeacher`: each window's top-``k`` teacher logits (values and indices) computed **once**
  (:func:`precompute_topk`) and streamed from disk, so a 7B teacher never sits beside its student:
  ``N × T × k × 6`` bytes on disk (fp16 values, int32 indices) and one teacher forward per window in
  all. The KL is then taken over those ``k`` tokens plus one bucket for the rest of the vocabulary
  (``kd_tail=bucket``, the default) or over the ``k`` alone, renormalised (``renormalise``: LinearPatch's
  offline distillation); with ``k`` = the vocabulary it is the full KL.

Losses (per token, averaged): ``kd_loss`` = T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) (Minitron's
forward KL; T = 1 by default); ``hidden_loss`` = ‖h_s − h_t‖² / ‖h_t‖² per token at the kept blocks'
outputs (teacher block = the student block's original index).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass
class TeacherBatch:
    """What the student's loss needs for one batch of windows: full logits, or top-k values and indices,
    and (online only) the teacher's hidden states after every block."""

    logits: torch.Tensor | None = None  # (B, T, V) fp32
    topk_values: torch.Tensor | None = None  # (B, T, k) fp32
    topk_indices: torch.Tensor | None = None  # (B, T, k) int64
    topk_logz: torch.Tensor | None = None  # (B, T): log Σ_v exp(z_v / T) over the whole vocabulary (the tail's mass)
    hidden: tuple[torch.Tensor, ...] | None = None  # HF hidden_states: embeddings, then after each block


class OnlineTeacher:
    """The teacher model in memory, run without gradients on each batch."""

    kind = "online"

    def __init__(self, model: nn.Module, hidden: bool = False):
        self.model = model.eval()
        self.hidden = hidden
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(p for p in self.model.parameters() if not p.is_meta).device

    @torch.no_grad()
    def batch(self, indices: torch.Tensor, ids: torch.Tensor) -> TeacherBatch:
        out = self.model(ids.to(self.device), output_hidden_states=self.hidden, use_cache=False)
        return TeacherBatch(logits=out.logits.float(), hidden=out.hidden_states if self.hidden else None)

    def close(self) -> None:
        pass


class TopKTeacher:
    """Top-k teacher logits of every window, in one safetensors file per chunk under ``folder``."""

    kind = "topk"

    def __init__(self, folder: Path, k: int, chunk: int, n: int, owned: bool = True, temperature: float = 1.0):
        self.folder, self.k, self.chunk, self.n, self.owned = Path(folder), k, chunk, n, owned
        self.temperature = temperature  # the logz were taken at this temperature

    @property
    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))

    def batch(self, indices: torch.Tensor, ids: torch.Tensor) -> TeacherBatch:
        from safetensors.torch import load_file

        vals, idxs, logz = [], [], []
        cache: dict[int, dict[str, torch.Tensor]] = {}
        for i in indices.tolist():
            c = i // self.chunk
            if c not in cache:
                cache[c] = load_file(str(self.folder / f"{c}.safetensors"))
            vals.append(cache[c]["values"][i - c * self.chunk])
            idxs.append(cache[c]["indices"][i - c * self.chunk])
            logz.append(cache[c]["logz"][i - c * self.chunk])
        dev = ids.device
        return TeacherBatch(topk_values=torch.stack(vals).to(dev, torch.float32),
                            topk_indices=torch.stack(idxs).to(dev, torch.int64),
                            topk_logz=torch.stack(logz).to(dev, torch.float32))

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.folder, ignore_errors=True)


@torch.no_grad()
def precompute_topk(model: nn.Module, windows: torch.Tensor, k: int, batch_size: int = 4,
                    folder: str | Path | None = None, temperature: float = 1.0) -> TopKTeacher:
    """Run ``model`` (the teacher) once over ``windows`` and keep each position's ``k`` largest logits, and the
    log-normaliser of the whole distribution at ``temperature`` (so the mass outside the k is known)."""
    model.eval()
    dev = next(p for p in model.parameters() if not p.is_meta).device
    from safetensors.torch import save_file

    owned = folder is None
    root = Path(tempfile.mkdtemp(prefix="fusegpt-topk-")) if folder is None else Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    vocab = None
    for c, start in enumerate(tqdm(range(0, windows.shape[0], batch_size), desc="teacher top-k", unit="batch")):
        ids = windows[start:start + batch_size].to(dev)
        logits = model(ids, use_cache=False).logits.float()
        vocab = logits.shape[-1]
        kk = min(k, vocab)
        v, i = logits.topk(kk, dim=-1)
        logz = torch.logsumexp(logits / temperature, dim=-1)
        save_file({"values": v.half().cpu().contiguous(), "indices": i.int().cpu().contiguous(),
                   "logz": logz.float().cpu().contiguous()}, str(root / f"{c}.safetensors"))
    t = TopKTeacher(root, min(k, vocab or k), batch_size, windows.shape[0], owned=owned, temperature=temperature)
    logger.info("teacher top-%d logits of %d windows: %.1f MB in %s", t.k, t.n, t.disk_bytes / 1e6, root)
    return t


def kd_loss(student_logits: torch.Tensor, teacher: TeacherBatch, temperature: float = 1.0,
            tail: str = "bucket") -> torch.Tensor:
    """T² · KL(teacher ‖ student) per token, averaged over every position of the batch.

    With top-k teacher logits, ``tail``: ``bucket`` (default) keeps the k tokens' true probabilities and
    treats the rest of the vocabulary as one more outcome, so the student is also held to the teacher's
    mass outside the k (exact for the k, a lower bound of the full KL overall); ``renormalise`` takes
    both distributions over the k tokens alone, renormalised (LinearPatch's reference)."""
    T = float(temperature)
    s = student_logits.float()
    if teacher.logits is not None:
        log_p = F.log_softmax(teacher.logits / T, dim=-1)
        log_q = F.log_softmax(s / T, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * T * T
    if tail == "renormalise" or teacher.topk_logz is None:
        log_p = F.log_softmax(teacher.topk_values / T, dim=-1)
        log_q = F.log_softmax(s.gather(-1, teacher.topk_indices) / T, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * T * T
    log_p = teacher.topk_values / T - teacher.topk_logz.unsqueeze(-1)
    log_q_all = F.log_softmax(s / T, dim=-1)
    log_q = log_q_all.gather(-1, teacher.topk_indices)
    p = log_p.exp()
    m_p = (1 - p.sum(-1)).clamp_min(1e-9)
    m_q = (1 - log_q.exp().sum(-1)).clamp_min(1e-9)
    kl = (p * (log_p - log_q)).sum(-1) + m_p * (m_p.log() - m_q.log())
    return kl.mean() * T * T


def hidden_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                origin: Sequence[int], teacher_layers: int) -> torch.Tensor:
    """Mean over the kept blocks (but the last of either model, whose HF state is after the final norm)
    and tokens of ‖h_s − h_t‖² / ‖h_t‖², teacher block = the student block's original index."""
    terms = []
    for j, o in enumerate(origin):
        if j >= len(origin) - 1 or o >= teacher_layers - 1:
            continue
        hs, ht = student_hidden[j + 1].float(), teacher_hidden[o + 1].float()
        terms.append(((hs - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).clamp_min(1e-6)).mean())
    if not terms:
        return student_hidden[0].new_zeros(())
    return torch.stack(terms).mean()
