"""TT-matrix layers (``TTLinear``, ``TTEmbedding``) and their TT-SVD initialisation from dense weights.

A TT-matrix (Novikov et al. 2015, "Tensorizing Neural Networks", eq. 3) stores an ``in x out`` weight as
cores ``G_k`` of shape ``(r_{k-1}, i_k, o_k, r_k)``, ``r_0 = r_d = 1``, with
``W[(i_1..i_d), (o_1..o_d)] = G_1[:, i_1, o_1, :] @ ... @ G_d[:, i_d, o_d, :]``. Sizes that factor badly are
zero-padded to ``prod(modes)``; ``d = 2`` with modes ``(in, 1) x (1, out)`` is plain low rank.

``TTLinear.forward`` asks a :class:`~fitformer.layers.planner.Planner` how to contract for the current token
count (chain of GEMMs, einsum path, or the reconstructed dense weight) and caches the core-only work when
the cores do not require gradients.

Hooks for quantization (and any other wrapper):

- ``intermediate_quant: nn.Module | None`` (default ``None`` = identity): every intermediate result of the
  contraction — each partial product of the activation chain, each fused core, the reconstructed weight —
  passes through it; the layer output does not. Setting it disables the inference cache of core work.
- ``effective_cores() -> list[Tensor]``: the cores as used by ``forward``. Override it in a subclass, or
  parametrize ``layer.cores`` entries with ``torch.nn.utils.parametrize.register_parametrization(layer.cores,
  "0", FakeQuant())`` — either way forward sees the transformed cores, and the inference cache is
  bypassed.
- ``cost_ops(tokens, training=False) -> list[dict]``: the planned execution's steps as plain data (see
  :mod:`fitformer.layers.tensorize`), for cost models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UserError
from .planner import (
    Execution,
    Planner,
    TTSpec,
    default_planner,
    execution_ops,
    is_tracing,
    merge_cores,
    prepare,
    run,
    runner,
    token_bucket,
)
from .tensorize import Op, balanced_modes, bond_ranks, prod, validate_shape


def _svd(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD; a very wide or tall matrix is first reduced by QR (several times faster, same result)."""
    m, n = c.shape
    if n > 2 * m:
        q, r = torch.linalg.qr(c.mT)
        u, s, vh = torch.linalg.svd(r.mT, full_matrices=False)
        return u, s, vh @ q.mT
    if m > 2 * n:
        q, r = torch.linalg.qr(c)
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        return q @ u, s, vh
    return torch.linalg.svd(c, full_matrices=False)


def tt_svd(matrix: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int],
           max_rank: int | Sequence[int] | None = None,
           rel_error: float | None = None) -> tuple[list[torch.Tensor], float]:
    """TT-SVD of an ``(prod in_modes) x (prod out_modes)`` matrix into TT-matrix cores (Oseledets 2011, Alg. 1).

    Each of the ``d - 1`` truncated SVDs drops singular values whose tail norm stays within
    ``rel_error * ||W|| / sqrt(d - 1)`` (so the total relative error is at most ``rel_error``) and keeps at
    most ``max_rank`` (an int, or one per bond). Returns the cores (in the matrix's dtype) and the measured
    relative Frobenius error of the reconstruction. With neither limit the decomposition is exact.
    """
    d = len(in_modes)
    if matrix.shape != (prod(in_modes), prod(out_modes)):
        raise UserError(f"matrix of shape {tuple(matrix.shape)} does not match modes {tuple(in_modes)} x "
                        f"{tuple(out_modes)}")
    if rel_error is not None and not 0 <= rel_error < 1:
        raise UserError(f"rel_error must be in [0, 1), got {rel_error}")
    caps = [None] * (d - 1) if max_rank is None else bond_ranks(in_modes, out_modes, max_rank)[1:-1]
    w = matrix.detach().to(torch.float64)
    perm = [p for k in range(d) for p in (k, d + k)]
    c = w.reshape(*in_modes, *out_modes).permute(*perm).reshape(in_modes[0] * out_modes[0], -1)
    delta = (rel_error or 0.0) * torch.linalg.norm(w).item() / math.sqrt(max(d - 1, 1))
    cores, r_prev = [], 1
    for k in range(d - 1):
        c = c.reshape(r_prev * in_modes[k] * out_modes[k], -1)
        u, s, vh = _svd(c)
        tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0]))  # tail[j] = ||s[j:]||
        keep = int((tail > delta).sum().item()) if delta > 0 else int((s > 0).sum().item())
        keep = max(1, keep if caps[k] is None else min(keep, caps[k]))
        cores.append(u[:, :keep].reshape(r_prev, in_modes[k], out_modes[k], keep))
        c = s[:keep, None] * vh[:keep]
        r_prev = keep
    cores.append(c.reshape(r_prev, in_modes[-1], out_modes[-1], 1))
    rebuilt = merge_cores(cores).reshape(w.shape)
    err = (torch.linalg.norm(rebuilt - w) / torch.linalg.norm(w).clamp_min(1e-300)).item()
    return [g.to(matrix.dtype).contiguous() for g in cores], err


def _resolve_modes(features: int, modes: Sequence[int] | None, num_cores: int) -> tuple[int, ...]:
    return tuple(int(m) for m in modes) if modes is not None else balanced_modes(features, num_cores)


def _checked_shape(layer: str, rows: int, cols: int, row_modes: Sequence[int] | None,
                   col_modes: Sequence[int] | None, num_cores: int = 3) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The modes of a ``rows x cols`` TT-matrix: as given, or a balanced factorization with as many cores as
    the other side has (``num_cores`` when neither is given); a clear error when they do not multiply out."""
    if rows < 1 or cols < 1:
        raise UserError(f"{layer} needs positive sizes, got {rows} x {cols}")
    d = len(row_modes) if row_modes is not None else len(col_modes) if col_modes is not None else num_cores
    row_modes, col_modes = _resolve_modes(rows, row_modes, d), _resolve_modes(cols, col_modes, d)
    validate_shape(rows, cols, row_modes, col_modes)
    return row_modes, col_modes


class _TTBase(nn.Module):
    """Cores, hooks and shared bookkeeping of the TT layers."""

    cores: nn.ParameterList
    intermediate_quant: nn.Module | None

    def _init_cores(self, in_modes: Sequence[int], out_modes: Sequence[int], ranks: tuple[int, ...],
                    target_var: float, device=None, dtype=None) -> None:
        # Var(W) = prod(inner ranks) * prod_k var_k; split the target evenly over the cores.
        d = len(in_modes)
        var = (target_var / prod(ranks[1:-1])) ** (1.0 / d)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(ranks[k], i, o, ranks[k + 1], device=device, dtype=dtype) * math.sqrt(var))
            for k, (i, o) in enumerate(zip(in_modes, out_modes, strict=True)))
        self.intermediate_quant = None
        self.reconstruction_error: float | None = None

    def effective_cores(self) -> list[torch.Tensor]:
        """The cores as ``forward`` uses them (override or parametrize to quantize them)."""
        return list(self.cores)

    def _hook(self):
        return self.intermediate_quant if self.intermediate_quant is not None else (lambda t: t)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (1, *(int(c.shape[-1]) for c in self.cores))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _InferenceCache:
    """What :meth:`TTLinear.forward` reuses between inference calls, and what it must still match: the input's
    dtype, device and token bucket, the planner, and each state tensor's storage and version."""

    __slots__ = ("dtype", "device", "low", "high", "planner", "tensors", "state", "exe", "call")

    def __init__(self, layer: TTLinear, x2: torch.Tensor, exe: Execution, operands: list[torch.Tensor],
                 spec: TTSpec) -> None:
        self.dtype, self.device = x2.dtype, x2.device
        self.high = token_bucket(x2.shape[0])
        self.low = self.high // 2 if self.high > 16 else -1  # the bucket is (high / 2, high], 16 takes 0..16
        self.planner = layer._planner()
        self.tensors = layer._state_tensors()  # kept alive: their storage is not reused while cached
        self.state = [(t.data_ptr(), t._version) for t in self.tensors]
        self.exe = exe
        self.call = runner(exe, spec, operands, bias=layer.bias)  # the plan and its operands, choices made once


class TTLinear(_TTBase):
    """``y = x W + b`` with ``W`` a TT-matrix; drop-in for ``nn.Linear`` (see the module docstring).

    ``ranks``: one int (the maximal bond rank), ``d - 1`` inner ranks or ``d + 1`` bond ranks; each is clamped
    to its bond's full rank. Modes default to a balanced 3-way factorization of each size.
    """

    def __init__(self, in_features: int, out_features: int, in_modes: Sequence[int] | None = None,
                 out_modes: Sequence[int] | None = None, ranks: int | Sequence[int] = 8, bias: bool = True,
                 planner: Planner | None = None, device=None, dtype=None) -> None:
        super().__init__()
        in_modes, out_modes = _checked_shape("TTLinear", in_features, out_features, in_modes, out_modes)
        self.in_features, self.out_features = in_features, out_features
        self.in_modes, self.out_modes = in_modes, out_modes
        self._init_cores(in_modes, out_modes, bond_ranks(in_modes, out_modes, ranks), 1.0 / (3 * in_features),
                         device, dtype)
        bound = 1 / math.sqrt(in_features)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound)) \
            if bias else None
        self.planner = planner
        self._cache: _InferenceCache | None = None  # of the last inference call

    @property
    def spec(self) -> TTSpec:
        return TTSpec(self.in_features, self.out_features, self.in_modes, self.out_modes, self.ranks,
                      self.bias is not None)

    def _planner(self) -> Planner:
        return self.planner if self.planner is not None else default_planner()

    def plan(self, tokens: int, training: bool = False, dtype: torch.dtype | None = None) -> Execution:
        """The execution the planner chooses for ``tokens`` rows."""
        return self._planner().plan(self.spec, tokens, dtype or self.cores[0].dtype, training)

    def cost_ops(self, tokens: int, training: bool = False) -> list[Op]:
        """Steps of the planned execution at ``tokens`` rows as plain dicts (kind 'gemm'/'bmm'/'copy', batch,
        m, n, k, flops, bytes, stage). At inference (``training=False``) the core-only work is cached and
        left out; in training it runs every call and is included."""
        itemsize = self.cores[0].element_size()
        ops = execution_ops(self.plan(tokens, training), self.spec, tokens, itemsize)
        return [{**op, "stage": "run"} for op in ops] if training else [op for op in ops if op["stage"] == "run"]

    def flops(self, tokens: int, training: bool = False) -> int:
        """FLOPs of the planned execution per call at ``tokens`` rows (as :meth:`cost_ops` counts them)."""
        return sum(int(op["flops"]) for op in self.cost_ops(tokens, training))

    def _cacheable(self) -> bool:
        """Whether this call may reuse (and store) the inference cache: plain stored cores that need no
        gradient (no hook, no parametrization, no ``effective_cores`` override), outside any tracing."""
        params = self.cores._parameters
        return (self.intermediate_quant is None and len(params) == len(self.in_modes)
                and type(self).effective_cores is _TTBase.effective_cores
                and not (torch.is_grad_enabled() and any(p.requires_grad for p in self._state_tensors()))
                and not is_tracing())

    def _state_tensors(self) -> list[torch.Tensor]:
        """The cores and the bias (a chain may fold it into its last prepared matrix). Read from the module's
        dicts, not through ``nn.Module.__getattr__``: this runs on every inference call."""
        tensors = list(self._modules["cores"]._parameters.values())
        bias = self._parameters.get("bias")
        return tensors if bias is None else [*tensors, bias]

    def _cache_hit(self, x: torch.Tensor) -> _InferenceCache | None:
        """The cache of the last inference call if it applies to ``x``: then the plan and the prepared operands
        (fused cores, the dense weight) are reused without touching the planner, whose bookkeeping would cost
        as much as a small GEMM.

        This runs on every call, so it is a handful of attribute reads: right after a GEMM has flushed the
        CPU's caches, every line of Python between two GEMMs costs several times what it costs alone. A
        state tensor is the same as cached when its storage and version are: the cache holds the cached
        tensors, so their storage cannot be reused by a new tensor."""
        c = getattr(self, "_cache", None)
        if c is None or x.dtype is not c.dtype or x.device != c.device:
            return None
        if not c.low < x.numel() // self.in_features <= c.high or self._planner() is not c.planner:
            return None
        if is_tracing():  # before the versions, which dynamo cannot guard on
            return None
        ts = self._state_tensors()
        if [(t.data_ptr(), t._version) for t in ts] != c.state or self.intermediate_quant is not None:
            return None
        return c if not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise UserError(f"TTLinear expects inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        hit = self._cache_hit(x)
        if hit is not None:
            if x.dim() == 2:
                return hit.call(x)
            return hit.call(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        cores = self.effective_cores()
        training = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        tokens = x2.shape[0] if not is_tracing() else 128
        spec = self.spec
        exe = self.plan(tokens, training, x.dtype)
        operands = prepare(exe, spec, cores, self._hook(), self.bias)
        if self._cacheable():
            self._cache = _InferenceCache(self, x2, exe, operands, spec)
        y = run(exe, x2, operands, spec, self._hook(), bias=self.bias)
        return y.reshape(*lead, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight the cores represent (materialised; for inspection and export)."""
        w = merge_cores(self.effective_cores()).reshape(prod(self.in_modes), prod(self.out_modes))
        return w[: self.in_features, : self.out_features].t()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, in_modes={self.in_modes}, "
                f"out_modes={self.out_modes}, ranks={self.ranks}, bias={self.bias is not None}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_modes: Sequence[int] | None = None,
                    out_modes: Sequence[int] | None = None, max_rank: int | Sequence[int] | None = None,
                    rel_error: float | None = None, num_cores: int = 3, planner: Planner | None = None) -> TTLinear:
        """TT-SVD of a dense layer; ``reconstruction_error`` holds the relative Frobenius error of the weight.
        Without ``max_rank`` and ``rel_error`` the ranks are full and the layer reproduces ``linear``."""
        if not isinstance(linear, nn.Linear):
            raise UserError(f"TTLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        in_modes, out_modes = _checked_shape("TTLinear", linear.in_features, linear.out_features, in_modes,
                                             out_modes, num_cores)
        w = linear.weight.detach().t()
        padded = w.new_zeros(prod(in_modes), prod(out_modes))
        padded[: linear.in_features, : linear.out_features] = w
        cores, err = tt_svd(padded, in_modes, out_modes, max_rank, rel_error)
        ranks = (1, *(c.shape[-1] for c in cores))
        layer = cls(linear.in_features, linear.out_features, in_modes, out_modes, ranks, linear.bias is not None,
                    planner, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for p, c in zip(layer.cores, cores, strict=True):
                p.copy_(c)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reconstruction_error = err
        return layer


def lookup_products(hidden_modes: Sequence[int], ranks: Sequence[int], left_to_right: bool) -> list[tuple[int, ...]]:
    """``(m, k, n)`` of each per-id product of a TT embedding lookup: first to last, ``(H_<k x r_{k-1}) @
    (r_{k-1} x h_k r_k)``; last to first, ``(r_{k-1} h_k x r_k) @ (r_k x H_>k)``."""
    h, r, d = list(hidden_modes), list(ranks), len(hidden_modes)
    if left_to_right:
        return [(prod(h[:k]), r[k], h[k] * r[k + 1]) for k in range(1, d)]
    return [(r[k] * h[k], r[k + 1], prod(h[k + 1:])) for k in reversed(range(d - 1))]


def lookup_flops(hidden_modes: Sequence[int], ranks: Sequence[int], left_to_right: bool) -> int:
    """Multiply-adds times two of one id's lookup in the given order (:func:`lookup_products`)."""
    return sum(2 * m * k * n for m, k, n in lookup_products(hidden_modes, ranks, left_to_right))


class TTEmbedding(_TTBase):
    """An embedding table ``vocab x hidden`` stored as a TT-matrix over (vocab modes, hidden modes).

    A lookup turns each id into its mode digits and contracts only the selected core slices (one batched
    GEMM per core over the *unique* ids), so only touched rows are materialised (Hrinchuk et al. 2020,
    "Tensorized Embedding Layers").
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_modes: Sequence[int] | None = None,
                 hidden_modes: Sequence[int] | None = None, ranks: int | Sequence[int] = 16,
                 padding_idx: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        vocab_modes, hidden_modes = _checked_shape("TTEmbedding", num_embeddings, embedding_dim, vocab_modes,
                                                   hidden_modes)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.vocab_modes, self.hidden_modes = vocab_modes, hidden_modes
        self._init_cores(vocab_modes, hidden_modes, bond_ranks(vocab_modes, hidden_modes, ranks), 1.0, device, dtype)

    def left_to_right(self) -> bool:
        """Whether a lookup contracts the cores first to last. Both orders give the same rows; their work per
        id differs with the ranks and hidden modes: for ``2x3x5087-96x2x2`` at rank 64 first to last
        multiplies ``(96 x 64) @ (64 x 128)`` (1.6 MFLOP an id), last to first two products of 33 and 49
        kFLOP. An intermediate quantizer fixes the order to first to last: it quantizes those states."""
        if self.intermediate_quant is not None:
            return True
        return lookup_flops(self.hidden_modes, self.ranks, True) <= lookup_flops(self.hidden_modes, self.ranks, False)

    def rows(self, ids: torch.Tensor, left_to_right: bool | None = None) -> torch.Tensor:
        """Dense rows ``(N, embedding_dim)`` for a flat tensor of ``N`` ids (contraction order: default
        :meth:`left_to_right`)."""
        cores, hook = self.effective_cores(), self._hook()
        strides = [prod(self.vocab_modes[k + 1:]) for k in range(len(self.vocab_modes))]
        pieces = []  # (N, r_{k-1}, h_k, r_k): each core's slices selected by the ids' mode digits
        for core, stride, v in zip(cores, strides, self.vocab_modes, strict=True):
            digit = torch.div(ids, stride, rounding_mode="floor") % v
            # whole rows of the core seen as (v, r_{k-1}, h_k, r_k): one copy per lookup (selecting on axis 1
            # and permuting copied twice), and in an ONNX export a Gather on a constant with no Transpose
            pieces.append(core.permute(1, 0, 2, 3).index_select(0, digit))
        n = ids.shape[0]
        if self.left_to_right() if left_to_right is None else left_to_right:
            state = None
            for k, piece in enumerate(pieces):
                _, r0, h, r1 = piece.shape
                if state is None:
                    state = piece.reshape(n, h, r1)
                else:  # (N, H_<k, r_{k-1}) @ (N, r_{k-1}, h_k r_k) -> (N, H_<=k, r_k)
                    state = torch.bmm(state, piece.reshape(n, r0, h * r1)).reshape(n, -1, r1)
                if k < len(pieces) - 1:
                    state = hook(state)
        else:
            state = pieces[-1].reshape(n, pieces[-1].shape[1], -1)  # (N, r_{d-1}, h_d)
            for piece in reversed(pieces[:-1]):  # (N, r_{k-1} h_k, r_k) @ (N, r_k, H_>k) -> (N, r_{k-1}, H_>=k)
                _, r0, h, r1 = piece.shape
                state = torch.bmm(piece.reshape(n, r0 * h, r1), state).reshape(n, r0, -1)
        return state.reshape(n, -1)[:, : self.embedding_dim]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if is_tracing():
            out = self.rows(flat)
        else:
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
                raise UserError(f"token ids must be in [0, {self.num_embeddings}); got "
                                f"[{int(flat.min())}, {int(flat.max())}]")
            uniq, inverse = torch.unique(flat, return_inverse=True)
            out = self.rows(uniq)[inverse]
        return out.reshape(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(vocab, hidden)`` table (materialised; for inspection and tied heads)."""
        w = merge_cores(self.effective_cores()).reshape(prod(self.vocab_modes), prod(self.hidden_modes))
        return w[: self.num_embeddings, : self.embedding_dim]

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab_modes={self.vocab_modes}, "
                f"hidden_modes={self.hidden_modes}, ranks={self.ranks}")

    def cost_ops(self, tokens: int, training: bool = False) -> list[Op]:
        """One batched GEMM per core but one over ``tokens`` looked-up rows, in the order :meth:`rows` takes
        (an upper bound: only unique ids are computed)."""
        itemsize = self.cores[0].element_size()
        ops = []
        for k, (m, kk, n) in enumerate(lookup_products(self.hidden_modes, self.ranks, self.left_to_right())):
            ops.append({"kind": "bmm", "batch": tokens, "m": m, "n": n, "k": kk, "flops": 2 * tokens * m * n * kk,
                        "bytes": itemsize * tokens * (m * kk + kk * n + m * n), "stage": "run",
                        "label": f"product {k + 1}"})
        return ops

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, vocab_modes: Sequence[int] | None = None,
                       hidden_modes: Sequence[int] | None = None, max_rank: int | Sequence[int] | None = None,
                       rel_error: float | None = None, num_cores: int = 3) -> TTEmbedding:
        """TT-SVD of an embedding table; ``reconstruction_error`` holds the relative Frobenius error."""
        if not isinstance(embedding, nn.Embedding):
            raise UserError(f"TTEmbedding.from_embedding needs an nn.Embedding, got {type(embedding).__name__}")
        vocab_modes, hidden_modes = _checked_shape("TTEmbedding", embedding.num_embeddings, embedding.embedding_dim,
                                                   vocab_modes, hidden_modes, num_cores)
        w = embedding.weight.detach()
        padded = w.new_zeros(prod(vocab_modes), prod(hidden_modes))
        padded[: embedding.num_embeddings, : embedding.embedding_dim] = w
        cores, err = tt_svd(padded, vocab_modes, hidden_modes, max_rank, rel_error)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, vocab_modes, hidden_modes,
                    (1, *(c.shape[-1] for c in cores)), embedding.padding_idx, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for p, c in zip(layer.cores, cores, strict=True):
                p.copy_(c)
        layer.reconstruction_error = err
        return layer

    def fit_rows(self, target: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None = None,
                 steps: int = 300, lr: float = 3e-3, max_seconds: float | None = None,
                 metric: torch.Tensor | None = None) -> float:
        """Refit the cores (Adam, full batch) to the rows ``target[ids]`` of a dense table, each row's squared
        error weighted by ``weights`` (e.g. how often the task uses that token) and measured as
        ``||(row - target) @ metric||`` (``(hidden, hidden)``, e.g. the directions a task reads,
        :meth:`fitformer.compress.EmbeddingFisher.metric`; default: the plain norm); returns the weighted
        relative error reached in that metric (never worse than the start's). ``max_seconds`` stops the fit
        early.

        Why: a vocabulary table is far from low TT-rank (TT-SVD of a 30k x 384 table at rank 64 leaves ~90%
        relative error), but a task touches a fraction of the rows, most of its tokens from a few thousand.
        Spending the rank on those rows starts distillation from a far better embedding.
        """
        ids = ids.reshape(-1).to(torch.long)
        if ids.numel() == 0:
            raise UserError("fit_rows needs at least one token id")
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings:
            raise UserError(f"token ids must be in [0, {self.num_embeddings})")
        if tuple(target.shape) != (self.num_embeddings, self.embedding_dim):
            raise UserError(f"target table is {tuple(target.shape)}; expected "
                            f"({self.num_embeddings}, {self.embedding_dim})")
        if steps < 0:
            raise UserError(f"steps={steps}: must be >= 0")
        if metric is not None and tuple(metric.shape) != (self.embedding_dim, self.embedding_dim):
            raise UserError(f"metric is {tuple(metric.shape)}; expected ({self.embedding_dim}, {self.embedding_dim})")
        dtype = self.cores[0].dtype
        metric = None if metric is None else metric.detach().to(dtype)

        def measured(table: torch.Tensor) -> torch.Tensor:
            return table if metric is None else table @ metric

        rows = measured(target.detach()[ids].to(dtype))
        w = torch.ones(ids.numel(), dtype=dtype) if weights is None else weights.detach().reshape(-1).to(dtype)
        if w.shape[0] != ids.numel() or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise UserError("weights must be one non-negative number per id, not all zero")
        w = (w / (w * rows.pow(2).sum(1)).sum().clamp_min(1e-30)).unsqueeze(1)

        # Many rows: materialise the whole table with the merged cores (a few large GEMMs) and index it; the
        # per-row products of ``rows`` copy a core slice per id and are far slower at thousands of ids.
        whole_table = ids.numel() * 8 >= self.num_embeddings

        def error() -> torch.Tensor:
            predicted = self.weight[ids] if whole_table else self.rows(ids)
            return ((measured(predicted) - rows).pow(2) * w).sum()

        with torch.no_grad():
            start, before = [c.detach().clone() for c in self.cores], error().sqrt().item()
        optimizer = torch.optim.Adam(self.cores.parameters(), lr=lr)
        deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        for _ in range(steps):
            if deadline is not None and time.perf_counter() >= deadline:
                break
            optimizer.zero_grad(set_to_none=True)
            error().backward()
            optimizer.step()
        with torch.no_grad():
            after = error().sqrt().item()
            if after > before:  # keep the starting cores if the fit ends worse than it began
                for core, saved in zip(self.cores, start, strict=True):
                    core.copy_(saved)
                return before
        return after

