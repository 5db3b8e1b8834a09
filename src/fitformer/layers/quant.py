"""LSQ fake quantization (learned step size) and quantized wrappers of Linear and Embedding layers.

The quantizer follows Esser et al., "Learned Step Size Quantization" (ICLR 2020), eq. 1-3: the forward
pass computes ``x_hat = (clamp(round(x / s) + z, Qn, Qp) - z) * s``; the backward pass lets the rounding
through unchanged (straight-through estimator) and gives the step size ``s`` the LSQ gradient

    d x_hat / d s = -x/s + round(x/s)     inside the range,   Qn - z or Qp - z when clipped,

multiplied by the gradient-scale factor ``g = 1 / sqrt(N * Qp)`` (eq. 4), N being the number of elements
that share one step size (weights) or the number of features per example (activations). An asymmetric
quantizer also learns a zero point ``z`` (LSQ+, Bhalgat et al. 2020), rounded to an integer in the forward
pass so the model can be exported with integer zero points.

A layer wrapper holds the float weight during quantization-aware training; :meth:`freeze` replaces it by
the integer codes (``weight_int``), after which the forward pass dequantizes them with the very same
arithmetic, so a frozen model reproduces the fake-quant model bit for bit.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .planner import Execution, unfused_chain
from .tt import TTEmbedding, TTLinear

MIN_BITS, MAX_BITS = 2, 8
_CLIP_RATIOS = torch.linspace(0.3, 1.0, 15)  # candidate clipping ranges of the MSE initialisation
_SAMPLE_PER_CALL = 1 << 15  # activation values kept per calibration batch
_SAMPLE_MAX = 1 << 20


def check_bits(bits: int, what: str = "bits") -> int:
    """Validate a bit width (2..8 inclusive)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{what}={bits!r}: must be an integer from {MIN_BITS} to {MAX_BITS}")
    return bits


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range (Qn, Qp): signed two's complement when symmetric, unsigned otherwise."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class _LSQFakeQuant(torch.autograd.Function):
    """LSQ quantize-dequantize in one autograd node (module doc): the forward pass keeps only a clip mask
    and one per-element step-size factor for the backward pass, instead of the graph of a dozen elementwise
    ops that :func:`lsq_fake_quant_reference` builds (``benchmarks/bench_qat_step.py`` times the two)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int,
                qmax: int, g: float) -> torch.Tensor:
        v = x / scale
        r = torch.round(v)
        z = None if zero_point is None else torch.round(zero_point)
        q = r if z is None else r + z
        inside = (q >= qmin) & (q <= qmax)
        codes = torch.clamp(q, qmin, qmax)
        if z is not None:
            codes = codes - z
        # d out / d scale: round(v) - v inside the range (rounding passed straight through), the clipped
        # code (minus the zero point) outside it
        ctx.save_for_backward(inside, torch.where(inside, r - v, codes), scale, zero_point)
        ctx.g = g
        return codes * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inside, ds, scale, zero_point = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = (grad * ds).sum_to_size(scale.shape) * ctx.g if ctx.needs_input_grad[1] else None
        grad_z = None
        if zero_point is not None and ctx.needs_input_grad[2]:  # -scale where clipped, 0 inside
            grad_z = (grad * ~inside).sum_to_size(zero_point.shape) * (-scale * ctx.g)
        return grad_x, grad_s, grad_z, None, None, None


def lsq_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int, g: float
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with step ``scale`` and (optional) zero point, LSQ gradients (see module doc)."""
    return _LSQFakeQuant.apply(x, scale, zero_point, qmin, qmax, g)


def lsq_fake_quant_reference(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int, g: float
) -> torch.Tensor:
    """:func:`lsq_fake_quant` op by op (rounding straight through, step and zero point gradient-scaled by
    ``g`` through detach): the graph the fused node replaces, kept to check it and to time it against."""
    s = scale * g + (scale - scale * g).detach()
    v = x / s
    r = v + (torch.round(v) - v).detach()
    if zero_point is None:
        return torch.clamp(r, qmin, qmax) * s
    z = zero_point * g + (zero_point - zero_point * g).detach()
    z = z + (torch.round(z) - z).detach()
    return (torch.clamp(r + z, qmin, qmax) - z) * s


def quantize_int(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
) -> torch.Tensor:
    """The integer codes of ``x`` (as float values; same arithmetic as :func:`lsq_fake_quant`)."""
    q = torch.round(x / scale)
    if zero_point is not None:
        q = q + torch.round(zero_point)
    return torch.clamp(q, qmin, qmax)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Float values of integer codes ``q`` (any integer dtype)."""
    q = q.to(scale.dtype)
    if zero_point is None:
        return q * scale
    return (q - torch.round(zero_point)) * scale


class LSQQuantizer(nn.Module):
    """A fake quantizer with a learnable step size (and zero point when asymmetric).

    ``per_channel`` gives one step size per slice along ``channel_axis`` (per output row of a linear
    weight, per row of an embedding table, per bond channel of a TT core: see :func:`core_channel_axis`).
    Weights are initialised from their statistics with :meth:`init_from`; activations either from
    calibration batches (:meth:`observe`, then :meth:`init_from_observed`) or, failing that, from the first
    batch they see (as in LSQ).
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool = True,
        per_channel: bool = False,
        channel_axis: int = 0,
        shape: tuple[int, ...] | torch.Size | None = None,
        activation: bool = False,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = bool(symmetric)
        self.per_channel = bool(per_channel)
        self.channel_axis = channel_axis
        self.activation = activation
        self.qmin, self.qmax = qrange(self.bits, self.symmetric)
        scale_shape: tuple[int, ...] = ()
        if per_channel:
            if shape is None or len(shape) < 2:
                raise UserError(f"per-channel quantization needs a tensor with a channel axis, got shape "
                                f"{tuple(shape) if shape is not None else None}; use per_channel=False")
            axis = self._axis(len(shape))
            scale_shape = tuple(shape[axis] if i == axis else 1 for i in range(len(shape)))
        self.scale = nn.Parameter(torch.ones(scale_shape))
        self.zero_point = None if self.symmetric else nn.Parameter(torch.zeros(scale_shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.calibrating = False
        self._samples: list[torch.Tensor] = []
        self._lo = math.inf
        self._hi = -math.inf

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, {kind}"

    # --- initialisation -------------------------------------------------------------------------------
    def _axis(self, ndim: int) -> int:
        """The channel axis as a non-negative index of an ``ndim``-dimensional tensor."""
        if not -ndim <= self.channel_axis < ndim:
            raise UserError(f"channel axis {self.channel_axis} does not exist in a {ndim}-dimensional tensor")
        return self.channel_axis % ndim

    def _reduce_dims(self, x: torch.Tensor) -> list[int]:
        if not self.per_channel:
            return list(range(x.dim()))
        axis = self._axis(x.dim())
        return [d for d in range(x.dim()) if d != axis]

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Choose step size (and zero point) minimising the quantization MSE over clipped ranges of ``x``."""
        x = x.detach().float()
        if self.per_channel and x.dim() < 2:
            raise UserError(f"per-channel quantization needs a tensor with a channel axis, got shape "
                            f"{tuple(x.shape)}; use per_channel=False")
        dims = self._reduce_dims(x)
        lo = x.amin(dim=dims, keepdim=True) if dims else x
        hi = x.amax(dim=dims, keepdim=True) if dims else x
        self._set_from_range(x, lo, hi, dims)

    def _set_from_range(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dims: list[int]) -> None:
        best_err = best_s = best_z = None
        for ratio in _CLIP_RATIOS.tolist():
            s, z = self._params_for_range(lo * ratio, hi * ratio)
            err = (dequantize_int(quantize_int(x, s, z, self.qmin, self.qmax), s, z) - x).pow(2)
            err = err.sum(dim=dims, keepdim=True) if dims else err.sum()
            if best_err is None:
                best_err, best_s, best_z = err, s, z
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            if z is not None:
                best_z = torch.where(better, z, best_z)
        self.scale.copy_(best_s.reshape(self.scale.shape))
        if self.zero_point is not None:
            self.zero_point.copy_(best_z.reshape(self.zero_point.shape))
        self.initialized.fill_(True)

    def _params_for_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tiny = torch.finfo(torch.float32).tiny * 1e6
        if self.symmetric:
            bound = torch.maximum(lo.abs(), hi.abs())
            return torch.clamp(bound / self.qmax, min=tiny), None
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        s = torch.clamp((hi - lo) / (self.qmax - self.qmin), min=tiny)
        return s, torch.round(self.qmin - lo / s)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Record an activation batch for calibration (its range and a random sample of its values)."""
        if self.per_channel:
            raise UserError("activation quantizers are per-tensor; set per_channel only for weights")
        flat = x.detach().float().reshape(-1)
        self._lo = min(self._lo, float(flat.min()))
        self._hi = max(self._hi, float(flat.max()))
        if flat.numel() > _SAMPLE_PER_CALL:
            flat = flat[torch.randint(flat.numel(), (_SAMPLE_PER_CALL,), device=flat.device)]
        if sum(s.numel() for s in self._samples) < _SAMPLE_MAX:
            self._samples.append(flat.cpu())

    @torch.no_grad()
    def init_from_observed(self) -> None:
        """Initialise from the batches recorded by :meth:`observe`, then forget them."""
        if not self._samples:
            raise UserError("a quantizer saw no calibration data; run calibration batches through the model")
        sample = torch.cat(self._samples)
        self._set_from_range(sample, torch.tensor(self._lo), torch.tensor(self._hi), [0])
        self._samples, self._lo, self._hi = [], math.inf, -math.inf

    # --- forward --------------------------------------------------------------------------------------
    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's g = 1/sqrt(N Qp): N elements per step size (weights) or features per example (activations)."""
        n = x.numel() / max(self.scale.numel(), 1)
        if self.activation and x.dim() > 1:
            n = n / x.shape[0]
        return 1.0 / math.sqrt(max(n, 1.0) * max(self.qmax, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if not torch.jit.is_tracing() and not bool(self.initialized):
            self.init_from(x)
        if torch.is_grad_enabled() and not torch.jit.is_tracing():
            return lsq_fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax, self.grad_factor(x))
        # Same values without the autograd functions, so the ONNX exporter sees plain operators.
        return dequantize_int(quantize_int(x, self.scale, self.zero_point, self.qmin, self.qmax), self.scale,
                              self.zero_point)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x``: int8 for symmetric, uint8 for asymmetric quantizers."""
        q = quantize_int(x.detach(), self.scale.detach(), self.zero_point_detached(), self.qmin, self.qmax)
        return q.to(torch.int8 if self.symmetric else torch.uint8)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize_int(q, self.scale, self.zero_point)

    def zero_point_detached(self) -> torch.Tensor | None:
        return None if self.zero_point is None else self.zero_point.detach()


class QuantModule(nn.Module):
    """Base of the quantized layer wrappers: weight quantizer(s), an optional input quantizer, and freezing.

    Subclasses name their integer codes in :meth:`int_codes` (buffer name -> its quantizer), so packed
    export treats every wrapper alike; :meth:`derived_keys` lists state entries recomputed from the codes
    on load (:meth:`restore`) and therefore not saved.
    """

    weight_quant: LSQQuantizer
    input_quant: LSQQuantizer | None

    @property
    def frozen(self) -> bool:
        return hasattr(self, "weight_int")

    def int_codes(self) -> dict[str, LSQQuantizer]:
        return {"weight_int": self.weight_quant}

    def derived_keys(self) -> list[str]:
        return []

    def restore(self) -> None:
        """Recompute derived state from the integer codes (after loading them)."""

    def quantized_weight(self) -> torch.Tensor:
        if self.frozen:
            return self.weight_quant.dequantize(self.weight_int)
        return self.weight_quant(self.weight)

    def _freeze_codes(self) -> None:
        q = self.weight_quant.quantize(self.weight)
        del self.weight
        self.register_buffer("weight_int", q)

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the float weights by their integer codes; step sizes and zero points stop learning."""
        if self.frozen:
            return
        self._freeze_codes()
        for quantizer in quantizers(self):
            for p in quantizer.parameters(recurse=False):
                p.requires_grad_(False)


class QuantLinear(QuantModule):
    """``nn.Linear`` with LSQ-quantized weight (per output row when per-channel) and optionally input."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        per_channel: bool = True,
        symmetric: bool = True,
        act_symmetric: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.weight_quant = LSQQuantizer(weight_bits, symmetric, per_channel, 0, self.weight.shape)
        self.weight_quant.init_from(self.weight)
        self.input_quant = None if act_bits is None else LSQQuantizer(act_bits, act_symmetric, activation=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, frozen={self.frozen}"


class QuantEmbedding(QuantModule):
    """``nn.Embedding`` with an LSQ-quantized table (one step size per row when per-channel).

    Once frozen, only the looked-up rows are dequantized, so a large table costs no float copy.
    """

    def __init__(
        self, embedding: nn.Embedding, weight_bits: int = 8, per_channel: bool = True, symmetric: bool = True
    ) -> None:
        super().__init__()
        if embedding.max_norm is not None or embedding.sparse:
            raise UserError("cannot quantize an embedding with max_norm or sparse gradients; use a plain embedding")
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = nn.Parameter(embedding.weight.detach().clone())
        self.weight_quant = LSQQuantizer(weight_bits, symmetric, per_channel, 0, self.weight.shape)
        self.weight_quant.init_from(self.weight)
        self.input_quant = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            return F.embedding(ids, self.quantized_weight(), self.padding_idx)
        wq = self.weight_quant
        rows = self.weight_int[ids]
        if not wq.per_channel:
            return wq.dequantize(rows)
        scale = wq.scale[ids]  # (..., 1): the rows' step sizes
        zero = None if wq.zero_point is None else wq.zero_point[ids]
        return dequantize_int(rows, scale, zero)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, frozen={self.frozen}"


def core_quantizers(cores: list[torch.Tensor], bits: int, symmetric: bool, per_channel: bool) -> nn.ModuleList:
    """One weight quantizer per TT core (per bond channel when ``per_channel``, see :func:`core_channel_axis`),
    its step size fitted to the core: how a quantized TT layer, and the search's proxy, round cores."""
    quantizers = nn.ModuleList(LSQQuantizer(bits, symmetric, per_channel, core_channel_axis(k, len(cores)), c.shape)
                               for k, c in enumerate(cores))
    for q, c in zip(quantizers, cores, strict=True):
        q.init_from(c)
    return quantizers


def core_channel_axis(k: int, num_cores: int) -> int:
    """The axis of TT core ``k`` (shape ``(r_{k-1}, i_k, o_k, r_k)``) that gets one step size per index: its
    outgoing bond, or its incoming one for the last core (whose outgoing bond has size 1).

    Why the bond: its channels carry the TT's singular-value spread and differ in magnitude by orders, so
    a 4-bit grid scaled to the largest channel rounds the small ones away. One step size per input-mode
    slice, the earlier choice, left the last hidden state of the refit MiniLM TT student at a relative PTQ
    error of 1.90 (4-bit cores, 8-bit intermediates; the float student: 1.01); one per bond channel, 1.14.
    A step size per (mode, bond) pair fits a little better (1.05) but shares one fp32 scale among as few as
    two 4-bit codes in a lopsided core, which makes the packed file 70% larger.
    """
    return 3 if k < num_cores - 1 else 0


class _QuantTT(QuantModule):
    """Quantized TT layer: LSQ on every core (per bond channel when per-channel, see
    :func:`core_channel_axis`) and on every intermediate
    result of the contraction (QAT-TT, Yang et al. 2023: 4-bit cores, 8-bit intermediates).

    It is the TT layer itself with :meth:`effective_cores` returning the quantized cores and
    ``intermediate_quant`` set — the two hooks the TT layers offer. Frozen, the integer codes live in
    ``core_int_<k>`` buffers and ``cores`` hold their exact dequantized values (derived, not saved).
    """

    cores: nn.ParameterList
    intermediate_quant: LSQQuantizer | None
    quantizes_input = False  # TTLinear quantizes its input; an embedding's input is token ids

    @classmethod
    def wrap(cls, layer: nn.Module, weight_bits: int, act_bits: int | None, per_channel: bool, symmetric: bool,
             act_symmetric: bool, intermediates: bool = True) -> _QuantTT:
        """``layer`` with quantized cores and ``act_bits`` inputs (a linear's), and intermediates too unless
        ``intermediates`` is False."""
        out = copy.deepcopy(layer)
        out.__class__ = cls
        out.core_quant = core_quantizers(list(out.cores), weight_bits, symmetric, per_channel)
        act = None if act_bits is None else LSQQuantizer(act_bits, act_symmetric, activation=True)
        out.intermediate_quant = act if intermediates else None
        out.input_quant = copy.deepcopy(act) if cls.quantizes_input else None
        if hasattr(out, "_cache"):
            out._cache = None
        return out

    @property
    def frozen(self) -> bool:
        return hasattr(self, "core_int_0")

    def int_codes(self) -> dict[str, LSQQuantizer]:
        return {f"core_int_{k}": q for k, q in enumerate(self.core_quant)}

    def derived_keys(self) -> list[str]:
        return [f"cores.{k}" for k in range(len(self.cores))]

    def effective_cores(self) -> list[torch.Tensor]:
        if self.frozen:
            return list(self.cores)
        return [q(c) for q, c in zip(self.core_quant, self.cores, strict=True)]

    def _freeze_codes(self) -> None:
        for k, (q, c) in enumerate(zip(self.core_quant, self.cores, strict=True)):
            self.register_buffer(f"core_int_{k}", q.quantize(c))
        self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        for k, (q, c) in enumerate(zip(self.core_quant, self.cores, strict=True)):
            c.copy_(q.dequantize(getattr(self, f"core_int_{k}")))
            c.requires_grad_(False)


class QuantTTLinear(_QuantTT, TTLinear):
    """``TTLinear`` with quantized cores, intermediates and input."""

    quantizes_input = True

    def plan(self, tokens: int, training: bool = False, dtype: torch.dtype | None = None) -> Execution:
        """With quantized intermediates, always the unfused chain: the planner's choice changes with the
        token count, with training and with timing, and a fused core or a rebuilt weight is no activation
        that the learned 8-bit intermediate scale fits. Pinned, training, evaluation and the ONNX export
        quantize the same tensors."""
        if self.intermediate_quant is None:
            return super().plan(tokens, training, dtype)
        return unfused_chain(self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return TTLinear.forward(self, x)


class QuantTTEmbedding(_QuantTT, TTEmbedding):
    """``TTEmbedding`` with quantized cores and intermediates."""


def quantizers(model: nn.Module) -> list[LSQQuantizer]:
    return [m for m in model.modules() if isinstance(m, LSQQuantizer)]


def quant_modules(model: nn.Module) -> list[tuple[str, QuantModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]


def vector_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the vectors of the quantized layers: each one's bias and its quantizers' step sizes
    and zero points. A frozen quantized model keeps them at half precision (:func:`round_vectors`), so its
    packed file stores them in 2 bytes a value (fp32, they were 6% of a 1.8 MB 4-bit TT MiniLM). Float
    layers and layer norms keep fp32: the rule follows each layer's own bit width, so the size of a plan
    stays a sum over its layers (:mod:`fitformer.search.allocate`)."""
    keys = []
    for name, module in quant_modules(model):
        prefix = f"{name}." if name else ""
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            keys.append(f"{prefix}bias")
        keys += [prefix + k for k, _ in module.named_parameters() if k.endswith(("scale", "zero_point"))]
    return keys


@torch.no_grad()
def round_vectors(model: nn.Module) -> nn.Module:
    """Round every :func:`vector_keys` entry to the nearest fp16 value, in place (kept in its own dtype)."""
    state = model.state_dict(keep_vars=True)
    for key in vector_keys(model):
        t = state[key]
        if t.is_floating_point():
            t.copy_(t.to(torch.float16))
    return model
