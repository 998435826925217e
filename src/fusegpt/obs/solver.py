"""Optimal Brain Surgeon for structured pruning (SlimGPT, ALGORITHMS.md §3).

:class:`OBSLayer` is the SparseGPT-style object: a forward hook feeds it the inputs of one
linear layer (``add_batch``), it accumulates the Hessian ``H = (2/n) Σ x xᵀ`` in fp32, and it
removes *input columns* of the layer's weight, with the OBS compensation of the columns that
remain:

    error of a set M       E_M = Σ_rows w_M (H⁻¹_MM)⁻¹ w_Mᵀ
    update of the rest     ΔW  = −W_:,M (H⁻¹_MM)⁻¹ H⁻¹_M,:
    inverse Hessian after  H⁻¹_RR ← H⁻¹_RR − H⁻¹_RM (H⁻¹_MM)⁻¹ H⁻¹_MR   (= (H_RR)⁻¹)

Two selection procedures sit on top:

* :meth:`OBSLayer.prune_units` — Batched Greedy Pruning of attention heads (or whole K/V
  groups): the error of every candidate unit comes from the Cholesky factor of its own diagonal
  block of H⁻¹ (grouped Cholesky, ``gcd=True``): with H⁻¹_MM = L Lᵀ, E_M = ‖L⁻¹ w_Mᵀ‖², which is
  exactly the OBS error above. ``gcd=False`` (the paper's −GCD ablation) sums per-column errors
  W²/diag(U)² with U the upper Cholesky factor of the whole remaining H⁻¹, as SparseGPT scores
  columns. The least-error unit is dropped, compensated, and errors are recomputed.
* :meth:`OBSLayer.prune_channels` — FFN channels with Dynamic Group Size: each round drops the
  ``g`` channels of least single-column OBS error ``‖w_j‖² / H⁻¹_jj`` together (joint OBS
  update), with ``g`` starting at half the budget and halving, floored at ``group_min`` and
  capped at ``group_max``; ``dgs=False`` uses fixed groups of ``group_max``.

:func:`magnitude_order` is the no-compensation baseline (least weight norm, no Hessian).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import FusegptError

logger = logging.getLogger(__name__)


class HessianError(FusegptError, ValueError):
    """The Hessian is not positive definite after dampening; the message names the setting to raise."""


class StopForward(Exception):
    """Raised by a hook to stop a block's forward once the wanted inputs are collected."""


class OBSLayer:
    """Hessian accumulator and OBS column remover for one linear layer (SparseGPT-style object).

    ``name`` labels errors and logs. Feed it with :meth:`hook` (a forward pre-hook on the layer)
    or by calling :meth:`add_batch` with the layer's inputs.
    """

    def __init__(self, layer: nn.Linear, name: str = "", percdamp: float = 0.01):
        self.layer = layer
        self.name = name or type(layer).__name__
        self.percdamp = percdamp
        self.columns = layer.in_features
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=layer.weight.device)
        self.nsamples = 0
        self.Hinv: torch.Tensor | None = None

    # ------------------------------------------------------------------ accumulation
    def add_batch(self, inp: torch.Tensor) -> None:
        """Add inputs ``(..., in_features)``: running mean of ``2 x xᵀ`` over all tokens, in fp32."""
        x = inp.detach().reshape(-1, self.columns).to(self.H.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * math.sqrt(2.0 / self.nsamples)
        self.H.addmm_(x.t(), x)

    def hook(self, stop: bool = False) -> torch.utils.hooks.RemovableHandle:
        """Register a forward pre-hook feeding :meth:`add_batch`; ``stop`` raises :class:`StopForward`."""

        def pre_hook(_module, args):
            self.add_batch(args[0])
            if stop:
                raise StopForward

        return self.layer.register_forward_pre_hook(pre_hook)

    # ------------------------------------------------------------------ inverse
    def inverse(self) -> torch.Tensor:
        """H⁻¹ of the dampened Hessian (fp64 Cholesky, kept in fp32); raises HessianError if not PD."""
        if self.nsamples == 0:
            raise HessianError(f"{self.name}: no calibration inputs were collected; check the calibration data")
        H = self.H.double()
        H.diagonal().add_(self.percdamp * float(torch.diagonal(H).mean()))  # in place: no n×n fp64 identity
        L, info = torch.linalg.cholesky_ex(H)
        del H
        if int(info) != 0 or not bool(torch.isfinite(L).all()):
            raise HessianError(
                f"the Hessian of {self.name} is not positive definite after dampening with percdamp="
                f"{self.percdamp}; raise percdamp (e.g. --set percdamp=0.1) or give more calibration tokens"
            )
        # H⁻¹ = L⁻ᵀ L⁻¹ in fp32 from the fp64 factor (torch.cholesky_inverse is far slower on CPU)
        L = L.float()
        Linv = torch.linalg.solve_triangular(L, torch.eye(self.columns, dtype=L.dtype, device=L.device), upper=False)
        self.Hinv = Linv.t() @ Linv
        return self.Hinv

    def _weight(self) -> torch.Tensor:
        return self.layer.weight.data.float().clone()

    # ------------------------------------------------------------------ OBS core
    @staticmethod
    def remove(W: torch.Tensor, Hinv: torch.Tensor, M: torch.Tensor) -> None:
        """Remove columns ``M`` of ``W`` (in place) with the OBS update of the others; H⁻¹ becomes (H_RR)⁻¹.

        Works on the full matrices: the update zeroes the rows/columns of ``M`` in H⁻¹ (set exactly).
        """
        A = Hinv[M][:, M].double()
        B = Hinv[M]  # (m, n) = H⁻¹_M,:
        sol = torch.linalg.solve(A, B.double()).to(W.dtype)  # (H⁻¹_MM)⁻¹ H⁻¹_M,:
        W -= W[:, M] @ sol
        Hinv -= B.t() @ sol
        W[:, M] = 0
        Hinv[M, :] = 0
        Hinv[:, M] = 0

    @staticmethod
    def set_error(W: torch.Tensor, Hinv: torch.Tensor, M: torch.Tensor) -> float:
        """OBS error of removing columns ``M`` together: Σ_rows w_M (H⁻¹_MM)⁻¹ w_Mᵀ (direct formula)."""
        A = Hinv[M][:, M].double()
        w = W[:, M].double()
        return float((w @ torch.linalg.solve(A, w.t())).diagonal().sum())

    @staticmethod
    def unit_errors(W: torch.Tensor, Hinv: torch.Tensor, units: Sequence[torch.Tensor], alive: torch.Tensor,
                    gcd: bool = True) -> torch.Tensor:
        """Error of removing each unit (a set of columns) from the model whose columns ``alive`` remain.

        ``gcd``: grouped Cholesky of each unit's diagonal block of H⁻¹ (exact block error); else
        per-column errors W²/diag(U)² from the Cholesky factor U of the whole remaining H⁻¹.
        """
        if gcd:
            idx = torch.stack(list(units))  # (n_units, k): units of equal size
            blocks = Hinv[idx.unsqueeze(2), idx.unsqueeze(1)].double()  # (n, k, k)
            Lf = torch.linalg.cholesky(blocks)
            w = W[:, idx].double().permute(1, 2, 0)  # (n, k, rows)
            z = torch.linalg.solve_triangular(Lf, w, upper=False)
            return z.pow(2).sum(dim=(1, 2))
        R = alive.nonzero().squeeze(1)
        U = torch.linalg.cholesky(Hinv[R][:, R].double(), upper=True)
        col_err = torch.zeros(W.shape[1], dtype=torch.float64, device=W.device)
        col_err[R] = W[:, R].double().pow(2).sum(0) / torch.diagonal(U).pow(2)
        return torch.stack([col_err[u].sum() for u in units])

    # ------------------------------------------------------------------ heads
    def prune_units(self, units: Sequence[Sequence[int]], schedule: Sequence[Sequence[int]],
                    gcd: bool = True) -> tuple[list[int], float]:
        """Batched Greedy Pruning: for each entry of ``schedule`` (candidate unit ids), drop the one of least error.

        ``units[u]`` lists the input columns of unit ``u`` (a head, or a K/V group's heads). The
        layer's weight is updated in place (OBS compensation). Returns the removed unit ids in
        removal order and the summed OBS error of the choices.
        """
        W = self._weight()
        Hinv = (self.Hinv if self.Hinv is not None else self.inverse()).clone()
        dev = W.device
        unit_idx = [torch.as_tensor(list(u), dtype=torch.long, device=dev) for u in units]
        alive = torch.ones(self.columns, dtype=torch.bool, device=dev)
        removed: list[int] = []
        total = 0.0
        for cands in schedule:
            cands = [c for c in cands if c not in removed]
            if not cands:
                raise ValueError(f"{self.name}: no unit left to remove")
            errs = self.unit_errors(W, Hinv, [unit_idx[c] for c in cands], alive, gcd)
            k = int(torch.argmin(errs))
            u = cands[k]
            M = unit_idx[u]
            alive[M] = False
            total += float(errs[k]) if gcd else self.set_error(W, Hinv, M)
            self.remove(W, Hinv, M)
            removed.append(u)
        self.layer.weight.data.copy_(W.to(self.layer.weight.dtype))
        return removed, total

    # ------------------------------------------------------------------ channels
    def prune_channels(self, n_remove: int, dgs: bool = True, group_min: int = 64,
                       group_max: int = 1024) -> tuple[list[int], float]:
        """Drop ``n_remove`` input columns in OBS-chosen groups (Dynamic Group Size); update in place.

        Returns the removed column indices and the summed OBS error of the groups.
        """
        W = self._weight()
        Hinv = (self.Hinv if self.Hinv is not None else self.inverse()).clone()
        alive = torch.ones(self.columns, dtype=torch.bool, device=W.device)
        removed: list[int] = []
        total = 0.0
        for size in group_sizes(n_remove, dgs, group_min, group_max):
            R = alive.nonzero().squeeze(1)
            err = W[:, R].pow(2).sum(0) / torch.diagonal(Hinv)[R].clamp_min(1e-12)
            M = R[torch.topk(err, size, largest=False).indices]
            total += self.set_error(W, Hinv, M)
            alive[M] = False
            self.remove(W, Hinv, M)
            removed.extend(M.tolist())
        self.layer.weight.data.copy_(W.to(self.layer.weight.dtype))
        return removed, total

    def free(self) -> None:
        self.H = torch.empty(0)
        self.Hinv = None


def group_sizes(n_remove: int, dgs: bool = True, group_min: int = 64, group_max: int = 1024) -> Iterator[int]:
    """Group sizes summing to ``n_remove``: DGS ``min(left, max(g, group_min), group_max)`` with
    ``g = ceil(n/2)`` halving each round; without DGS, fixed groups of ``group_max``."""
    left = n_remove
    g = max(1, math.ceil(n_remove / 2))
    while left > 0:
        size = min(left, max(g, group_min), group_max) if dgs else min(left, group_max)
        yield size
        left -= size
        g = max(1, g // 2)


def magnitude_order(scores: torch.Tensor, schedule: Sequence[Sequence[int]]) -> list[int]:
    """No-compensation baseline: for each candidate set of ``schedule``, the unit of least ``scores``."""
    removed: list[int] = []
    for cands in schedule:
        cands = [c for c in cands if c not in removed]
        removed.append(min(cands, key=lambda c: (float(scores[c]), c)))
    return removed
