"""Fine-grained balanced sparsity: N:M / bank-balanced masks, the HP storage format, and sparse execution
that is used only where it was measured to be faster.

Level 2 of hierarchical pruning (the structured level 1 lives in :mod:`fitformer.compress.prune`): inside
each remaining weight every row is cut into *banks* (blocks) of ``m`` consecutive inputs and exactly ``n``
of them are kept in every bank (Kang, "Accelerator-aware pruning", 2019; Cao et al., "Efficient and
effective sparse LSTM on FPGA with bank-balanced sparsity", FPGA 2019; the 2:4 pattern of NVIDIA
Ampere). Equal non-zeros per bank let parallel hardware read one value per bank per cycle without
conflicts, and let the storage format drop row pointers altogether:

**HP format** (hierarchical-pruning format): for a ``rows x cols`` weight with bank size ``m`` and ``n``
kept per bank, store the ``rows * ceil(cols/m) * n`` kept values in row-major bank order, plus one
intra-bank index of ``ceil(log2 m)`` bits per value, bit-packed. Position is implied by the order, so no
row pointers or column indices are needed. :func:`hp_nbytes` gives the exact encoded size, header
included, and equals ``len(encode_hp(...))`` and the file size written by :func:`save_hp`.

Execution: a masked weight is still a dense tensor; :class:`SparseLinear` runs it through a sparse kernel
(PyTorch CSR or BSR) only when :func:`choose_kernel` measured that kernel faster than dense at the layer's
shape, sparsity and token count on this machine. :func:`measure_sparse_crossover` exposes those
measurements as plain data for the hardware cost model.
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..hardware.timing import measure
from ..io import atomic_path

# ---------------------------------------------------------------------------------------------- masks


def _validate_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or not 0 <= n <= m:
        raise UserError(f"N:M sparsity needs integers 0 <= n <= m and m >= 1, got {n}:{m}; use e.g. 2:4")


def nm_mask(weight: torch.Tensor, n: int, m: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask keeping the ``n`` highest-scoring entries in every bank of ``m`` consecutive inputs of
    each row (the last dimension). ``scores`` defaults to ``|weight|``; a row whose length is not a
    multiple of ``m`` has a shorter last bank, which keeps ``min(n, its length)`` entries."""
    _validate_nm(n, m)
    if weight.dim() != 2:
        raise UserError(f"N:M masks need a 2-D weight, got shape {tuple(weight.shape)}")
    s = (weight.abs() if scores is None else scores).detach().float()
    rows, cols = s.shape
    banks = math.ceil(cols / m)
    padded = torch.full((rows, banks * m), -math.inf, device=s.device)
    padded[:, :cols] = s
    top = padded.view(rows, banks, m).topk(n, dim=-1).indices
    mask = torch.zeros(rows, banks, m, dtype=torch.bool, device=s.device)
    mask.scatter_(-1, top, True)
    return mask.view(rows, banks * m)[:, :cols].contiguous()


def bank_balanced_mask(weight: torch.Tensor, sparsity: float, bank_size: int = 16,
                       scores: torch.Tensor | None = None) -> torch.Tensor:
    """Bank-balanced mask at ``sparsity``: every bank of ``bank_size`` inputs keeps the same number
    ``round(bank_size * (1 - sparsity))`` of entries (Cao et al., FPGA 2019)."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}; e.g. 0.5 or 0.75")
    if bank_size < 1:
        raise UserError(f"bank size must be >= 1, got {bank_size}")
    keep = max(1, round(bank_size * (1.0 - sparsity)))
    return nm_mask(weight, keep, bank_size, scores)


def nm_holds(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every full bank of ``m`` consecutive inputs in each row has exactly ``n`` kept entries
    (and the shorter last bank at most ``n``)."""
    rows, cols = mask.shape
    full = (cols // m) * m
    counts = mask[:, :full].reshape(rows, -1, m).sum(-1) if full else torch.zeros(0)
    ok = bool((counts == n).all())
    if full < cols:
        ok = ok and bool((mask[:, full:].sum(-1) <= n).all())
    return ok


# ---------------------------------------------------------------------------------------- HP format

_MAGIC = b"FFHP"
_VERSION = 1
_HEADER = struct.Struct("<4sBBHHIII")  # magic, version, dtype code, m, n, rows, cols, reserved
_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64}
_CODES = {v: k for k, v in _DTYPES.items()}


def index_bits(m: int) -> int:
    """Bits of one intra-bank index: as few as a bank of ``m`` needs (0 when ``m == 1``)."""
    return max(0, math.ceil(math.log2(m))) if m > 1 else 0


@dataclass
class HPTensor:
    """A weight in HP format: ``values`` is (rows, banks, n) in bank order, ``indices`` the position of each
    value inside its bank (same shape, 0..m-1, ascending within a bank)."""

    rows: int
    cols: int
    n: int
    m: int
    values: torch.Tensor
    indices: torch.Tensor

    @property
    def banks(self) -> int:
        return math.ceil(self.cols / self.m)

    def to_dense(self) -> torch.Tensor:
        """The dense weight, with zeros where nothing is stored."""
        out = torch.zeros(self.rows, self.banks, self.m, dtype=self.values.dtype)
        out.scatter_(-1, self.indices.long(), self.values)
        return out.view(self.rows, self.banks * self.m)[:, : self.cols].contiguous()

    def nbytes(self) -> int:
        return hp_nbytes(self.rows, self.cols, self.n, self.m, self.values.dtype)


def hp_from_dense(weight: torch.Tensor, n: int, m: int, mask: torch.Tensor | None = None) -> HPTensor:
    """Encode a weight whose mask (given, or its non-zeros) keeps at most ``n`` per bank of ``m``. Banks with
    fewer than ``n`` kept entries are filled with explicit zeros, so every bank stores exactly ``n``."""
    _validate_nm(n, m)
    if weight.dim() != 2:
        raise UserError(f"HP format stores 2-D weights, got shape {tuple(weight.shape)}")
    w = weight.detach().cpu()
    keep = (w != 0) if mask is None else mask.detach().cpu().bool()
    rows, cols = w.shape
    banks = math.ceil(cols / m)
    width = banks * m
    pw = torch.zeros(rows, width, dtype=w.dtype)
    pw[:, :cols] = w
    pk = torch.zeros(rows, width, dtype=torch.bool)
    pk[:, :cols] = keep
    pk = pk.view(rows, banks, m)
    counts = pk.sum(-1)
    if bool((counts > n).any()):
        raise UserError(f"weight has a bank with more than {n} of {m} non-zeros; apply nm_mask(w, {n}, {m}) first")
    # Kept positions first (stable, in ascending position), then filler positions to make n per bank.
    position = torch.arange(m).expand(rows, banks, m)
    order = torch.argsort((~pk).to(torch.int64) * m + position, dim=-1, stable=True)[..., :n]
    indices = order.sort(dim=-1).values
    values = torch.gather(pw.view(rows, banks, m), -1, indices)
    values = values * torch.gather(pk, -1, indices).to(values.dtype)
    return HPTensor(rows, cols, n, m, values.contiguous(), indices.to(torch.int16))


def hp_nbytes(rows: int, cols: int, n: int, m: int, dtype: torch.dtype = torch.float32) -> int:
    """Exact size of the encoded HP tensor: header + values + bit-packed intra-bank indices."""
    count = rows * math.ceil(cols / m) * n
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return _HEADER.size + count * itemsize + math.ceil(count * index_bits(m) / 8)


def encode_hp(t: HPTensor) -> bytes:
    """Serialise: header, raw values (little-endian), indices packed LSB-first at ``index_bits(m)`` each."""
    if t.values.dtype not in _CODES:
        raise UserError(f"HP format stores float16/bfloat16/float32/float64 values, got {t.values.dtype}")
    header = _HEADER.pack(_MAGIC, _VERSION, _CODES[t.values.dtype], t.m, t.n, t.rows, t.cols, 0)
    values = t.values.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    bits = index_bits(t.m)
    idx = t.indices.reshape(-1).numpy().astype(np.uint16)
    if bits:
        bit_planes = ((idx[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
        packed = np.packbits(bit_planes.reshape(-1), bitorder="little").tobytes()
    else:
        packed = b""
    return header + values + packed


def decode_hp(data: bytes) -> HPTensor:
    """Inverse of :func:`encode_hp`."""
    if len(data) < _HEADER.size:
        raise UserError("not an HP tensor: too short; write it with fitformer.layers.sparse.save_hp")
    magic, version, code, m, n, rows, cols, _ = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION or code not in _DTYPES:
        raise UserError("not an HP tensor (bad magic, version or dtype); write it with save_hp")
    dtype = _DTYPES[code]
    if len(data) != hp_nbytes(rows, cols, n, m, dtype):
        raise UserError(f"HP tensor is truncated or padded: {len(data)} bytes, expected "
                        f"{hp_nbytes(rows, cols, n, m, dtype)}")
    banks = math.ceil(cols / m)
    count = rows * banks * n
    itemsize = torch.empty(0, dtype=dtype).element_size()
    start = _HEADER.size
    raw = bytearray(data[start : start + count * itemsize])
    values = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(rows, banks, n).clone() if count else \
        torch.zeros(rows, banks, n, dtype=dtype)
    bits = index_bits(m)
    if bits and count:
        packed = np.frombuffer(data, dtype=np.uint8, offset=start + count * itemsize)
        planes = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits).astype(np.uint16)
        idx = (planes << np.arange(bits, dtype=np.uint16)).sum(axis=1).astype(np.int16)
        indices = torch.from_numpy(idx).reshape(rows, banks, n)
    else:
        indices = torch.zeros(rows, banks, n, dtype=torch.int16)
    return HPTensor(rows, cols, n, m, values, indices)


def save_hp(path: str | Path, t: HPTensor) -> Path:
    """Write one HP tensor to ``path`` atomically; the file size is exactly ``t.nbytes()``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(encode_hp(t))
    return Path(path)


def load_hp(path: str | Path) -> HPTensor:
    try:
        return decode_hp(Path(path).read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path}: no such HP file") from None


# ------------------------------------------------------------------------------------ byte accounting

INDEX_BYTES = 4  # CSR/BSR index width: int32, the narrowest that standard libraries (MKL, cuSPARSE) use


def format_bytes(weight: torch.Tensor, n: int, m: int, bsr_block: tuple[int, int] = (4, 4)) -> dict[str, int]:
    """Bytes needed to store the same (already N:M-masked) weight as dense, CSR, BSR and HP.

    CSR and BSR are counted from the arrays PyTorch builds (values, column indices, row pointers) with
    int32 indices; BSR stores every ``bsr_block`` block holding any non-zero. HP is :func:`hp_nbytes`."""
    w = weight.detach().cpu()
    item = w.element_size()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        csr = w.to_sparse_csr()
    csr_bytes = csr.values().numel() * item + (csr.col_indices().numel() + csr.crow_indices().numel()) * INDEX_BYTES
    br, bc = bsr_block
    rows, cols = w.shape
    pad = torch.zeros(math.ceil(rows / br) * br, math.ceil(cols / bc) * bc, dtype=w.dtype)
    pad[:rows, :cols] = w
    bsr = pad.to_sparse_bsr((br, bc))
    bsr_bytes = bsr.values().numel() * item + (bsr.col_indices().numel() + bsr.crow_indices().numel()) * INDEX_BYTES
    return {"dense": w.numel() * item, "csr": int(csr_bytes), "bsr": int(bsr_bytes),
            "hp": hp_nbytes(rows, cols, n, m, w.dtype)}


# ---------------------------------------------------------------------------------------- execution

KERNELS = ("dense", "csr", "bsr")
_CHOICES: dict[tuple, str] = {}


def _sparse_weight(weight: torch.Tensor, kernel: str, block: int = 16) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        if kernel == "csr":
            return weight.to_sparse_csr()
        if kernel == "bsr":
            return weight.to_sparse_bsr((block, block))
    return weight


def _sparse_linear(x: torch.Tensor, sparse_w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.sparse.mm(sparse_w, flat.t()).t()
    if bias is not None:
        out = out + bias
    # row-major like nn.Linear's output: a transposed result sends attention down its slow, unfused path
    return out.contiguous().reshape(*x.shape[:-1], sparse_w.shape[0])


def time_kernels(weight: torch.Tensor, tokens: int, kernels: tuple[str, ...] = KERNELS,
                 repeats: int = 10) -> dict[str, float]:
    """Measured mean latency (ms) of ``x @ weight.T`` for ``tokens`` rows of input, per kernel."""
    x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype)
    out: dict[str, float] = {}
    with torch.inference_mode():
        for kernel in kernels:
            if kernel == "bsr" and any(d % 16 for d in weight.shape):
                continue
            w = _sparse_weight(weight, kernel)
            if kernel == "dense":
                fn = lambda w=w: torch.nn.functional.linear(x, w)  # noqa: E731
            else:
                fn = lambda w=w: _sparse_linear(x, w, None)  # noqa: E731
            out[kernel] = measure(fn, warmup=2, repeats=repeats, max_seconds=5.0).mean_ms
    return out


def choose_kernel(weight: torch.Tensor, tokens: int, margin: float = 0.95) -> str:
    """The fastest kernel for this weight measured on this machine; a sparse kernel wins only when it takes
    at most ``margin`` of the dense time. Decisions are cached per (shape, non-zeros, tokens, threads)."""
    nnz = int((weight != 0).sum())
    key = (tuple(weight.shape), round(nnz / weight.numel(), 3), tokens, torch.get_num_threads(), weight.dtype)
    if key not in _CHOICES:
        times = time_kernels(weight.detach(), tokens)
        best = min(times, key=times.get)
        _CHOICES[key] = best if best == "dense" or times[best] <= margin * times["dense"] else "dense"
    return _CHOICES[key]


class SparseLinear(nn.Module):
    """A linear layer with a fixed sparsity mask. The masked weight is kept dense (trainable, exportable to
    ONNX as MatMul/Gemm); in inference the forward uses a sparse kernel only when ``kernel`` says so."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor, n: int, m: int, kernel: str = "dense"):
        super().__init__()
        if kernel not in KERNELS:
            raise UserError(f"unknown sparse kernel '{kernel}'; use one of {', '.join(KERNELS)}")
        self.in_features, self.out_features, self.n, self.m = linear.in_features, linear.out_features, n, m
        self.register_buffer("mask", mask.to(torch.bool).clone())
        self.weight = nn.Parameter(linear.weight.detach() * self.mask)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.kernel = kernel
        self._packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
        if self.kernel == "dense" or self.training or torch.is_grad_enabled() or exporting:
            return nn.functional.linear(x, self.weight * self.mask, self.bias)
        if self._packed is None:
            self._packed = _sparse_weight((self.weight * self.mask).detach(), self.kernel)
        return _sparse_linear(x, self._packed, self.bias)

    def train(self, mode: bool = True) -> SparseLinear:
        self._packed = None  # weights may change while training; repack on the next inference call
        return super().train(mode)

    def to_hp(self) -> HPTensor:
        return hp_from_dense((self.weight * self.mask).detach(), self.n, self.m, self.mask)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.n}:{self.m}, kernel={self.kernel}"


def measure_sparse_crossover(
    shapes: list[tuple[int, int]], sparsities: list[float], tokens: tuple[int, ...] = (128, 4096),
    bank_size: int = 16, repeats: int = 10, seed: int = 0,
) -> list[dict]:
    """Dense vs sparse kernel latency on this machine for bank-balanced weights of each (out, in) shape,
    sparsity and token count: a list of plain dicts (shape, sparsity, tokens, ``*_ms`` per kernel,
    ``best``, ``speedup`` of the best over dense) that the hardware cost model reads."""
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    for out_f, in_f in shapes:
        base = torch.randn(out_f, in_f, generator=gen)
        for s in sparsities:
            w = base * bank_balanced_mask(base, s, bank_size)
            for t in tokens:
                times = time_kernels(w, t, repeats=repeats)
                best = min(times, key=times.get)
                rows.append({"out_features": out_f, "in_features": in_f, "sparsity": s, "tokens": t,
                             **{f"{k}_ms": v for k, v in times.items()}, "best": best,
                             "speedup": times["dense"] / times[best]})
    return rows


def crossover_speedup(rows: list[dict], out_features: int, in_features: int, sparsity: float, tokens: int) -> float:
    """Speed-up over dense that a layer of this shape, sparsity and token count can expect, read from
    :func:`measure_sparse_crossover` rows: the measured case nearest in size and token count with the
    highest sparsity not above ``sparsity`` (1.0, i.e. run dense, when none qualifies)."""
    usable = [r for r in rows if r["sparsity"] <= sparsity + 1e-9]
    if not usable:
        return 1.0

    def distance(r: dict) -> tuple[float, float]:
        size = abs(math.log((r["out_features"] * r["in_features"]) / (out_features * in_features)))
        return (size + abs(math.log(r["tokens"] / tokens)), -r["sparsity"])

    return max(1.0, float(min(usable, key=distance)["speedup"]))
