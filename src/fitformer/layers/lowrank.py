"""``LowRankLinear``: ``y = (x V^T) U^T + b``, the simplest factorized baseline (truncated SVD,
Eckart–Young: the best rank-``r`` approximation in Frobenius norm).

It is the ``d = 2`` TT-matrix with modes ``(in, 1) x (1, out)``; kept as its own two-GEMM module because that
is what it executes. Hooks as in :mod:`fitformer.layers.tt`: ``intermediate_quant`` sees the rank-``r``
activation, ``effective_factors()`` returns ``(first, second)`` as used in forward.

At inference the bias is folded into the second GEMM: the rank-``r`` activation gets a column of ones and
``second`` the bias as one more column. ``F.linear`` with a bias copies the bias into every output row and
then runs the GEMM on top of it, a second and third pass over the output; with only ``r`` inner products per
output that is most of the time (2,048 x 768 -> 3,072 at rank 64: 4.98 against 6.88 ms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .planner import is_tracing
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
        self._folded: tuple | None = None  # (key, second with the bias as one more input column)

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, second)`` as forward uses them (override or parametrize to quantize)."""
        return self.first, self.second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.effective_factors()
        if self.bias is None or is_tracing() or (torch.is_grad_enabled() and any(
                t.requires_grad for t in (x, first, second, self.bias))):
            h = F.linear(x, first)
            if self.intermediate_quant is not None:
                h = self.intermediate_quant(h)
            return F.linear(h, second, self.bias)
        x2 = x.reshape(-1, self.in_features)
        wide = x2.new_empty(x2.shape[0], self.rank + 1)
        if self.intermediate_quant is None:
            torch.mm(x2, first.t(), out=wide[:, : self.rank])
        else:
            wide[:, : self.rank] = self.intermediate_quant(F.linear(x2, first))
        wide[:, self.rank] = 1
        return (wide @ self._second_with_bias(second)).reshape(*x.shape[:-1], self.out_features)

    def _second_with_bias(self, second: torch.Tensor) -> torch.Tensor:
        """``[second.T; bias]``, ``(rank + 1, out)``; kept while the stored factor and bias are unchanged."""
        key = tuple((t.data_ptr(), t._version) for t in (second, self.bias)) if second is self.second else None
        if key is not None and self._folded is not None and self._folded[0] == key:
            return self._folded[1]
        folded = torch.cat([second.t(), self.bias[None]]).detach()
        self._folded = (key, folded) if key is not None else None
        return folded

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight (materialised)."""
        first, second = self.effective_factors()
        return second @ first

    def cost_ops(self, tokens: int, training: bool = False) -> list[Op]:
        """The two GEMMs per call as plain data (see :mod:`fitformer.layers.tensorize`); at inference the
        second one carries the bias as one more inner product."""
        itemsize = self.first.element_size()
        inner = self.rank + (1 if self.bias is not None and not training else 0)
        return [mm_op(1, tokens, self.rank, self.in_features, itemsize, label="first"),
                mm_op(1, tokens, self.out_features, inner, itemsize, label="second")]

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
