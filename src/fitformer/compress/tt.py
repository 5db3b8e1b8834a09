"""Plan kinds that factorize layers: ``TTPlan`` (TT-matrix linear), ``LowRankPlan``, ``TTEmbeddingPlan``;
and :func:`tt_plan_for_model`, which picks a tensorization per linear layer for a rank or a target
compression ratio.

Each handler builds the compressed layer from the dense one by (TT-)SVD, so applying a plan starts from
the best approximation at that rank rather than from random cores.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import UserError
from ..layers.lowrank import LowRankLinear
from ..layers.tensorize import TTShape, choose_tensorization
from ..layers.tt import TTEmbedding, TTLinear
from .plan import CompressionPlan, LayerPlan, register_handler, register_plan


@register_plan
@dataclass(frozen=True)
class TTPlan(LayerPlan):
    """Replace an ``nn.Linear`` by a :class:`~fitformer.layers.TTLinear` initialised by TT-SVD.

    ``in_modes``/``out_modes``: the tensorization (``None``: the enumerated shape with the fewest FLOPs at
    ``max_rank`` and ``num_cores``); ``max_rank`` (int or one per inner bond) and/or ``rel_error`` truncate the
    TT-SVD; with neither the ranks are full (exact).
    """

    kind: ClassVar[str] = "tt"
    in_modes: tuple[int, ...] | None = None
    out_modes: tuple[int, ...] | None = None
    max_rank: int | tuple[int, ...] | None = None
    rel_error: float | None = None
    num_cores: int = 3


@register_plan
@dataclass(frozen=True)
class LowRankPlan(LayerPlan):
    """Replace an ``nn.Linear`` by a rank-``rank`` :class:`~fitformer.layers.LowRankLinear` (truncated SVD)."""

    kind: ClassVar[str] = "low_rank"
    rank: int = 16


@register_plan
@dataclass(frozen=True)
class TTEmbeddingPlan(LayerPlan):
    """Replace an ``nn.Embedding`` by a :class:`~fitformer.layers.TTEmbedding` initialised by TT-SVD."""

    kind: ClassVar[str] = "tt_embedding"
    vocab_modes: tuple[int, ...] | None = None
    hidden_modes: tuple[int, ...] | None = None
    max_rank: int | tuple[int, ...] | None = None
    rel_error: float | None = None
    num_cores: int = 3


def _require(module: nn.Module, cls: type, plan: LayerPlan, name: str) -> None:
    if not isinstance(module, cls):
        raise UserError(f"plan kind '{plan.kind}' needs an {cls.__name__} but layer '{name}' is a "
                        f"{type(module).__name__}; point the plan at {cls.__name__} layers")


@register_handler(TTPlan)
def _apply_tt(module: nn.Module, plan: TTPlan, name: str) -> nn.Module:
    _require(module, nn.Linear, plan, name)
    in_modes, out_modes = plan.in_modes, plan.out_modes
    if in_modes is None and out_modes is None:
        rank = plan.max_rank if plan.max_rank is not None else 16
        shape = choose_tensorization(module.in_features, module.out_features, rank, (plan.num_cores,))
        in_modes, out_modes = shape.in_modes, shape.out_modes
    try:
        return TTLinear.from_linear(module, in_modes, out_modes, plan.max_rank, plan.rel_error, plan.num_cores)
    except UserError as exc:
        raise UserError(f"layer '{name}': {exc}") from None


@register_handler(LowRankPlan)
def _apply_low_rank(module: nn.Module, plan: LowRankPlan, name: str) -> nn.Module:
    _require(module, nn.Linear, plan, name)
    return LowRankLinear.from_linear(module, plan.rank)


@register_handler(TTEmbeddingPlan)
def _apply_tt_embedding(module: nn.Module, plan: TTEmbeddingPlan, name: str) -> nn.Module:
    _require(module, nn.Embedding, plan, name)
    try:
        return TTEmbedding.from_embedding(module, plan.vocab_modes, plan.hidden_modes, plan.max_rank,
                                          plan.rel_error, plan.num_cores)
    except UserError as exc:
        raise UserError(f"layer '{name}': {exc}") from None


def linear_layers(model: nn.Module, patterns: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                  min_features: int = 64) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers a TT plan would cover: name matches a pattern and no exclusion, and both sizes
    are at least ``min_features`` (a 384 x 2 classifier has nothing to factorize)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in patterns)
            and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
            and min(m.in_features, m.out_features) >= min_features}


@functools.lru_cache(maxsize=4096)
def _best_shape(in_features: int, out_features: int, rank: int, num_cores: int, tokens: int,
                objective: str) -> TTShape:
    """Enumeration is the slow part and a model repeats few layer sizes: choose once per size and rank."""
    return choose_tensorization(in_features, out_features, rank, (num_cores,), tokens, objective=objective)


def _shapes_at(layers: dict[str, nn.Linear], rank: int, num_cores: int, tokens: int,
               objective: str) -> dict[str, TTShape]:
    return {n: _best_shape(m.in_features, m.out_features, rank, num_cores, tokens, objective)
            for n, m in layers.items()}


def tt_plan_for_model(model: nn.Module, rank: int | None = None, target_compression: float | None = None,
                      num_cores: int = 3, patterns: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                      min_features: int = 64, tokens: int = 128, objective: str = "flops",
                      max_rank: int = 512) -> CompressionPlan:
    """A plan with one :class:`TTPlan` per covered linear layer (see :func:`linear_layers`).

    Give ``rank`` to use it everywhere, or ``target_compression`` (dense weights / TT cores over the covered
    layers, e.g. ``10.0``) to use the largest uniform rank that reaches it. Each layer gets the enumerated
    tensorization that minimises ``objective`` (``"flops"`` at ``tokens`` rows, ``"params"`` or ``"bytes"``).
    """
    if (rank is None) == (target_compression is None):
        raise UserError("give exactly one of rank and target_compression")
    layers = linear_layers(model, patterns, exclude, min_features)
    if not layers:
        raise UserError(f"no nn.Linear layer matches {list(patterns)} with both sizes >= {min_features}; "
                        "check the patterns")
    if rank is None:
        if target_compression <= 1:
            raise UserError(f"target_compression must exceed 1, got {target_compression}")
        dense = sum(m.in_features * m.out_features for m in layers.values())

        def ratio(r: int) -> float:
            return dense / sum(s.params for s in _shapes_at(layers, r, num_cores, tokens, objective).values())

        if ratio(1) < target_compression:
            raise UserError(f"even rank 1 compresses these layers only {ratio(1):.1f}x < {target_compression}; "
                            "use more cores or a smaller target")
        lo, hi = 1, max_rank  # largest rank whose ratio still reaches the target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ratio(mid) >= target_compression else (lo, mid - 1)
        rank = lo
    shapes = _shapes_at(layers, rank, num_cores, tokens, objective)
    return CompressionPlan(layers={n: [TTPlan(s.in_modes, s.out_modes, rank, None, num_cores)]
                                   for n, s in shapes.items()})
