"""``LowRankLinear``: ``y = (x V^T) U^T + b``, the simplest factorized baseline (truncated SVD,
Eckart–Young: the best rank-``r`` approximation in Frobenius norm).

It is the ``d = 2`` TT-matrix with modes ``(in, 1) x (1, out)``; kept as its own two-GEMM module because that
is what it executes. Hooks as in :mod:`fitformer.layers.tt`: ``intermediate_quant`` sees the rank-``r``
activation, ``effective_factors()`` returns ``(first, second)`` as used in forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .tensorize import Op, mm_op


class LowRankLinear(nn.Module):
    """A rank-``rank`` linear layer with factors ``first (rank, in)`` and ``second (out, rank)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        if rank < 1 or in_features < 1 or out_features < 1:
            raise UserError(f"LowRankLinear needs positive sizes and rank, got {in_features} x {out_features}, "
                            f"rank {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        std = (1.0 / (3 * in_features * rank)) ** 0.25  # Var(U V) = rank * var^2 = 1 / (3 in), as nn.Linear
        self.first = nn.Parameter(torch.randn(rank, in_features, device=device, dtype=dtype) * std)
        self.second = nn.Parameter(torch.randn(out_features, rank, device=device, dtype=dtype) * std)
        bound = 1 / math.sqrt(in_features)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound)) \
            if bias else None
        self.intermediate_quant: nn.Module | None = None
        self.reconstruction_error: float | None = None

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, second)`` as forward uses them (override or parametrize to quantize)."""
        return self.first, self.second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.effective_factors()
        h = F.linear(x, first)
        if self.intermediate_quant is not None:
            h = self.intermediate_quant(h)
        return F.linear(h, second, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight (materialised)."""
        first, second = self.effective_factors()
        return second @ first

    def cost_ops(self, tokens: int, training: bool = False) -> list[Op]:
        """The two GEMMs per call as plain data (see :mod:`fitformer.layers.tensorize`)."""
        itemsize = self.first.element_size()
        return [mm_op(1, tokens, self.rank, self.in_features, itemsize, label="first"),
                mm_op(1, tokens, self.out_features, self.rank, itemsize, label="second")]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Truncated SVD of ``linear.weight``, singular values split evenly between the factors;
        ``reconstruction_error`` is the relative Frobenius error."""
        if not isinstance(linear, nn.Linear):
            raise UserError(f"LowRankLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        rank = int(min(rank, linear.in_features, linear.out_features))
        w = linear.weight.detach().to(torch.float64)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    device=w.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.first.copy_(root[:, None] * vh[:rank])
            layer.second.copy_(u[:, :rank] * root)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reconstruction_error = (s[rank:].norm() / s.norm().clamp_min(1e-300)).item()
        return layer
