"""Contraction planner for TT-matrix layers: how to execute ``y = x W`` for a given shape and token count.

Candidate executions (:class:`Execution`):

- ``chain`` — the *fused einsum mapping*: every pairwise contraction of the TT network is mapped onto one
  GEMM (or one batched GEMM with a shared left operand) by grouping its indices into ``(batch, m, k, n)``
  blocks that are already contiguous, so the activations are only ever *reshaped* (views), never permuted.
  Right to left, step ``k`` multiplies core matrix ``(r_{k-1} o_k) x (i_k r_k)`` into state
  ``(T i_<k, i_k r_k, o_>k)`` and leaves ``(T i_<k, r_{k-1} o_k o_>k)``, which is exactly the next step's
  layout; left to right is the mirror image. A step whose state keeps ``n > 1`` trailing modes runs as a
  broadcast batched matmul (``b``), as one GEMM between two transposed copies of the state (``g``), or as
  one GEMM on the state as it lies against the core *expanded* by the identity on the trailing modes,
  ``kron(core.T, I_n)`` (``e``: ``n`` times the FLOPs of that step, no copies and no tiny matrices; built
  once and cached at inference). Adjacent cores may be *fused offline* (``groups``): a group is
  multiplied into one larger core before the chain runs (once, cached at inference), trading FLOPs for
  fewer and larger GEMMs. The two extreme groupings are the unfused chain and one group of all cores.
  Where the last step is one GEMM that writes whole output rows (one per token), the bias is added inside
  it (``addmm``, as ``nn.Linear`` does); otherwise it is added in place to the chain's output, or, in the
  variant with ``fold_bias`` (offered where the last step is one GEMM on plain rows: ``n == 1``, or an ``e``
  step, writing ``R > 1`` rows per token), *folded into that GEMM*: the
  output ``(T, out)`` is ``(T R, M)`` rows of it, so appending the ``R x R`` identity, repeated per token,
  to the state's columns and the bias, as ``R`` rows, to the core matrix adds it inside the GEMM (``K + R``
  instead of ``K``, two small copies). That saves a pass over a large output (at 2,048 tokens and 3,072
  outputs the add cost 1.2 of 4 ms) and costs more than it saves on small ones, so the planner times both.
  After a ``g`` step the bias is added in the copy that transposes the result back. A chain with ``halves``
  runs each GEMM on plain rows as one batched GEMM over the two halves of the rows, the matrix broadcast:
  MKL runs some tall, narrow GEMMs on one thread, a batch of two on both (:func:`_halves_mm`).
- ``einsum`` — a pairwise path found by ``opt_einsum`` (several optimizers; each path re-scored by the
  planner's cost function), each pair executed by opt_einsum on torch (``tensordot``: one GEMM per pair).
- ``reconstruct`` — rebuild the dense weight from the cores every call and run one GEMM (training).
- ``dense`` — inference only: the reconstructed weight is cached and the layer runs as ``nn.Linear`` does,
  so a TT layer whose factorization does not pay is no slower than the dense layer it replaced.

The planner scores candidates with a pluggable cost function ``cost(ops) -> seconds`` over the plain-data
steps of :mod:`fitformer.layers.tensorize` (default :class:`RooflineCost`: FLOPs at a size-dependent GEMM
efficiency + bytes over bandwidth + a per-kernel overhead). With ``measure=True`` (default unless
``FITFORMER_TT_MEASURE=0``) it then times the best few candidates and the dense reference on the host and
keeps the fastest, falling back to dense unless a factorized execution wins by ``margin``. Plans are cached
per (layer shape, ranks, token bucket, dtype, training); token counts are bucketed to powers of two.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import opt_einsum
import torch
import torch.nn.functional as F

from ..hardware.timing import measure as time_fn
from ..hardware.timing import measure_interleaved
from .tensorize import Op, chain_ops, copy_op, core_prep_ops, merge_ops, mm_op, prod

Hook = Callable[[torch.Tensor], torch.Tensor]
CostFn = Callable[[list[Op]], float]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class TTSpec:
    """Shape of a TT-matrix layer: features, modes (products may exceed the features: padding) and bond ranks."""

    in_features: int
    out_features: int
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    ranks: tuple[int, ...]
    bias: bool = False

    @property
    def in_padded(self) -> int:
        return prod(self.in_modes)

    @property
    def out_padded(self) -> int:
        return prod(self.out_modes)

    def fused(self, groups: tuple[tuple[int, ...], ...]) -> TTSpec:
        """The TT after fusing each group of adjacent cores into one (cached: every chain call asks)."""
        return _fused_spec(self, groups)


@functools.lru_cache(maxsize=4096)
def _fused_spec(spec: TTSpec, groups: tuple[tuple[int, ...], ...]) -> TTSpec:
    return TTSpec(spec.in_features, spec.out_features,
                  tuple(prod([spec.in_modes[k] for k in g]) for g in groups),
                  tuple(prod([spec.out_modes[k] for k in g]) for g in groups),
                  (1, *(spec.ranks[g[-1] + 1] for g in groups)), spec.bias)


@dataclass(frozen=True)
class Execution:
    """One way to run a TT layer (see the module docstring)."""

    kind: str  # "chain" | "einsum" | "reconstruct" | "dense"
    groups: tuple[tuple[int, ...], ...] = ()
    direction: str = "rtl"
    path: tuple[tuple[int, int], ...] = ()
    optimizer: str = ""
    # chain: per step in execution order, "b" = shared-operand BMM, "g" = matmul on the transposed state,
    # "e" = one GEMM against the core expanded by the identity on the trailing modes ("" = all "b")
    modes: str = ""
    fold_bias: bool = False  # chain: the bias added inside the last GEMM (see the module docstring)
    halves: bool = False  # chain: each GEMM on rows runs as one batched GEMM over the rows' two halves

    def describe(self) -> str:
        if self.kind == "chain":
            g = "|".join("".join(str(k) for k in grp) for grp in self.groups)
            extras = "; bias folded" * self.fold_bias + "; halves" * self.halves
            return f"chain[{self.direction}; {g}; {self.modes}{extras}]"
        if self.kind == "einsum":
            return f"einsum[{self.optimizer}]"
        return self.kind


# --------------------------------------------------------------------------------------------- execution


def merge_cores(cores: Sequence[torch.Tensor], hook: Hook = _identity) -> torch.Tensor:
    """Fuse adjacent cores ``(r0, i, o, r1)`` into one ``(r0, prod i, prod o, r_last)`` core."""
    c = cores[0]
    for nxt in cores[1:]:
        r0, big_i, big_o, r1 = c.shape
        _, i, o, r2 = nxt.shape
        m = (c.reshape(-1, r1) @ nxt.reshape(r1, -1)).reshape(r0, big_i, big_o, i, o, r2)
        c = hook(m.permute(0, 1, 3, 2, 4, 5).reshape(r0, big_i * i, big_o * o, r2))
    return c


def folded_bias_rows(exe: Execution, spec: TTSpec) -> int:
    """``R`` when the chain folds the bias into its last GEMM (output ``(T R, M)`` rows), else 0."""
    if exe.kind != "chain" or not spec.bias or not exe.fold_bias:
        return 0
    rows = last_gemm_rows(spec.fused(exe.groups), exe.direction, exe.modes)
    return rows if rows > 1 else 0  # one row per token: the unfolded chain adds the bias in its GEMM (addmm)


def last_gemm_rows(spec: TTSpec, direction: str, modes: str) -> int:
    """Output rows per token that the chain's last step writes when it is one GEMM on plain rows (``n == 1``
    or an ``e`` step), else 0: with 1 the bias goes inside that GEMM (``addmm``), with more it can be folded."""
    _, m, _, n = chain_steps(spec, direction)[-1]
    mode = modes[-1] if modes else "b"
    return spec.out_padded // (m * n) if n == 1 or mode == "e" else 0


def ends_transposed(spec: TTSpec, direction: str, modes: str) -> bool:
    """Whether the chain's last step is a ``g`` step with trailing modes, leaving a transposed view: the bias
    then rides on the one copy that lays the result out."""
    return (modes[-1] if modes else "b") == "g" and chain_steps(spec, direction)[-1][3] > 1


def _padded_bias(bias: torch.Tensor, spec: TTSpec) -> torch.Tensor:
    return F.pad(bias, (0, spec.out_padded - spec.out_features)) if spec.out_padded > spec.out_features else bias


def prepare(exe: Execution, spec: TTSpec, cores: Sequence[torch.Tensor], hook: Hook = _identity,
            bias: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The operands an execution needs from the cores (done once per call in training, cached at inference).

    A chain that folds the bias (:func:`folded_bias_rows`) gets two more operands: its last matrix with the
    bias appended as rows, and the ``R x R`` identity that selects them. Not while tracing.

    Without grad mode the operands are detached: a view of a parameter keeps ``requires_grad`` even under
    ``no_grad``, and ``torch.matmul`` then declines to fold a broadcast product into one GEMM (a ``b`` step
    of a 3072x768 layer at 128 tokens ran 5x slower, 1.5 vs 0.3 ms, than on the same cores detached)."""
    if not torch.is_grad_enabled():
        cores = [c.detach() for c in cores]
        bias = bias.detach() if bias is not None else None
    if exe.kind == "einsum":
        return list(cores)
    if exe.kind in ("reconstruct", "dense"):
        w = merge_cores(cores, hook).reshape(spec.in_padded, spec.out_padded)
        if exe.kind == "dense":  # the layout nn.Linear uses, unpadded
            w = w[: spec.in_features, : spec.out_features].t().contiguous()
        return [w]
    fused = [merge_cores([cores[k] for k in g], hook) if len(g) > 1 else cores[g[0]] for g in exe.groups]
    if exe.direction == "rtl":  # (r_{k-1} o_k) x (i_k r_k)
        mats = [c.permute(0, 2, 1, 3).reshape(c.shape[0] * c.shape[2], c.shape[1] * c.shape[3]) for c in fused]
    else:
        mats = [c.permute(2, 3, 0, 1).reshape(c.shape[2] * c.shape[3], c.shape[0] * c.shape[1]) for c in fused]
    for (core, m, k, n), mode in zip(chain_steps(spec.fused(exe.groups), exe.direction), exe.modes, strict=False):
        if mode == "e" and n > 1:  # kron(a.T, I_n), (k n) x (m n): the broadcast product as one GEMM
            eye = torch.eye(n, dtype=mats[core].dtype, device=mats[core].device)
            mats[core] = (mats[core].t()[:, None, :, None] * eye[None, :, None, :]).reshape(k * n, m * n)
    rows = folded_bias_rows(exe, spec) if bias is not None and not is_tracing() else 0
    if rows:
        core, _, _, n = chain_steps(spec.fused(exe.groups), exe.direction)[-1]
        last = mats[core] if n > 1 else mats[core].t()  # (K, M): the state's columns by the output's
        mats.append(torch.cat([last, _padded_bias(bias, spec).reshape(rows, -1)]))
        mats.append(torch.eye(rows, dtype=last.dtype, device=last.device))  # built per call it cost 40 of 250 us
    return mats


@functools.lru_cache(maxsize=4096)
def chain_steps(spec: TTSpec, direction: str) -> tuple[tuple[int, int, int, int], ...]:
    """``(core, m, k, n)`` of each chain step in execution order: the state is ``(rows, k, n)`` before the
    core's ``m x k`` matrix multiplies it (``n`` trailing modes not contracted yet; ``n == 1`` is a plain
    GEMM). Right to left the matrix is ``(r_{k-1} o_k) x (i_k r_k)``, left to right ``(o_k r_k) x (r_{k-1} i_k)``."""
    d, i, o, r = len(spec.in_modes), spec.in_modes, spec.out_modes, spec.ranks
    if direction == "rtl":
        return tuple((k, r[k] * o[k], i[k] * r[k + 1], prod(o[k + 1:])) for k in range(d - 1, -1, -1))
    return tuple((k, o[k] * r[k + 1], r[k] * i[k], prod(i[k + 1:])) for k in range(d))


Runner = Callable[[torch.Tensor], torch.Tensor]


def chain_runner(mats: Sequence[torch.Tensor], spec: TTSpec, direction: str, hook: Hook = _identity,
                 modes: str = "", bias: torch.Tensor | None = None, halves: bool = False) -> Runner:
    """The GEMM chain as a function of ``x`` of shape ``(T, prod in_modes)`` returning ``(T, prod out_modes)``,
    with every choice that does not depend on ``x`` made here, once (a cached layer calls it at each
    inference: at 128 tokens the choices cost 5-8 of a 75 us call).

    A step with ``n > 1`` runs as a batched matmul whose left operand (the core matrix) is broadcast across
    the batch (mode ``"b"``, no copy of the activations), as ``torch.matmul`` of the transposed state against
    the transposed core (mode ``"g"``: modelled as two copies around one large GEMM, run by torch as a batched
    GEMM on the strided view, which measured faster than the copy and one GEMM), or as one GEMM on the state
    as it lies against the expanded core that :func:`prepare` built (mode ``"e"``: ``n`` times the FLOPs, no
    copies).
    With two more matrices than cores, the last step runs on the first of them with the second, the
    identity, appended to the state: the bias folded in (:func:`prepare`);
    otherwise ``bias`` (padded to ``prod out_modes``) is added inside the last GEMM where that writes one
    whole output row per token (``addmm``, as ``nn.Linear`` does; a separate add cost 10 of 92 us at 128
    tokens), else to the result. With ``halves`` every GEMM on plain rows (``n == 1`` and ``e`` steps, the
    last GEMM with the bias) runs as :func:`_halves_mm`, not while tracing: an exported graph keeps plain
    GEMMs, whatever the row count. (``g`` and ``b`` steps are batched GEMMs already.)
    """
    steps = chain_steps(spec, direction)
    folded = len(mats) > len(steps)
    out = spec.out_padded
    mm = _halves_mm if halves and not is_tracing() else _mm
    fns: list[Runner] = []
    tail: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None  # (state, tokens, out) -> output
    for step, (core, _, kk, n) in enumerate(steps):
        a = mats[core]
        mode = modes[step] if modes else "b"
        last = step == len(steps) - 1
        if last and bias is not None and not folded and last_gemm_rows(spec, direction, modes) == 1:
            fns.append(functools.partial(_gemm, mm, kk * n, a if n > 1 else a.t(), bias))
            tail = _as_rows
        elif last and folded:  # [state | per-token identity] @ [matrix; bias rows]
            fns.append(functools.partial(_folded, mm, mats[-2], mats[-1], kk * n))
            tail = _as_rows
        elif n == 1:
            fns.append(functools.partial(_gemm, mm, kk, a.t(), None))
        elif mode == "e":
            fns.append(functools.partial(_gemm, mm, kk * n, a, None))
        elif mode == "g":
            fns.append(functools.partial(_transposed_gemm, kk, n, a.t()))
        else:  # a broadcast matmul, not bmm(a.expand(...)): that one's backward materialises a copy of the
            # core's gradient per batch row (10-25x slower), and its ONNX export materialises ``a`` per row
            fns.append(functools.partial(_broadcast_matmul, kk, n, a))
        if not last and hook is not _identity:
            fns.append(hook)
    if tail is None:
        if bias is None:
            tail = _as_rows
        elif ends_transposed(spec, direction, modes):  # one copy that lays the view out and adds the bias
            tail = functools.partial(_add_laid_out, bias.reshape(-1, steps[-1][1], steps[-1][3]))
        else:
            tail = functools.partial(_add_in_place, bias)

    def call(x: torch.Tensor) -> torch.Tensor:
        s = x
        for fn in fns:
            s = fn(s)
        return tail(s, x.shape[0], out)
    return call


MatMul = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _mm(a: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``rows @ a`` (plus ``bias``) as one GEMM."""
    return rows @ a if bias is None else torch.addmm(bias, rows, a)


def _halves_mm(a: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``rows @ a`` (plus ``bias``) as one batched GEMM over the two halves of ``rows``, ``a`` broadcast.

    Why: MKL runs some tall, narrow GEMMs on one of the host's threads. On a 2-core host, ``(8192, 16) @
    (16, 768)`` took 1.40 ms as one GEMM and 0.75 ms as two halves in one ``bmm``, which spreads the batch over
    the threads; ``(8192, 8) @ (8, 384)`` gained nothing. So the planner times both (``Execution.halves``).
    An odd row count runs as one GEMM."""
    n = rows.shape[0]
    if n % 2:
        return _mm(a, rows, bias)
    halves = rows.reshape(2, n // 2, rows.shape[1])
    b = a.expand(2, *a.shape)  # the backward sums two copies of a's gradient: two, not one per row
    out = torch.bmm(halves, b) if bias is None else torch.baddbmm(bias, halves, b)
    return out.reshape(n, a.shape[1])


def _gemm(mm: MatMul, k: int, a: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
    return mm(a, s.reshape(-1, k), bias)


def _transposed_gemm(k: int, n: int, at: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.matmul(s.reshape(-1, k, n).transpose(1, 2), at).transpose(1, 2)


def _broadcast_matmul(k: int, n: int, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, s.reshape(-1, k, n))


def _folded(mm: MatMul, w: torch.Tensor, eye: torch.Tensor, k: int, s: torch.Tensor) -> torch.Tensor:
    rows = eye.shape[0]
    tokens = s.numel() // (rows * k)
    wide = s.new_empty(tokens, rows, k + rows)  # two copies into one buffer beat torch.cat
    wide[:, :, :k] = s.reshape(tokens, rows, k)
    wide[:, :, k:] = eye
    return mm(w, wide.reshape(-1, w.shape[0]), None)


def _as_rows(s: torch.Tensor, tokens: int, out: int) -> torch.Tensor:
    return s.reshape(tokens, out)


def _add_in_place(bias: torch.Tensor, s: torch.Tensor, tokens: int, out: int) -> torch.Tensor:
    return s.reshape(tokens, out).add_(bias)  # the chain's own fresh buffer: no second output-sized one


def _add_laid_out(bias: torch.Tensor, s: torch.Tensor, tokens: int, out: int) -> torch.Tensor:
    m, n = bias.shape[-2:]
    return torch.add(s.reshape(tokens, -1, m, n), bias).reshape(tokens, out)


def run_chain(x: torch.Tensor, mats: Sequence[torch.Tensor], spec: TTSpec, direction: str,
              hook: Hook = _identity, modes: str = "", bias: torch.Tensor | None = None,
              halves: bool = False) -> torch.Tensor:
    """The GEMM chain on ``x`` (see :func:`chain_runner`)."""
    return chain_runner(mats, spec, direction, hook, modes, bias, halves)(x)


def _einsum_equation(d: int) -> str:
    letters = iter(string.ascii_letters.replace("t", ""))
    ins = [next(letters) for _ in range(d)]
    outs = [next(letters) for _ in range(d)]
    bonds = [next(letters) for _ in range(d - 1)]
    terms = []
    for k in range(d):
        left = bonds[k - 1] if k > 0 else ""
        right = bonds[k] if k < d - 1 else ""
        terms.append(f"{left}{ins[k]}{outs[k]}{right}")
    return f"t{''.join(ins)}," + ",".join(terms) + f"->t{''.join(outs)}"


def einsum_operand_shapes(spec: TTSpec, tokens: int) -> list[tuple[int, ...]]:
    d, r = len(spec.in_modes), spec.ranks
    shapes = [(tokens, *spec.in_modes)]
    for k in range(d):
        s = (r[k],) if k > 0 else ()
        shapes.append((*s, spec.in_modes[k], spec.out_modes[k], *((r[k + 1],) if k < d - 1 else ())))
    return shapes


def einsum_operands(x: torch.Tensor, spec: TTSpec, cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``x`` and the cores with their unit end bonds dropped, as ``_einsum_equation`` expects."""
    ops = [x.reshape(x.shape[0], *spec.in_modes)]
    d = len(cores)
    for k, c in enumerate(cores):
        if k == 0:
            c = c.squeeze(0)
        if k == d - 1:
            c = c.squeeze(-1)
        ops.append(c)
    return ops


@functools.lru_cache(maxsize=1024)
def einsum_steps(spec: TTSpec, path: tuple[tuple[int, int], ...],
                 tokens: int = 16) -> list[tuple[tuple[int, ...], str]]:
    """(operand positions, einsum string) of each pairwise step of ``path`` (the strings do not depend on
    the token count, which only sizes the operands)."""
    eq = _einsum_equation(len(spec.in_modes))
    _, info = opt_einsum.contract_path(eq, *einsum_operand_shapes(spec, tokens), shapes=True,
                                       optimize=[tuple(p) for p in path])
    return [(tuple(step[0]), step[2]) for step in info.contraction_list]


@functools.lru_cache(maxsize=4096)
def _pair_expression(eq: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]):
    """opt_einsum's compiled expression for one pairwise step: it maps the pair onto ``tensordot`` (one GEMM
    after reshapes) and leaves the result as a transposed view, which ``torch.einsum`` does not (it copies
    into the output order, often several times slower)."""
    return opt_einsum.contract_expression(eq, shape_a, shape_b, optimize=[(0, 1)])


def run_einsum(x: torch.Tensor, cores: Sequence[torch.Tensor], spec: TTSpec,
               steps: Sequence[tuple[tuple[int, ...], str]], hook: Hook = _identity) -> torch.Tensor:
    """Pairwise contraction along a precomputed path; every intermediate passes through ``hook``."""
    operands = einsum_operands(x, spec, cores)
    for n, (inds, eq) in enumerate(steps):
        a, b = (operands.pop(i) for i in inds)
        out = _pair_expression(eq, tuple(a.shape), tuple(b.shape))(a, b, backend="torch")
        operands.append(hook(out) if n < len(steps) - 1 else out)
    return operands[0].reshape(x.shape[0], spec.out_padded)


def runner(exe: Execution, spec: TTSpec, prepared: Sequence[torch.Tensor], hook: Hook = _identity,
           steps: Sequence[tuple[tuple[int, ...], str]] | None = None, bias: torch.Tensor | None = None) -> Runner:
    """``exe`` as a function of ``x`` of shape ``(T, in_features)`` returning ``(T, out_features)`` with the
    bias added; built once per cached plan at inference (see :func:`chain_runner`)."""
    if exe.kind == "dense":
        return functools.partial(_linear, prepared[0], bias)
    pad_in = spec.in_padded - spec.in_features
    cut_out = spec.out_features if spec.out_padded > spec.out_features else 0
    if exe.kind == "chain":
        chain = chain_runner(prepared, spec.fused(exe.groups), exe.direction, hook, exe.modes,
                             None if bias is None else _padded_bias(bias, spec), exe.halves)
        post = None
    else:
        if exe.kind == "reconstruct":
            chain = functools.partial(torch.matmul, other=prepared[0])
        else:
            steps = steps if steps is not None else einsum_steps(spec, exe.path)
            chain = functools.partial(run_einsum, cores=prepared, spec=spec, steps=steps, hook=hook)
        post = bias

    def call(x: torch.Tensor) -> torch.Tensor:
        y = chain(F.pad(x, (0, pad_in)) if pad_in else x)
        if cut_out:
            y = y[:, :cut_out]
        if post is None:
            return y
        # the product is a fresh buffer of our own: adding in place saves writing a second output-sized one
        return y.add_(post) if y.is_contiguous() else y + post
    return call


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, bias)


def run(exe: Execution, x: torch.Tensor, prepared: Sequence[torch.Tensor], spec: TTSpec, hook: Hook = _identity,
        steps: Sequence[tuple[tuple[int, ...], str]] | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Execute ``exe`` on ``x`` of shape ``(T, in_features)``; returns ``(T, out_features)`` with bias added."""
    return runner(exe, spec, prepared, hook, steps, bias)(x)


# --------------------------------------------------------------------------------------------- costs


def _einsum_step_ops(eq: str, sizes: dict[str, int], itemsize: int) -> list[Op]:
    inputs, out = eq.split("->")
    a, b = inputs.split(",")
    size = lambda idx: prod([sizes[c] for c in idx])  # noqa: E731
    batch = size([c for c in a if c in b and c in out])
    k = size([c for c in a if c in b and c not in out])
    m = size([c for c in a if c not in b])
    n = size([c for c in b if c not in a])
    return [mm_op(batch, m, n, k, itemsize, label=eq), copy_op(size(out), itemsize, label=f"layout {eq}")]


def execution_ops(exe: Execution, spec: TTSpec, tokens: int, itemsize: int = 4) -> list[Op]:
    """Plain-data steps of ``exe`` at ``tokens`` rows (``stage`` tells core-only work from per-call work)."""
    if exe.kind == "dense":
        return [*merge_ops(spec.in_modes, spec.out_modes, spec.ranks, itemsize),
                mm_op(1, tokens, spec.out_features, spec.in_features, itemsize, label="dense")]
    bias_add = [copy_op(tokens * spec.out_padded, itemsize, label="bias")] if spec.bias else []
    if exe.kind == "reconstruct":
        return [*merge_ops(spec.in_modes, spec.out_modes, spec.ranks, itemsize),
                mm_op(1, tokens, spec.out_padded, spec.in_padded, itemsize, label="dense"), *bias_add]
    if exe.kind == "einsum":
        eq = _einsum_equation(len(spec.in_modes))
        shapes = einsum_operand_shapes(spec, tokens)
        terms = eq.split("->")[0].split(",")
        sizes = {c: s for term, shp in zip(terms, shapes, strict=True) for c, s in zip(term, shp, strict=True)}
        return [op for _, step in einsum_steps(spec, exe.path, tokens)
                for op in _einsum_step_ops(step, sizes, itemsize)] + bias_add
    ops: list[Op] = []
    for g in exe.groups:
        if len(g) > 1:
            sub = [spec.ranks[g[0]], *(spec.ranks[k + 1] for k in g)]
            ops += merge_ops([spec.in_modes[k] for k in g], [spec.out_modes[k] for k in g], sub, itemsize)
    f = spec.fused(exe.groups)
    ops += core_prep_ops(f.in_modes, f.out_modes, f.ranks, itemsize)
    steps = chain_ops(f.in_modes, f.out_modes, f.ranks, tokens, exe.direction, itemsize)
    folded = folded_bias_rows(exe, spec)
    for step, op in enumerate(steps):
        mode = exe.modes[step] if exe.modes else "b"
        b, m, n, k = (int(op[key]) for key in ("batch", "m", "n", "k"))
        if folded and step == len(steps) - 1:  # the state widened by the identity, the bias in the GEMM
            _, m, k, n = chain_steps(f, exe.direction)[-1]
            if n > 1:
                ops.append(copy_op(k * n * m * n, itemsize, "prepare", f"expand {op['label']}"))
            rows = tokens * folded
            ops += [copy_op(rows * k * n, itemsize, label=f"widen {op['label']}"),
                    copy_op(rows * folded, itemsize, label=f"bias columns {op['label']}"),
                    mm_op(1, rows, m * n, k * n + folded, itemsize, label=f"{op['label']} with bias")]
        elif n > 1 and mode == "g":
            ops += [copy_op(b * k * n, itemsize, label=f"transpose {op['label']}"),
                    mm_op(1, b * n, m, k, itemsize, label=str(op["label"])),
                    copy_op(b * m * n, itemsize, label=f"transpose {op['label']}")]
        elif n > 1 and mode == "e":
            ops += [copy_op(k * n * m * n, itemsize, "prepare", f"expand {op['label']}"),
                    mm_op(1, b, m * n, k * n, itemsize, label=f"{op['label']} expanded")]
        else:
            ops.append(op)
    in_gemm = last_gemm_rows(f, exe.direction, exe.modes) == 1  # addmm, see chain_runner
    if spec.bias and not folded and not in_gemm and not ends_transposed(f, exe.direction, exe.modes):
        ops += bias_add  # after a "g" step the bias rides on the copy that transposes the result back
    return ops


def _call_ops(exe: Execution, spec: TTSpec, tokens: int, training: bool, itemsize: int) -> list[Op]:
    """The ops one call pays: in training the core work too, since the cores change every step."""
    ops = execution_ops(exe, spec, tokens, itemsize)
    return [{**op, "stage": "run"} for op in ops] if training else ops


@dataclass
class RooflineCost:
    """Default cost: ``sum(flops / (peak * eff) + bytes / bandwidth + overhead)`` over the ops.

    ``eff`` falls with small GEMM dimensions (a GEMM with a dimension of 8 runs far below peak); batched
    GEMMs with a shared operand pay a further factor. :meth:`calibrate` fits the three constants on the host
    with three micro-benchmarks (about a tenth of a second).
    """

    peak_flops: float = 5e10
    bandwidth: float = 1e10
    overhead_s: float = 1e-5
    bmm_penalty: float = 0.7
    include_prepare: bool = False

    def efficiency(self, op: Op) -> float:
        eff = 1.0
        for dim in (op["m"], op["n"], op["k"]):
            eff *= min(1.0, int(dim) / 64) ** 0.5
        return eff * (self.bmm_penalty if op["kind"] == "bmm" else 1.0)

    def __call__(self, ops: list[Op]) -> float:
        total = 0.0
        for op in ops:
            if op["stage"] == "prepare" and not self.include_prepare:
                continue
            compute = int(op["flops"]) / (self.peak_flops * max(self.efficiency(op), 1e-3))
            total += compute + int(op["bytes"]) / self.bandwidth + self.overhead_s
        return total

    @classmethod
    def calibrate(cls, **kwargs) -> RooflineCost:
        a = torch.randn(512, 512)
        big = torch.randn(4_000_000)
        tiny = torch.randn(4, 4)
        t_gemm = time_fn(lambda: a @ a, warmup=2, repeats=5).median_ms / 1e3
        t_copy = time_fn(lambda: big.clone(), warmup=2, repeats=5).median_ms / 1e3
        t_tiny = time_fn(lambda: tiny @ tiny, warmup=5, repeats=50).median_ms / 1e3
        return cls(peak_flops=2 * 512**3 / t_gemm, bandwidth=2 * 4 * big.numel() / t_copy,
                   overhead_s=max(t_tiny, 1e-6), **kwargs)


# --------------------------------------------------------------------------------------------- planning


@functools.lru_cache(maxsize=1024)
def unfused_chain(spec: TTSpec) -> Execution:
    """The chain through every core in turn (no fused cores), in the direction with fewer FLOPs.

    Why: its intermediates are the activation states between cores and nothing else, whatever the token
    count, so a quantizer on them sees the same tensors in training, at inference and in an ONNX export."""
    groups = tuple((k,) for k in range(len(spec.in_modes)))
    flops = {dr: sum(op["flops"] for op in chain_ops(spec.in_modes, spec.out_modes, spec.ranks, 1, dr))
             for dr in ("rtl", "ltr")}
    return Execution("chain", groups=groups, direction=min(flops, key=flops.__getitem__))


def token_bucket(tokens: int) -> int:
    """Token counts share a plan within a power-of-two bucket (16, 32, ..., rounded up)."""
    return max(16, 1 << max(0, int(tokens) - 1).bit_length())


def groupings(d: int) -> list[tuple[tuple[int, ...], ...]]:
    """All ways to split cores ``0..d-1`` into contiguous groups (at least two groups)."""
    out = []
    for cuts in itertools.product((False, True), repeat=d - 1):
        if not any(cuts):
            continue
        groups, cur = [], [0]
        for k, cut in enumerate(cuts, start=1):
            if cut:
                groups.append(tuple(cur))
                cur = [k]
            else:
                cur.append(k)
        groups.append(tuple(cur))
        out.append(tuple(groups))
    return out


def _einsum_candidates(spec: TTSpec, tokens: int) -> list[Execution]:
    eq = _einsum_equation(len(spec.in_modes))
    shapes = einsum_operand_shapes(spec, tokens)
    found: dict[tuple, Execution] = {}
    optimizers = ["greedy", "dp", "optimal"] if len(spec.in_modes) <= 4 else ["greedy", "dp"]
    for opt in optimizers:
        for minimize in ("flops", "size"):
            optimize = opt_einsum.DynamicProgramming(minimize=minimize) if opt == "dp" else opt
            if opt != "dp" and minimize != "flops":
                continue
            path, _ = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=optimize)
            key = tuple(tuple(p) for p in path)
            found.setdefault(key, Execution("einsum", path=key, optimizer=f"{opt}-{minimize}"))
    return list(found.values())


def is_tracing() -> bool:
    """True inside torch.compile/torch.export/ONNX export or TorchScript tracing: no timing, no caching."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


@dataclass
class Planner:
    """Chooses an :class:`Execution` per (layer shape, ranks, token bucket, dtype, training) and caches it.

    ``cost`` maps a list of ops to seconds (default: :class:`RooflineCost`, calibrated on first use when
    measuring); ``measure`` times the ``top_k`` cheapest candidates, the cheapest of each kind (left-to-right
    chain, right-to-left chain, einsum path) and the dense reference on the host;
    the two fastest chains are then timed again in twice the rounds beside their twins on the halves of the
    rows (``Execution.halves``, kept only where faster than their chain by ``margin``), the fastest execution
    and the reference, and the fastest of these wins;
    every timing round runs the executions in a fresh order, each first untimed for ``settle_seconds`` (at
    most ``settle_calls`` calls): the execution timed right after the dense reference ran up to 1.6x slower
    for several calls, and a fixed order always handed that wake to the cost model's favourite (in four
    repeated plannings of six ``bench_tt`` rows, the plans chosen ran 5.3% slower on average than the
    fastest of them, 2.0% with the fresh order and settling);
    ``margin`` is how much faster a factorized execution must be to beat the reference; candidates estimated
    at more than ``explore`` times the reference's cost, or doing more FLOPs per call than the dense GEMM,
    are not timed.
    """

    cost: CostFn | None = None
    measure: bool | None = None
    top_k: int = 8
    margin: float = 0.05
    explore: float = 2.0
    rounds: int = 3
    min_seconds: float = 0.002  # per execution and round: a 0.1 ms call gets ~20 samples, not 3
    max_seconds: float = 0.5
    settle_seconds: float = 0.01
    settle_calls: int = 5
    cache: dict[tuple, tuple[Execution, dict[str, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.measure is None:
            self.measure = os.environ.get("FITFORMER_TT_MEASURE", "1") != "0"

    def cost_fn(self) -> CostFn:
        if self.cost is None:
            if is_tracing():  # no timing while a graph is being captured
                return RooflineCost()
            self.cost = RooflineCost.calibrate() if self.measure else RooflineCost()
        return self.cost

    def candidates(self, spec: TTSpec, tokens: int, training: bool) -> list[Execution]:
        """Every execution this planner considers for ``spec`` (while tracing, no opt_einsum paths: their
        search is not traceable, and the chains cover the same contractions)."""
        cands = []
        for g in groupings(len(spec.in_modes)):
            f = spec.fused(g)
            for dr in ("rtl", "ltr"):
                n_steps = len(chain_ops(f.in_modes, f.out_modes, f.ranks, 1, dr))
                cands += [Execution("chain", groups=g, direction=dr, modes="".join(m), fold_bias=fold)
                          for m in itertools.product("bge", repeat=n_steps) for fold in (False, True)]
        cands = [c for c in cands if self._distinct(c, spec)]
        if not is_tracing():
            cands += _einsum_candidates(spec, tokens)
        cands.append(Execution("reconstruct") if training else Execution("dense"))
        return cands

    @staticmethod
    def _distinct(exe: Execution, spec: TTSpec) -> bool:
        """Drop chains whose mode letters only differ on plain-GEMM steps (``n == 1``, where they are unused),
        expanded steps whose matrix would outgrow the dense weight (slower than the dense GEMM alone), and
        ``fold_bias`` where there is no bias or the last step cannot take it."""
        if exe.fold_bias and not folded_bias_rows(exe, spec):
            return False
        f = spec.fused(exe.groups)
        for mode, (_, m, k, n) in zip(exe.modes, chain_steps(f, exe.direction), strict=True):
            if (n == 1 and mode != "b") or (mode == "e" and m * k * n * n > spec.in_padded * spec.out_padded):
                return False
        return True

    def scores(self, spec: TTSpec, tokens: int, training: bool, itemsize: int = 4) -> list[tuple[float, Execution]]:
        """Estimated seconds of every candidate, cheapest first."""
        cost = self.cost_fn()
        scored = [(cost(_call_ops(exe, spec, tokens, training, itemsize)), exe)
                  for exe in self.candidates(spec, tokens, training)]
        scored.sort(key=lambda se: se[0])
        return scored

    def plan(self, spec: TTSpec, tokens: int, dtype: torch.dtype = torch.float32, training: bool = False) -> Execution:
        """The execution for ``tokens`` rows (bucketed), from the cache when planned before."""
        bucket = token_bucket(tokens)
        key = (spec, bucket, dtype, training)
        if key in self.cache:
            return self.cache[key][0]
        itemsize = torch.empty((), dtype=dtype).element_size()
        scored = self.scores(spec, bucket, training, itemsize)
        if not self.measure or is_tracing():
            choice = scored[0][1]
            if not is_tracing():
                self.cache[key] = (choice, {})
            return choice
        reference = Execution("reconstruct") if training else Execution("dense")
        ref_cost = next(c for c, exe in scored if exe == reference)
        # only time candidates the cost model does not rule out (some chains build huge intermediates) and
        # that do less arithmetic per call than the dense GEMM (timing noise must not pick a loser)
        dense_flops = 2 * bucket * spec.in_features * spec.out_features
        eligible = [exe for c, exe in scored
                    if exe.kind not in ("dense", "reconstruct") and c <= self.explore * ref_cost
                    and self._run_flops(exe, spec, bucket, training) < dense_flops]
        # the cost model cannot see strided copies well: the cheapest of each kind and direction is timed too
        firsts = {(exe.kind, exe.direction if exe.kind == "chain" else ""): exe for exe in reversed(eligible)}
        factorized = list(dict.fromkeys([*eligible[: self.top_k], *firsts.values()]))
        times = self.time([reference, *factorized], spec, bucket, dtype, training)
        # GEMMs on the halves of the rows (Execution.halves) do what a chain does in other kernels: the two
        # fastest chains are timed again, in twice the rounds, beside their twins, the fastest execution and
        # the reference; a twin replaces its chain only where it is faster by the margin (near ties are noise)
        ranked = sorted(factorized, key=lambda e: times[e.describe()])
        chains = [e for e in ranked if e.kind == "chain"][:2]
        if chains:
            twins = [replace(e, halves=True) for e in chains]
            factorized = list(dict.fromkeys([ranked[0], *chains, *twins]))
            times = {**times, **self.time([reference, *factorized], spec, bucket, dtype, training, 2 * self.rounds)}
            factorized = [e for e in factorized if not e.halves or
                          times[e.describe()] < (1 - self.margin) * times[replace(e, halves=False).describe()]]
        best = min(factorized, key=lambda e: times[e.describe()], default=reference)
        if times[best.describe()] > (1 - self.margin) * times[reference.describe()]:
            best = reference
        self.cache[key] = (best, times)
        return best

    @staticmethod
    def _run_flops(exe: Execution, spec: TTSpec, tokens: int, training: bool) -> int:
        ops = execution_ops(exe, spec, tokens)
        return sum(int(op["flops"]) for op in ops if training or op["stage"] == "run")

    def planned_ms(self, spec: TTSpec, tokens: int, dtype: torch.dtype = torch.float32,
                   training: bool = False) -> float:
        """Milliseconds of the plan for ``tokens`` rows (planned now if it was not): as timed when the plan was
        made, or as the cost model estimates it when the planner does not measure."""
        exe = self.plan(spec, tokens, dtype, training)
        measured = self.timings(spec, tokens, dtype, training).get(exe.describe())
        if measured is not None:
            return measured
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.cost_fn()(_call_ops(exe, spec, token_bucket(tokens), training, itemsize)) * 1e3

    def timings(self, spec: TTSpec, tokens: int, dtype: torch.dtype = torch.float32,
                training: bool = False) -> dict[str, float]:
        """Milliseconds measured when the plan for this bucket was made (empty if not measured)."""
        return self.cache.get((spec, token_bucket(tokens), dtype, training), (None, {}))[1]

    def time(self, executions: Sequence[Execution], spec: TTSpec, tokens: int, dtype: torch.dtype,
             training: bool, rounds: int | None = None) -> dict[str, float]:
        """Milliseconds of each execution on random data of this shape (forward + backward when training).

        The executions are timed in interleaved rounds, so a burst of load from other processes cannot
        favour one of them, and each keeps the median of its round medians: the fastest time flatters an
        execution that allocates large intermediates, whose calls are fast only when the allocator hands
        back memory that is already mapped (in ``bench_tt.py`` on a 2-core VM the fastest time chose a chain
        that ran 1.55x slower than the dense GEMM it replaced).
        """
        fns = {exe.describe(): _timed_call(exe, spec, tokens, dtype, training) for exe in executions}
        return self._interleaved(fns, rounds or self.rounds)

    def fastest(self, specs: Sequence[TTSpec], tokens: int, dtype: torch.dtype = torch.float32,
                training: bool = False) -> int:
        """Index of the layer shape whose plan for ``tokens`` rows runs fastest: the plans are timed head to
        head in interleaved rounds (three times the planner's), since tied shapes often differ by 10-20%,
        within the spread of plans timed one after the other; modelled when the planner does not measure."""
        plans = [self.plan(spec, tokens, dtype, training) for spec in specs]
        if not self.measure or len(specs) == 1:
            return min(range(len(specs)), key=lambda i: self.planned_ms(specs[i], tokens, dtype, training))
        bucket = token_bucket(tokens)
        fns = {str(i): _timed_call(exe, spec, bucket, dtype, training)
               for i, (spec, exe) in enumerate(zip(specs, plans, strict=True))}
        times = self._interleaved(fns, 3 * self.rounds)
        return min(range(len(specs)), key=lambda i: times[str(i)])

    def _interleaved(self, fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
        times = measure_interleaved(list(fns.values()), rounds=rounds, repeats=3, max_seconds=self.max_seconds,
                                    min_seconds=self.min_seconds, warmup=1, settle_seconds=self.settle_seconds,
                                    settle_calls=self.settle_calls, shuffle=True)
        return dict(zip(fns, times, strict=True))


def _timed_call(exe: Execution, spec: TTSpec, tokens: int, dtype: torch.dtype,
                training: bool) -> Callable[[], None]:
    """One call of ``exe`` on seeded random cores and input of this shape, operands prepared beforehand at
    inference (as the layer caches them) and per call in training (forward and backward)."""
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(spec.ranks[k], i, o, spec.ranks[k + 1], generator=gen, dtype=dtype) / math.sqrt(i)
             for k, (i, o) in enumerate(zip(spec.in_modes, spec.out_modes, strict=True))]
    x = torch.randn(tokens, spec.in_features, generator=gen, dtype=dtype)
    bias = torch.randn(spec.out_features, generator=gen, dtype=dtype) if spec.bias else None
    steps = einsum_steps(spec, exe.path) if exe.kind == "einsum" else None
    if training:
        for c in [*cores, *([bias] if bias is not None else [])]:
            c.requires_grad_(True)

        def train_call() -> None:
            run(exe, x, prepare(exe, spec, cores, bias=bias), spec, steps=steps, bias=bias).sum().backward()
        return train_call
    with torch.no_grad():
        prepared = prepare(exe, spec, cores, bias=bias)

    def call() -> None:
        with torch.no_grad():
            run(exe, x, prepared, spec, steps=steps, bias=bias)
    return call


_DEFAULT: Planner | None = None


def default_planner() -> Planner:
    """The process-wide planner that TT layers use unless given their own."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Planner()
    return _DEFAULT


def set_default_planner(planner: Planner | None) -> None:
    """Replace the process-wide planner (``None`` resets it), e.g. with a hardware cost model's."""
    global _DEFAULT
    _DEFAULT = planner
