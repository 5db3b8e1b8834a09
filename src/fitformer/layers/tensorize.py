"""Tensorization shapes of a TT-matrix layer and their exact costs (plain functions on shapes).

A TT-matrix (Oseledets 2011, "Tensor-Train Decomposition", sec. 4; Novikov et al. 2015, "Tensorizing Neural
Networks", eq. 3) writes a weight ``W[(i_1..i_d), (o_1..o_d)]`` of an ``in x out`` layer as a chain of cores
``G_k`` of shape ``(r_{k-1}, i_k, o_k, r_k)`` with ``r_0 = r_d = 1``. The *shape* is the pair of mode tuples,
the *ranks* the ``d + 1`` bond dimensions.

Costs here are exact counts of what :mod:`fitformer.layers.planner` executes: every GEMM/BMM step is a dict
``{kind, batch, m, n, k, flops, bytes, stage}`` computing ``out[b] (m x n) = A[b] (m x k) @ B[b] (k x n)``
``batch`` times; ``flops = 2 * batch * m * n * k``; ``bytes`` counts one read of each operand (an operand
shared across the batch once) and one write of the result. ``kind == "copy"`` is a layout change (a
permute that materialises), with ``flops = 0``. ``stage`` is ``"prepare"`` for work on the cores alone (done
once and cached at inference) or ``"run"`` for work per call.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from .planner import Planner

Op = dict[str, object]


def prod(values: Sequence[int]) -> int:
    return math.prod(values)


@lru_cache(maxsize=4096)
def _factorizations(n: int, d: int, min_factor: int) -> tuple[tuple[int, ...], ...]:
    if d == 1:
        return ((n,),) if n >= min_factor else ()
    out = []
    for f in range(max(min_factor, 1), n + 1):
        if n % f == 0 and (f >= min_factor or f == 1):
            out += [(f, *rest) for rest in _factorizations(n // f, d - 1, min_factor)]
    return tuple(out)


def factorizations(n: int, d: int, min_factor: int = 2) -> list[tuple[int, ...]]:
    """All ordered ``d``-tuples of integers ``>= min_factor`` whose product is ``n`` (``min_factor=1`` admits
    trivial factors)."""
    if n < 1 or d < 1:
        raise UserError(f"cannot factor {n} into {d} modes; both must be positive")
    return list(_factorizations(n, d, min_factor))


def balanced_modes(n: int, d: int, max_pad: float = 0.1, max_spread: float = 4.0) -> tuple[int, ...]:
    """The most balanced factorization of ``n`` into ``d`` modes (sorted ascending); when no factorization of
    ``n`` keeps the largest mode within ``max_spread`` times the smallest (e.g. a prime vocabulary size), the
    most balanced one of the smallest size at most ``max_pad`` larger that does (zero padding)."""
    best: tuple[float, tuple[int, ...]] | None = None
    for m in range(n, int(n * (1 + max_pad)) + 1):
        for f in _factorizations(m, d, 2):
            spread = max(f) / min(f)
            if best is None or spread < best[0]:
                best = (spread, tuple(sorted(f)))
        if best is not None and best[0] <= max_spread:
            return best[1]
    if best is None:
        raise UserError(f"no factorization of {n} (padded by up to {max_pad:.0%}) into {d} modes >= 2; "
                        "use fewer modes or give the modes explicitly")
    return best[1]


def full_ranks(in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
    """Bond ranks that make the TT exact for any matrix: ``r_k = min(prod_{j<=k} i_j o_j, prod_{j>k} i_j o_j)``."""
    sizes = [i * o for i, o in zip(in_modes, out_modes, strict=True)]
    d = len(sizes)
    return tuple(1 if k in (0, d) else min(prod(sizes[:k]), prod(sizes[k:])) for k in range(d + 1))


def bond_ranks(in_modes: Sequence[int], out_modes: Sequence[int], rank: int | Sequence[int]) -> tuple[int, ...]:
    """The ``d + 1`` bond ranks for a maximal ``rank`` (int) or per inner bond (``d - 1`` values) or all
    ``d + 1`` values; each is clamped to the full rank of its bond (a larger one adds parameters, not
    expressiveness)."""
    full = full_ranks(in_modes, out_modes)
    d = len(in_modes)
    if isinstance(rank, int):
        inner = [rank] * (d - 1)
    else:
        rank = [int(r) for r in rank]
        if len(rank) == d + 1:
            if rank[0] != 1 or rank[-1] != 1:
                raise UserError(f"TT ranks {tuple(rank)} must start and end with 1")
            inner = rank[1:-1]
        elif len(rank) == d - 1:
            inner = rank
        else:
            raise UserError(f"got {len(rank)} ranks for {d} cores; give one int, {d - 1} inner ranks "
                            f"or {d + 1} bond ranks")
    if any(r < 1 for r in inner):
        raise UserError(f"TT ranks must be >= 1, got {tuple(inner)}")
    return (1, *(min(r, f) for r, f in zip(inner, full[1:-1], strict=True)), 1)


def validate_shape(in_features: int, out_features: int, in_modes: Sequence[int], out_modes: Sequence[int]) -> None:
    """Check a tensorization at the door: equal lengths >= 2, positive modes, products cover the features."""
    if len(in_modes) != len(out_modes) or len(in_modes) < 2:
        raise UserError(f"in_modes {tuple(in_modes)} and out_modes {tuple(out_modes)} need the same length >= 2")
    if any(int(m) < 1 for m in (*in_modes, *out_modes)):
        raise UserError(f"modes must be positive integers, got {tuple(in_modes)} x {tuple(out_modes)}")
    if prod(in_modes) < in_features or prod(out_modes) < out_features:
        raise UserError(f"modes {tuple(in_modes)} x {tuple(out_modes)} cover {prod(in_modes)} x {prod(out_modes)}"
                        f" < {in_features} x {out_features}; choose modes whose products reach the layer size")


def tt_params(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of core parameters: ``sum_k r_{k-1} i_k o_k r_k``."""
    return sum(ranks[k] * i * o * ranks[k + 1] for k, (i, o) in enumerate(zip(in_modes, out_modes, strict=True)))


def mm_op(batch: int, m: int, n: int, k: int, itemsize: int, shared_a: bool = False, stage: str = "run",
          label: str = "") -> Op:
    """One (batched) matrix product as plain data; ``shared_a`` when ``A`` is the same for every batch."""
    a = m * k if shared_a else batch * m * k
    kind = "gemm" if batch == 1 or (shared_a and n == 1) else "bmm"
    return {"kind": kind, "batch": batch, "m": m, "n": n, "k": k, "flops": 2 * batch * m * n * k,
            "bytes": itemsize * (a + batch * k * n + batch * m * n), "stage": stage, "label": label}


def copy_op(numel: int, itemsize: int, stage: str = "run", label: str = "") -> Op:
    """A materialising permute of ``numel`` elements (read once, written once)."""
    return {"kind": "copy", "batch": 1, "m": numel, "n": 1, "k": 1, "flops": 0, "bytes": 2 * itemsize * numel,
            "stage": stage, "label": label}


def merge_ops(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], itemsize: int = 4,
              stage: str = "prepare") -> list[Op]:
    """Ops of fusing cores ``0..d-1`` into one core ``(r_0, prod i, prod o, r_d)``, left to right."""
    ops: list[Op] = []
    big_i, big_o = in_modes[0], out_modes[0]
    for k in range(1, len(in_modes)):
        i, o = in_modes[k], out_modes[k]
        ops.append(mm_op(1, ranks[0] * big_i * big_o, i * o * ranks[k + 1], ranks[k], itemsize, stage=stage,
                         label=f"merge core {k}"))
        ops.append(copy_op(ranks[0] * big_i * big_o * i * o * ranks[k + 1], itemsize, stage, f"merge core {k}"))
        big_i, big_o = big_i * i, big_o * o
    return ops


def chain_ops(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], tokens: int,
              direction: str = "rtl", itemsize: int = 4) -> list[Op]:
    """Exact per-call ops of the permute-free GEMM chain (see :func:`fitformer.layers.planner.run_chain`).

    Right to left (``rtl``), step ``k = d..1`` multiplies the shared core matrix ``(r_{k-1} o_k) x (i_k r_k)``
    into a state of layout ``(T i_<k, i_k r_k, o_>k)``; left to right (``ltr``) multiplies ``(o_k r_k) x
    (r_{k-1} i_k)`` into ``(T o_<k, r_{k-1} i_k, i_>k)``. The end step has ``n = 1`` and runs as one GEMM.
    """
    d = len(in_modes)
    ops: list[Op] = []
    steps = range(d - 1, -1, -1) if direction == "rtl" else range(d)
    for k in steps:
        if direction == "rtl":
            batch = tokens * prod(in_modes[:k])
            m, kk, n = ranks[k] * out_modes[k], in_modes[k] * ranks[k + 1], prod(out_modes[k + 1:])
        else:
            batch = tokens * prod(out_modes[:k])
            m, kk, n = out_modes[k] * ranks[k + 1], ranks[k] * in_modes[k], prod(in_modes[k + 1:])
        if n == 1:  # (batch x k) @ (k x m): a plain GEMM
            ops.append(mm_op(1, batch, m, kk, itemsize, label=f"core {k}"))
        else:
            ops.append(mm_op(batch, m, n, kk, itemsize, shared_a=True, label=f"core {k}"))
    return ops


def core_prep_ops(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int],
                  itemsize: int = 4) -> list[Op]:
    """Ops that lay each core out as the matrix its chain step needs (a small permute per core)."""
    return [copy_op(ranks[k] * i * o * ranks[k + 1], itemsize, "prepare", f"layout core {k}")
            for k, (i, o) in enumerate(zip(in_modes, out_modes, strict=True))]


def tt_flops(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], tokens: int = 1,
             direction: str = "rtl") -> int:
    """Exact FLOPs of the unfused GEMM chain over ``tokens`` rows (multiply-adds count 2).

    Closed form (rtl): ``2 T sum_k (prod_{j<k} i_j) r_{k-1} o_k i_k r_k (prod_{j>k} o_j)``.
    """
    return sum(int(op["flops"]) for op in chain_ops(in_modes, out_modes, ranks, tokens, direction))


def runs_rebuilt(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], quantized: bool) -> bool:
    """Whether a TT-matrix layer runs as the dense GEMM on its rebuilt weight rather than as its chain (the
    one rule the cost model and the ONNX export share; ``ranks`` with their boundary 1s).

    In float, when the left-to-right chain does more arithmetic than the dense GEMM: the planner never picks
    such a chain. Quantized (8-bit inputs, float intermediates), unless the layer is the low rank
    ``(in, 1, ..)`` whose chain is cheaper: the export runs only that chain's first GEMM on integers, and any
    other chain would run in float on dequantized cores, so it becomes one integer GEMM on the rebuilt weight.
    """
    chain = tt_flops(in_modes, out_modes, ranks, 1, "ltr")
    dense = 2 * prod(in_modes) * prod(out_modes)
    if quantized:
        return chain >= dense or any(m != 1 for m in in_modes[1:])
    return chain > dense


def tt_bytes(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], tokens: int = 1,
             direction: str = "rtl", itemsize: int = 4) -> int:
    """Bytes moved by the unfused GEMM chain (each operand read once, each result written once)."""
    return sum(int(op["bytes"]) for op in chain_ops(in_modes, out_modes, ranks, tokens, direction, itemsize))


def batched_result_bytes(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int],
                         tokens: int = 1, direction: str = "rtl", itemsize: int = 4) -> int:
    """Bytes written by the chain's batched steps (kind ``bmm``), the ones that are not one plain GEMM.

    Why: a batched step runs many small GEMMs, or one GEMM between two transposed copies of its state
    (:func:`fitformer.layers.planner.run_chain`). A tensorization and its mirror image (both mode orders
    reversed) have the same FLOPs, bytes and parameters, but only one of them leaves its largest result,
    the layer output of a lopsided shape, to a plain GEMM: 2x2x192-768x2x2 writes its 3072-wide output
    in a batched step, 192x2x2-2x2x768 in a plain one, and runs several times faster at 2,048 tokens."""
    return _batched_bytes(chain_ops(in_modes, out_modes, ranks, tokens, direction, itemsize), itemsize)


def _batched_bytes(ops: list[Op], itemsize: int) -> int:
    return sum(int(op["batch"] * op["m"] * op["n"]) * itemsize for op in ops if op["kind"] == "bmm")


@dataclass(frozen=True)
class TTShape:
    """One tensorization with its ranks and exact costs at ``tokens`` rows (best of the two chain directions)."""

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    ranks: tuple[int, ...]
    params: int
    flops: int
    bytes: int
    direction: str
    tokens: int
    batched_bytes: int  # written by batched chain steps (see batched_result_bytes): the layout tie-break

    @property
    def num_cores(self) -> int:
        return len(self.in_modes)

    @classmethod
    def build(cls, in_modes: Sequence[int], out_modes: Sequence[int], rank: int | Sequence[int],
              tokens: int = 1, itemsize: int = 4) -> TTShape:
        ranks = bond_ranks(in_modes, out_modes, rank)
        ops = {dr: chain_ops(in_modes, out_modes, ranks, tokens, dr, itemsize) for dr in ("rtl", "ltr")}
        flops = {dr: sum(int(op["flops"]) for op in o) for dr, o in ops.items()}
        best = min(("rtl", "ltr"), key=flops.__getitem__)
        return cls(tuple(in_modes), tuple(out_modes), ranks, tt_params(in_modes, out_modes, ranks), flops[best],
                   sum(int(op["bytes"]) for op in ops[best]), best, tokens, _batched_bytes(ops[best], itemsize))


def _mode_tuples(n: int, d: int, max_pad: float, min_factor: int) -> Iterator[tuple[int, ...]]:
    seen = set()
    for m in range(n, int(n * (1 + max_pad)) + 1):
        for f in _factorizations(m, d, min_factor):
            if f not in seen:
                seen.add(f)
                yield f
        if m == n and seen and max_pad <= 0:
            break


def enumerate_shapes(in_features: int, out_features: int, rank: int | Sequence[int],
                     num_cores: Sequence[int] = (2, 3), tokens: int = 128, max_pad: float = 0.0,
                     min_factor: int = 2, max_candidates: int | None = None) -> list[TTShape]:
    """Candidate tensorizations of an ``in x out`` layer at ``rank``, with exact params, FLOPs and bytes,
    sorted by FLOPs at ``tokens`` rows (then params).

    ``num_cores`` lists the core counts ``d`` to try; ``max_pad`` admits sizes up to that much larger than
    the layer (for dimensions that factor badly); ``min_factor=1`` admits trivial factors (``d=2`` with
    modes ``(in, 1) x (1, out)`` is plain low rank).
    """
    shapes = []
    for d in num_cores:
        ins = list(_mode_tuples(in_features, d, max_pad, min_factor))
        outs = list(_mode_tuples(out_features, d, max_pad, min_factor))
        for im, om in itertools.product(ins, outs):
            shapes.append(TTShape.build(im, om, rank, tokens))
    shapes.sort(key=lambda s: (s.flops, s.params))
    return shapes[:max_candidates] if max_candidates else shapes


def choose_tensorization(in_features: int, out_features: int, rank: int | Sequence[int],
                         num_cores: Sequence[int] = (2, 3), tokens: int = 128, max_pad: float = 0.0,
                         objective: str = "flops", planner: Planner | None = None) -> TTShape:
    """The enumerated shape that minimises ``objective`` (``"flops"``, ``"params"`` or ``"bytes"``) at
    ``rank``; ties broken by the bytes the chain writes in batched steps (which of a shape and its mirror
    image runs faster, see :func:`batched_result_bytes`), then by the other two. Falls back to padding by up
    to 10% when the size factors badly.

    With a ``planner``, up to four shapes tied on ``objective`` (in practice a shape and its mirror image)
    are planned at ``tokens`` rows, as layers with a bias, and the one whose plan runs fastest wins
    (:meth:`~fitformer.layers.planner.Planner.fastest`: the plans timed head to head on the host when the
    planner measures). Why: the byte tie-break is a rule of thumb; at 2,048 tokens and
    rank 8, ``2x2x768-192x2x2`` ran 1.4x faster than ``768x2x2-2x2x192``, which it ranks first, while at rank
    32 it ran 7% slower (``docs/tensorized.md``)."""
    if objective not in ("flops", "params", "bytes"):
        raise UserError(f"unknown tensorization objective '{objective}'; use flops, params or bytes")
    shapes = enumerate_shapes(in_features, out_features, rank, num_cores, tokens, max_pad)
    if not shapes:
        shapes = enumerate_shapes(in_features, out_features, rank, num_cores, tokens, max(max_pad, 0.1))
    if not shapes:
        raise UserError(f"no tensorization of {in_features} x {out_features} into {tuple(num_cores)} cores; "
                        "give the modes explicitly")
    order = {"flops": ("flops", "batched_bytes", "bytes", "params"),
             "params": ("params", "flops", "batched_bytes", "bytes"),
             "bytes": ("bytes", "flops", "batched_bytes", "params")}[objective]
    ranked = sorted(shapes, key=lambda s: tuple(getattr(s, f) for f in order))
    ties = [s for s in ranked[:4] if getattr(s, objective) == getattr(ranked[0], objective)]
    if planner is None or len(ties) == 1:
        return ranked[0]
    from .planner import TTSpec  # the planner builds on this module's costs

    specs = [TTSpec(in_features, out_features, s.in_modes, s.out_modes, s.ranks, bias=True) for s in ties]
    return ties[planner.fastest(specs, tokens)]
