"""The fused linear layer of FuseGPT (ALGORITHMS.md §2, step 3).

    W_fused = W_j + B A + Σ_m (C_m D_m) ⊙ W_{p_m}        b_fused = b_j + Σ_m c_m ⊙ b_{p_m}

``W_j`` (own weight) and every ``W_{p_m}`` (weight of the same role in the m-th block fused into
this one) are frozen; the LoRA pair ``A, B`` and the coefficient factors ``C_m, D_m`` (and the
bias coefficients ``c_m``) are trained. Initialisation as in the paper: ``B = 0, C = 0, c = 0``,
``A, D`` Kaiming-uniform (a=√5), so a new layer computes exactly ``W_j x + b_j``.

Trainable factors are kept in fp32 (master weights) whatever the model's dtype; the effective
weight is computed in fp32 and cast to the input's dtype for the matmul. Without gradients (MI
ranking, teacher outputs, evaluation) the effective weight is cached until a factor changes.
A layer with no LoRA rank and no terms is what :func:`merge_fused` turns into a plain
``nn.Linear``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def _kaiming(shape: tuple[int, int]) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


class FusionTerm(nn.Module):
    """One fused block in one layer: ``(C D) ⊙ W_p`` plus ``c ⊙ b_p`` when biases exist.

    ``fused_weight`` (and ``fused_bias``) are frozen buffers; several layers may share one
    tensor (the seven blocks of a group all reference the removed block's weight).
    """

    fused_weight: torch.Tensor
    fused_bias: torch.Tensor | None
    coef_b: nn.Parameter | None

    def __init__(self, fused_weight: torch.Tensor, rank: int, fused_bias: torch.Tensor | None = None,
                 init: bool = True):
        super().__init__()
        out_f, in_f = fused_weight.shape
        rank = max(1, min(rank, out_f, in_f))
        self.register_buffer("fused_weight", fused_weight.detach())
        self.register_buffer("fused_bias", None if fused_bias is None else fused_bias.detach())
        dev = fused_weight.device
        self.coef_C = nn.Parameter(torch.zeros(out_f, rank, device=dev))
        self.coef_D = nn.Parameter(_kaiming((rank, in_f)).to(dev) if init else torch.zeros(rank, in_f, device=dev))
        self.coef_b = nn.Parameter(torch.zeros(out_f, device=dev)) if fused_bias is not None else None

    @property
    def rank(self) -> int:
        return self.coef_C.shape[1]

    def delta_weight(self) -> torch.Tensor:
        """``(C D) ⊙ W_p`` in fp32."""
        return (self.coef_C.float() @ self.coef_D.float()) * self.fused_weight.float()

    def delta_bias(self) -> torch.Tensor | None:
        if self.coef_b is None or self.fused_bias is None:
            return None
        return self.coef_b.float() * self.fused_bias.float()


class FusedLinear(nn.Module):
    """A linear layer with a frozen own weight, a LoRA pair and a list of fusion terms.

    Build one with :meth:`from_linear`; add fused blocks with :meth:`add_term`; turn it back
    into ``nn.Linear`` with :meth:`to_linear` (fp32 merge, cast back to the own weight's dtype).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, lora_rank: int = 0, init: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        if lora_rank > 0:
            r = max(1, min(lora_rank, self.out_features, self.in_features))
            dev = weight.device
            self.lora_A = nn.Parameter(_kaiming((r, self.in_features)).to(dev) if init
                                       else torch.zeros(r, self.in_features, device=dev))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        self.terms = nn.ModuleList()
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_linear(cls, linear: nn.Module, lora_rank: int = 0) -> FusedLinear:
        """Wrap ``linear`` (an ``nn.Linear``, or a ``FusedLinear`` returned as is)."""
        if isinstance(linear, FusedLinear):
            return linear
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"cannot fuse into {type(linear).__name__}; expected nn.Linear")
        return cls(linear.weight, linear.bias, lora_rank)

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_A is None else self.lora_A.shape[0]

    def add_term(self, fused_weight: torch.Tensor, fused_bias: torch.Tensor | None = None, *, rank: int) -> FusionTerm:
        """Fuse one more block into this layer (the paper's incremental rule)."""
        if tuple(fused_weight.shape) != (self.out_features, self.in_features):
            raise ConfigError(
                f"cannot fuse a {tuple(fused_weight.shape)} weight into a ({self.out_features}, {self.in_features}) "
                "layer: blocks of a group must share widths (GQA heads, FFN size); fuse before width pruning"
            )
        if fused_bias is not None and self.bias is None:
            raise ConfigError("the removed block's layer has a bias but this layer has none; widths/biases must match")
        term = FusionTerm(fused_weight, rank, fused_bias if self.bias is not None else None)
        self.terms.append(term)
        return term

    def merge_oldest(self, keep: int) -> int:
        """Fold all but the newest ``keep`` terms into the own (frozen) weight; returns how many.

        The memory setting: the merged terms stop being trainable and their ``W_p`` is freed.
        """
        n = len(self.terms) - keep
        if n <= 0:
            return 0
        with torch.no_grad():
            w = self.weight.float()
            b = None if self.bias is None else self.bias.float()
            for t in self.term_list()[:n]:
                w = w + t.delta_weight()
                db = t.delta_bias()
                if db is not None and b is not None:
                    b = b + db
            self.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=False)
            if b is not None:
                self.bias = nn.Parameter(b.to(self.bias.dtype), requires_grad=False)
        self.terms = nn.ModuleList(list(self.terms)[n:])
        self._cache = None
        return n

    @torch.no_grad()
    def restart_lora(self) -> None:
        """Fold the trained LoRA pair into the own (frozen) weight and start a fresh one (A kaiming,
        B zero): the layer computes the same function, and the next training starts its adapter at
        zero instead of continuing a trained one with a fresh optimizer."""
        if self.lora_A is None:
            return
        w = self.weight.float() + self.lora_B.float() @ self.lora_A.float()
        self.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=False)
        r, dev = self.lora_A.shape[0], self.weight.device
        self.lora_A = nn.Parameter(_kaiming((r, self.in_features)).to(dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        self._cache = None

    # ------------------------------------------------------------------ maths
    def term_list(self) -> list[FusionTerm]:
        """The fusion terms, oldest first (typed: ``nn.ModuleList`` iterates as plain modules)."""
        return [t for t in self.terms if isinstance(t, FusionTerm)]

    def trainable(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(lora, coefficients)``: the LoRA pair, and every C, D, c of the terms."""
        lora = [p for p in (self.lora_A, self.lora_B) if p is not None]
        coef = [p for t in self.term_list() for p in (t.coef_C, t.coef_D, t.coef_b) if p is not None]
        return lora, coef

    def _key(self) -> tuple:
        lora, coef = self.trainable()
        ps = [self.weight, *lora, *coef] + ([self.bias] if self.bias is not None else [])
        return tuple((p.data_ptr(), p._version) for p in ps)

    def effective_weight(self) -> torch.Tensor:
        """The fused weight in fp32 (differentiable in the factors)."""
        w = self.weight.float()
        if self.lora_A is not None:
            w = w + self.lora_B.float() @ self.lora_A.float()
        for t in self.term_list():
            w = w + t.delta_weight()
        return w

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        b = self.bias.float()
        for t in self.term_list():
            db = t.delta_bias()
            if db is not None:
                b = b + db
        return b

    def clear_cache(self) -> None:
        """Drop the cached effective weight (no-grad forwards rebuild it; offloading calls this)."""
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self._cache = None
            w, b = self.effective_weight(), self.effective_bias()
            return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        key = self._key() + (x.dtype,)
        if self._cache is None or self._cache[0] != key:
            w, b = self.effective_weight().to(x.dtype), self.effective_bias()
            self._cache = (key, w, None if b is None else b.to(x.dtype))
        return F.linear(x, self._cache[1], self._cache[2])

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (merged in fp32, cast to W_j's dtype)."""
        dtype, dev = self.weight.dtype, self.weight.device
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=dev, dtype=dtype)
        lin.weight.copy_(self.effective_weight().to(dtype))
        if self.bias is not None:
            lin.bias.copy_(self.effective_bias().to(dtype))
        return lin

    def materialize(self) -> torch.Tensor:
        """The effective weight as one frozen tensor in W_j's dtype (to fuse this layer elsewhere)."""
        with torch.no_grad():
            return self.effective_weight().to(self.weight.dtype)

    def materialize_bias(self) -> torch.Tensor | None:
        with torch.no_grad():
            b = self.effective_bias()
            return None if b is None else b.to(self.bias.dtype)

    def spec(self) -> dict:
        """Structure of this layer (to rebuild it on resume)."""
        return {"lora_rank": self.lora_rank, "terms": [t.rank for t in self.terms]}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"lora_rank={self.lora_rank}, terms={[t.rank for t in self.terms]}")


def frozen_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) a layer computes, as frozen tensors: materialised if it is fused."""
    if isinstance(layer, FusedLinear):
        return layer.materialize(), layer.materialize_bias()
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"expected nn.Linear or FusedLinear, got {type(layer).__name__}")
    b = None if layer.bias is None else layer.bias.detach()
    return layer.weight.detach(), b


def merge_fused(module: nn.Module) -> int:
    """Replace every ``FusedLinear`` under ``module`` by an equivalent ``nn.Linear``; returns the count."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, FusedLinear):
            setattr(module, name, child.to_linear())
            n += 1
        else:
            n += merge_fused(child)
    return n


def fused_roles(roles: Mapping[str, nn.Module]) -> dict[str, FusedLinear]:
    """The roles of a block (``adapter.linear_roles``) that are fused layers."""
    return {r: m for r, m in roles.items() if isinstance(m, FusedLinear)}
