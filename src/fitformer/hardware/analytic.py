"""Analytic cost model: a roofline per operator with shape-dependent efficiency, plus energy and EDP.

Per op (Williams et al., "Roofline", CACM 2009, extended with a dispatch term)::

    latency = max(flops / (peak[dtype] * eff(shape) * f), (weight_bytes / bw_w + act_bytes / bw_a) / f)
              + launches * (t_launch + t_class[class]),    f = f[class] * (work / 1 MFLOP) ** e[class]
    eff(m, n, k) = gemm_frac * m/(m + m_half) * n/(n + n_half) * k/(k + k_half)

where weights stream from DRAM unless all of the model's weights fit on chip, and activations come from
on-chip memory when the op's working set fits there. Energy follows Horowitz (ISSCC 2014) and HEAT::

    energy = sum(flops * E_flop[dtype]) + dram_bytes * E_dram + onchip_bytes * E_onchip + P_static * latency

``class`` is the kind of kernel an op runs (:func:`op_class`: dense, int8, sparse, TT or low-rank GEMM,
attention matmul, softmax, ...): each kind has its own fixed cost per call (``t_class``: the framework code
around a quantized, sparse or factorised layer) and its own achieved fraction of the peaks, with a trend in
the size of one call (``e``: small calls of some kernels run far below their large-call speed).

EDP = energy * latency. The efficiency parameters default to generic values and are calibrated for the
host by :mod:`fitformer.hardware.calibrate`, so the same equations can be trusted on described devices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

from ..errors import UserError
from ..layers.sparse import crossover_speedup
from .ops import Op
from .spec import DTYPE_BITS, DeviceSpec

OP_CLASSES = ("gemm", "int8", "sparse", "tt", "lowrank", "bmm", "softmax", "layernorm", "elementwise",
              "embedding", "tt_permute", "quantize")


def op_class(op: Op) -> str:
    """The kind of kernel ``op`` runs, the key of the per-class efficiency and overhead figures."""
    if op.kind == "gemm":
        if op.tag in ("tt", "lowrank"):
            return op.tag
        if op.sparse_format and op.sparsity > 0:
            return "sparse"
        return "int8" if op.bits <= 8 else "gemm"
    if op.kind == "elementwise" and op.tag == "tt":
        return "tt_permute"
    if op.kind == "elementwise" and op.name.endswith(".quantize"):
        return "quantize"
    return op.kind


@dataclass
class Efficiency:
    """Fractions of the datasheet peaks that real kernels reach, and shape knees (see module docstring)."""

    gemm_frac: float = 0.6
    m_half: float = 4.0
    n_half: float = 16.0
    k_half: float = 16.0
    bits_frac: dict[str, float] = field(default_factory=dict)  # extra factor per dtype (e.g. dynamic int8)
    elem_frac: float = 0.05  # element-wise work vs. the fp32 peak (vector units, no FMA reuse)
    mem_frac: float = 0.7  # achieved fraction of the bandwidth figures
    launch_scale: float = 1.0  # multiplies the spec's launch overhead
    sparse_frac: float = 0.1  # unsupported-by-hardware sparse kernels: rate on nonzeros vs. dense peak
    bmm_frac: float = 1.0  # extra factor for activation-activation matmuls (attention)
    bmm_half: float = 0.0  # attention matmuls: smallest of (m, n, k) at which efficiency halves (head dim)
    framework_s: float = 0.0  # eager-runtime cost of one container-module call ("dispatch" ops)
    int_gemm_s: float = 0.0  # fixed extra cost of an integer GEMM call (scales, packing of dynamic int8 kernels)
    class_frac: dict[str, float] = field(default_factory=dict)  # extra rate factor per op class (op_class)
    class_overhead_s: dict[str, float] = field(default_factory=dict)  # extra fixed cost per call, per op class
    class_size_exp: dict[str, float] = field(default_factory=dict)  # per op class: rate ~ (work / 1 MFLOP) ** exp
    class_narrow_half: dict[str, float] = field(default_factory=dict)  # per GEMM class: knee in min(n, k)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Efficiency:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UserError(f"efficiency parameters have unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        for name in ("class_frac", "class_overhead_s", "class_size_exp", "class_narrow_half"):
            bad = set(data.get(name, {})) - set(OP_CLASSES)
            if bad:
                raise UserError(f"efficiency field '{name}' has unknown op class(es) {sorted(bad)}; "
                                f"known: {list(OP_CLASSES)}")
        return cls(**data)


@dataclass
class OpCost:
    """Latency and energy of one op, with the bound that decided it."""

    name: str
    latency_s: float
    energy_j: float
    bound: str  # "compute", "memory" or "launch"
    dtype: str
    native: bool


@dataclass
class Cost:
    """What a candidate costs on a device for one input shape."""

    latency_s: float
    energy_j: float = math.nan
    weight_bytes: float = 0.0
    peak_memory_bytes: float = 0.0
    flops: float = 0.0
    weights_fit_on_chip: bool = False
    supported: bool = True  # every op runs in a data type the device supports natively
    source: str = ""  # "analytic", "predictor" or "measured"
    latency_std_s: float = 0.0

    @property
    def latency_ms(self) -> float:
        return self.latency_s * 1e3

    @property
    def edp(self) -> float:
        """Energy-delay product in joule-seconds."""
        return self.energy_j * self.latency_s

    def to_dict(self) -> dict:
        return {**asdict(self), "latency_ms": self.latency_ms, "edp_js": self.edp}


class AnalyticModel:
    """Roofline latency, energy and EDP of op lists on one device."""

    def __init__(self, spec: DeviceSpec, efficiency: Efficiency | None = None,
                 sparse_crossover: list[dict] | None = None):
        """``sparse_crossover`` holds rows measured by :func:`fitformer.layers.sparse.measure_sparse_crossover`
        on this device; with them, sparsity the hardware does not support natively costs what the measured
        sparse kernels really gained (nothing where dense was faster, since execution then runs dense)."""
        self.spec = spec
        self.eff = efficiency or Efficiency()
        self.sparse_crossover = sparse_crossover

    def _dtype(self, bits: int) -> tuple[str, bool]:
        return self.spec.dtype_for_bits(bits)

    def _size_factor(self, op: Op, cls: str) -> float:
        """(work / 1 MFLOP) ** class_size_exp[cls]: the class's efficiency trend with the size of one call,
        where a kernel's speed depends on its problem size in ways the knees above do not capture."""
        factor = 1.0
        half = self.eff.class_narrow_half.get(cls, 0.0)
        if half and op.kind in ("gemm", "bmm"):
            narrow = min(op.n, op.k)
            factor = narrow / (narrow + half)
        exponent = self.eff.class_size_exp.get(cls, 0.0)
        if not exponent:
            return factor
        work = op.flops if op.flops > 0 else op.act_bytes + op.weight_bytes
        return factor * (max(work, 1.0) / 1e6) ** exponent

    def op_cost(self, op: Op, weights_on_chip: bool) -> OpCost:
        spec, eff = self.spec, self.eff
        if op.kind == "dispatch":
            return OpCost(op.name, op.launches * eff.framework_s, 0.0, "launch", "", True)
        cls = op_class(op)
        flops = op.flops
        if op.kind in ("gemm", "bmm"):
            dtype, native = self._dtype(op.bits if op.kind == "gemm" else op.act_bits)
            rate = spec.peak(dtype) * eff.gemm_frac * eff.bits_frac.get(dtype, 1.0)
            rate *= (op.m / (op.m + eff.m_half)) * (op.n / (op.n + eff.n_half)) * (op.k / (op.k + eff.k_half))
            if op.kind == "bmm":
                d = min(op.m, op.n, op.k)
                rate *= eff.bmm_frac * d / (d + eff.bmm_half)
            bits = op.bits if op.kind == "gemm" else op.act_bits
            if not native and DTYPE_BITS[dtype] < bits:  # no wide enough type: emulated in several passes
                rate /= bits / DTYPE_BITS[dtype]
            if op.sparse_format and op.sparsity > 0:
                if op.sparse_format in spec.sparsity_formats:
                    flops /= min(spec.sparse_speedup, 1.0 / (1.0 - op.sparsity))
                elif self.sparse_crossover is not None and op.kind == "gemm":
                    flops /= crossover_speedup(self.sparse_crossover, op.n, op.k, op.sparsity, op.m * op.batch)
                elif eff.sparse_frac > 0 and op.sparse_format == "unstructured":
                    flops *= 1.0 - op.sparsity
                    rate = spec.peak(dtype) * eff.sparse_frac
        else:
            dtype, native = "fp32" if "fp32" in spec.peak_flops else self._dtype(op.act_bits)[0], True
            rate = spec.peak(dtype) * eff.elem_frac
        frac = eff.class_frac.get(cls, 1.0) * self._size_factor(op, cls)
        rate *= frac
        t_compute = flops / rate if flops > 0 else 0.0
        act_on_chip = op.act_bytes <= spec.onchip_bytes.value
        bw_dram = spec.dram_bandwidth.value * eff.mem_frac * frac
        bw_chip = spec.onchip_bandwidth.value * eff.mem_frac * frac
        t_mem = op.weight_bytes / (bw_chip if weights_on_chip else bw_dram)
        t_mem += op.act_bytes / (bw_chip if act_on_chip else bw_dram)
        t_launch = op.launches * (spec.launch_overhead_s.value * eff.launch_scale + eff.class_overhead_s.get(cls, 0.0))
        if op.kind == "gemm" and op.bits <= 8:
            t_launch += eff.int_gemm_s
        latency = max(t_compute, t_mem) + t_launch
        bound = "compute" if t_compute >= t_mem else "memory"
        if t_launch > max(t_compute, t_mem):
            bound = "launch"
        dram = (0.0 if weights_on_chip else op.weight_bytes) + (0.0 if act_on_chip else op.act_bytes)
        chip = op.weight_bytes + op.act_bytes - dram
        e_flop = spec.energy_pj_per_flop[dtype].value
        energy = (flops * e_flop + dram * spec.energy_pj_per_dram_byte.value
                  + chip * spec.energy_pj_per_onchip_byte.value) * 1e-12
        return OpCost(op.name, latency, energy, bound, dtype, native)

    def breakdown(self, ops: Iterable[Op]) -> list[OpCost]:
        ops = list(ops)
        on_chip = self.weights_fit(ops)
        return [self.op_cost(op, on_chip) for op in ops]

    def weights_fit(self, ops: Iterable[Op]) -> bool:
        return sum(op.weight_bytes for op in ops) <= self.spec.onchip_bytes.value

    def latency_s(self, ops: Iterable[Op]) -> float:
        return sum(c.latency_s for c in self.breakdown(ops))

    def estimate_ops(self, ops: Iterable[Op]) -> Cost:
        """Latency, energy (dynamic + static x latency), weights, peak memory and on-chip fit of ``ops``."""
        ops = list(ops)
        costs = self.breakdown(ops)
        latency = sum(c.latency_s for c in costs)
        dynamic = sum(c.energy_j for c in costs)
        wbytes = sum(op.weight_bytes for op in ops)
        peak_act = max((op.act_bytes for op in ops), default=0.0)
        return Cost(latency_s=latency, energy_j=dynamic + self.spec.static_power_w.value * latency,
                    weight_bytes=wbytes, peak_memory_bytes=wbytes + peak_act,
                    flops=sum(op.flops for op in ops), weights_fit_on_chip=wbytes <= self.spec.onchip_bytes.value,
                    supported=all(c.native for c in costs), source="analytic")
