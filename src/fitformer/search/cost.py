"""From a decoded candidate to the hardware cost model's inputs, and to a real :class:`CompressionPlan`.

:func:`spec_to_config` feeds the analytic model's fast path (``AnalyticCostModel.estimate_config``: plain
numbers, no plan objects), which is what lets a search score well over 100 candidates per second.
:func:`spec_to_plan` turns the same candidate into the plan ``apply_plan`` executes (sub-network extraction,
then per layer: factorise, sparsify, quantize), so what is searched is exactly what is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..compress import CompressionPlan, LayerPlan
from ..hardware import AnalyticCostModel, AnalyticModel, DeviceSpec, EncoderArch, LinearCompression
from .space import CandidateSpec, DeviceLimits, EncoderShape, LayerSpec

SPARSE_PREFERENCE = ("hp", "2:4", "block")  # formats a device may run natively, best first


def device_limits(spec: DeviceSpec, bits: tuple[int, ...] = (32, 8, 7, 6, 5, 4, 3, 2),
                  sparsities: tuple[float, ...] = (0.0, 0.5, 0.75)) -> DeviceLimits:
    """What the search may choose on a device: bit widths it runs on integer kernels (32 always; narrower
    ones stored packed), and HP sparsity only where the device declares a sparse format."""
    native = tuple(b for b in bits if b == 32 or _runs_integer(spec, b))
    sparse = sparsities if spec.sparsity_formats else (0.0,)
    return DeviceLimits(bits=native, sparsities=tuple(sparse))


def _runs_integer(spec: DeviceSpec, bits: int) -> bool:
    """Whether ``bits``-bit weights run on the device's integer kernels: natively, or stored packed and
    widened to the narrowest integer type it runs (4-bit codes on int8 GEMMs, as the ONNX export does)."""
    dtype, native = spec.dtype_for_bits(bits)
    return native or dtype.startswith("int")


def sparse_format_for(spec: DeviceSpec | None) -> str:
    """The sparse format the device runs best (``unstructured`` when it declares none)."""
    formats = spec.sparsity_formats if spec is not None else []
    return next((f for f in SPARSE_PREFERENCE if f in formats), "unstructured")


def spec_to_config(spec: CandidateSpec, shape: EncoderShape, sparse_format: str = "unstructured"
                   ) -> tuple[EncoderArch, dict[str, LinearCompression]]:
    """The candidate as (architecture, module name -> linear compression) for ``ops_from_config``."""
    arch = EncoderArch(layers=spec.arch.num_layers, hidden=spec.arch.hidden_size, heads=shape.num_heads,
                       ffn=shape.intermediate_size, head_dim=shape.head_dim, vocab=shape.vocab_size,
                       layer_heads=spec.arch.heads, layer_ffn=spec.arch.ffn)
    comp: dict[str, LinearCompression] = {}
    for x in spec.layers:
        comp[x.name] = _linear(x, sparse_format)
    return arch, comp


def _linear(x: LayerSpec, sparse_format: str) -> LinearCompression:
    if x.format == "tt" and math.prod(x.in_modes) == x.in_features and math.prod(x.out_modes) == x.out_features:
        from ..layers.tensorize import bond_ranks

        return LinearCompression(factor="tt", tt_in_modes=x.in_modes, tt_out_modes=x.out_modes,
                                 tt_ranks=bond_ranks(x.in_modes, x.out_modes, x.rank)[1:-1], bits=x.bits)
    if x.format in ("tt", "lowrank"):
        return LinearCompression(factor="lowrank", rank=x.rank, bits=x.bits)
    return LinearCompression(bits=x.bits, sparsity=x.sparsity, sparse_format=sparse_format if x.sparsity else "")


@dataclass
class AnalyticCost:
    """Latency, energy, EDP and size of candidates on one device (picklable, so workers can use it)."""

    device: DeviceSpec
    shape: EncoderShape
    input_shape: tuple[int, int] = (1, 128)
    model: AnalyticModel | None = None  # a calibrated model of the device; default: the spec's figures

    def __post_init__(self) -> None:
        analytic = self.model or AnalyticModel(self.device)
        base = EncoderArch(layers=self.shape.num_layers, hidden=self.shape.hidden_size, heads=self.shape.num_heads,
                           ffn=self.shape.intermediate_size, vocab=self.shape.vocab_size)
        self._cost = AnalyticCostModel(analytic, base)
        self._format = sparse_format_for(self.device)

    def __call__(self, spec: CandidateSpec) -> dict[str, float]:
        arch, comp = spec_to_config(spec, self.shape, self._format)
        cost = self._cost.estimate_config(arch, comp, self.input_shape)
        size = float(spec.file_bytes())
        return {"latency_ms": cost.latency_ms, "energy_mj": cost.energy_j * 1e3, "edp_mjs": cost.edp * 1e3,
                "size_bytes": size, "memory_bytes": cost.peak_memory_bytes,
                "fits": float(size <= self.device.dram_bytes.value), "supported": float(cost.supported)}


def spec_to_plan(spec: CandidateSpec, shape: EncoderShape) -> CompressionPlan:
    """The :class:`CompressionPlan` that builds this candidate from the full model."""
    from ..compress.positions import PositionTrimPlan
    from ..compress.prune import BalancedSparsityPlan
    from ..compress.quant import QuantPlan
    from ..compress.subnet import SubnetPlan
    from ..compress.tt import LowRankPlan, TTEmbeddingPlan, TTPlan

    steps = []
    full = (shape.num_layers, shape.hidden_size, (shape.num_heads,) * shape.num_layers,
            (shape.intermediate_size,) * shape.num_layers)
    a = spec.arch
    if (a.num_layers, a.hidden_size, a.heads, a.ffn) != full:
        steps.append(SubnetPlan(hidden=a.hidden_size, heads=a.heads, ffn=a.ffn))
    if shape.dropped_positions and spec.side_params < shape.side_params:  # a candidate, not the reference
        steps.append(PositionTrimPlan(rows=shape.position_rows))
    layers: dict[str, list[LayerPlan]] = {}
    for x in spec.all_layers():
        chain: list[Any] = []
        is_embedding = x is spec.embedding
        if x.format == "tt":
            chain.append(TTEmbeddingPlan(vocab_modes=x.in_modes, hidden_modes=x.out_modes, max_rank=x.rank,
                                         num_cores=len(x.in_modes)) if is_embedding else
                         TTPlan(in_modes=x.in_modes, out_modes=x.out_modes, max_rank=x.rank,
                                num_cores=len(x.in_modes)))
        elif x.format == "lowrank" and not is_embedding:
            chain.append(LowRankPlan(rank=x.rank))
        if x.sparsity > 0 and not is_embedding:
            m = 4
            chain.append(BalancedSparsityPlan(n=max(1, round(m * (1 - x.sparsity))), m=m))
        if x.bits < 32:  # integer kernels: 8-bit inputs. A TT layer keeps float intermediates: onnxruntime
            # runs its chain in float on the dequantized cores anyway, and quantized ones would pin training
            # to the unfused chain, 27x slower (QuantPlan)
            chain.append(QuantPlan(weight_bits=x.bits, act_bits=8, intermediates=x.format != "tt"))
        if chain:
            layers[x.name] = chain
    if spec.side_params and spec.side_bits < 32:  # the side weights follow a quantized word embedding
        position, token_type, pooler = shape.side_names()
        layers[position] = layers[token_type] = [QuantPlan(weight_bits=spec.side_bits, act_bits=None)]
        layers[pooler] = [QuantPlan(weight_bits=spec.side_bits, act_bits=8)]
    return CompressionPlan(layers=layers, model_steps=steps)
