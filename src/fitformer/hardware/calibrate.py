"""Calibrating the analytic model on the host from short micro-benchmarks.

``calibrate_host`` times probes — GEMMs of many shapes (fp32, dynamic int8, CSR-sparse), attention
batched GEMMs, element-wise kernels and a few tiny BERT classifiers (which carry the framework's dispatch
cost) — and fits the free parameters of :class:`~fitformer.hardware.analytic.AnalyticModel` (peaks, shape
knees, element-wise rate, per-launch overhead, int8 and sparse rates) by robust least squares on
log(predicted / measured). Bandwidths are measured directly with large and cache-sized copies. The result
is a :class:`~fitformer.hardware.spec.DeviceSpec` for the host plus an :class:`Efficiency`, cached on disk.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import least_squares

from ..errors import UserError
from ..io import cache_root, read_json, sha256_json, write_json_atomic
from .analytic import AnalyticModel, Efficiency, op_class
from .ops import (
    GELU_FLOPS,
    LAYERNORM_FLOPS,
    SOFTMAX_FLOPS,
    EncoderArch,
    LinearCompression,
    Op,
    linear_ops,
    ops_from_config,
)
from .spec import DeviceSpec, get_device, spec_from_dict
from .timing import measure

CALIBRATION_VERSION = 1


def host_key(threads: int, clock: str = "wall") -> dict[str, Any]:
    """What a host calibration depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "threads": threads, "clock": clock, "torch": torch.__version__,
            "version": CALIBRATION_VERSION}


def calibration_path(threads: int, clock: str = "wall") -> Path:
    return cache_root() / "hardware" / f"host-{sha256_json(host_key(threads, clock))[:16]}.json"


def _largest_cache_bytes() -> float:
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        mult = {"K": 1024, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(float(text.rstrip("KMG")) * mult)
    return max(sizes, default=8 * 2**20)


def _time_s(fn: Callable[[], object], quick: bool, clock: str = "wall") -> float:
    # The minimum is the estimate least disturbed by other processes (noise only ever adds time).
    t = measure(fn, warmup=2, repeats=5 if quick else 15, min_seconds=0.02 if quick else 0.1, max_seconds=2.0,
                clock=clock)
    if t.min_ms > 0.2 * t.median_ms:
        return t.min_ms / 1e3
    # a reading far below every other repetition (a CPU-time clock glitch can read a call as 0 s) is no
    # measurement: the median is then the better estimate
    return max(t.median_ms / 1e3, 1e-7)


def quantized_linear(in_features: int, out_features: int) -> torch.nn.Module:
    """A dynamically quantized int8 ``nn.Linear`` (PyTorch's fbgemm/qnnpack kernel)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(in_features, out_features)),
                                {torch.nn.Linear}, dtype=torch.qint8)[0]


def csr_weight(in_features: int, out_features: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """A random (out x in) weight with ``sparsity`` zeros, in CSR layout."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    w[torch.rand(w.shape, generator=g) < sparsity] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return w.to_sparse_csr()


def _probes(quick: bool) -> list[tuple[str, list[Op], Callable[[], object], float]]:
    """(label, ops, runnable, weight) for every probe."""
    probes: list[tuple[str, list[Op], Callable[[], object], float]] = []
    ms = (1, 32, 256) if quick else (1, 8, 32, 128, 512)
    shapes = ((64, 256), (256, 256), (384, 1536), (1536, 384)) if quick else \
        ((32, 32), (64, 256), (256, 64), (256, 256), (512, 512), (384, 1536), (1536, 384), (128, 512))
    for m in ms:
        for k, n in shapes:
            x, w = torch.randn(m, k), torch.randn(n, k)
            probes.append((f"gemm {m}x{k}x{n}", linear_ops(m, k, n), lambda x=x, w=w: F.linear(x, w), 1.0))
    for m in (8, 128) if quick else (8, 64, 256):
        for k, n in shapes[::2] if quick else shapes[1::2]:
            q, x = quantized_linear(k, n), torch.randn(m, k)
            probes.append((f"int8 {m}x{k}x{n}", linear_ops(m, k, n, LinearCompression(bits=8)),
                           lambda q=q, x=x: q(x), 1.0))
    for s in (0.5, 0.9) if quick else (0.5, 0.8, 0.95):
        for m, k, n in ((32, 256, 256), (128, 384, 1536)):
            w, x = csr_weight(k, n, s), torch.randn(m, k)
            comp = LinearCompression(sparsity=s, sparse_format="unstructured")
            probes.append((f"csr{s} {m}x{k}x{n}", linear_ops(m, k, n, comp),
                           lambda w=w, x=x: torch.sparse.mm(w, x.t()).t(), 1.0))
    attention = ((2, 32, 32), (32, 64, 8), (16, 64, 16)) if quick else \
        ((2, 32, 32), (32, 64, 8), (8, 64, 32), (8, 32, 8), (16, 64, 64), (4, 64, 16), (16, 64, 16), (12, 128, 32))
    for bh, s, d in attention:  # fused attention as the encoder runs it: scores, softmax, context
        q, k, v = (torch.randn(1, bh, s, d) for _ in range(3))
        ops = [Op("bmm", m=s, n=s, k=d, batch=bh), Op("softmax", m=bh * s, n=s, elem_flops=SOFTMAX_FLOPS),
               Op("bmm", m=s, n=d, k=s, batch=bh)]
        probes.append((f"attention {bh}x{s}x{d}", ops,
                       lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), 1.0))
    for rows, cols in ((16, 64), (256, 256), (1024, 1024)) if quick else ((16, 64), (128, 256), (512, 384),
                                                                          (1024, 1536)):
        x, ln = torch.randn(rows, cols), torch.nn.LayerNorm(cols)
        probes.append((f"gelu {rows}x{cols}", [Op("elementwise", m=rows, n=cols, elem_flops=GELU_FLOPS)],
                       lambda x=x: F.gelu(x), 1.0))
        probes.append((f"layernorm {rows}x{cols}", [Op("layernorm", m=rows, n=cols, elem_flops=LAYERNORM_FLOPS)],
                       lambda x=x, ln=ln: ln(x), 1.0))
        probes.append((f"softmax {rows}x{cols}", [Op("softmax", m=rows, n=cols, elem_flops=SOFTMAX_FLOPS)],
                       lambda x=x: torch.softmax(x, -1), 1.0))
    probes += _encoder_probes(quick)
    return probes


def _encoder_probes(quick: bool) -> list[tuple[str, list[Op], Callable[[], object], float]]:
    from transformers import BertConfig, BertForSequenceClassification

    out = []
    configs = ((1, 32, 2, 64, 1, 8), (3, 64, 4, 128, 2, 32)) if quick else \
        ((1, 32, 2, 64, 1, 8), (2, 64, 4, 128, 1, 32), (4, 32, 2, 64, 2, 16), (2, 128, 4, 512, 2, 64),
         (6, 64, 2, 256, 1, 16), (1, 64, 8, 128, 4, 64), (2, 160, 4, 320, 4, 64), (1, 320, 4, 640, 1, 32))
    for layers, hidden, heads, ffn, batch, seq in configs:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=512, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=ffn, max_position_embeddings=max(seq, 64))
        model = BertForSequenceClassification(cfg).eval()
        ids = torch.randint(0, 512, (batch, seq))
        arch = EncoderArch(layers=layers, hidden=hidden, heads=heads, ffn=ffn, vocab=512)

        def run(model: torch.nn.Module = model, ids: torch.Tensor = ids) -> object:
            with torch.inference_mode():
                return model(input_ids=ids)

        out.append((f"bert L{layers} H{hidden} b{batch} s{seq}", ops_from_config(arch, batch=batch, seq_len=seq),
                    run, 3.0))
    return out


def _bandwidth(nbytes: int, quick: bool, clock: str = "wall") -> float:
    x = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    seconds = _time_s(lambda: y.copy_(x), quick, clock)
    return 2 * nbytes / seconds  # read + write


def _build_spec(base: DeviceSpec, values: dict[str, float], threads: int, measured: dict[str, float]) -> DeviceSpec:
    data = base.model_dump()
    tag = f"measured: fitformer calibrate on this host ({threads} threads)"
    data.update(
        name="host", kind="cpu", description=f"this machine: {host_key(threads)['cpu']}, {threads} threads",
        peak_flops={"fp32": {"value": values["peak_fp32"], "source": f"{tag}, fitted GEMM peak"},
                    "int8": {"value": values["peak_int8"], "source": f"{tag}, fitted dynamic-int8 GEMM peak"}},
        dram_bandwidth={"value": measured["dram_bw"], "source": f"{tag}, 256 MB copy"},
        onchip_bandwidth={"value": measured["chip_bw"], "source": f"{tag}, cache-sized copy"},
        onchip_bytes={"value": measured["cache_bytes"], "source": "measured: largest cache level in sysfs"},
        launch_overhead_s={"value": values["launch_s"], "source": f"{tag}, fitted per-op dispatch"},
        sparsity_formats=[], sparse_speedup=1.0,
    )
    energy = dict(data["energy_pj_per_flop"])
    for dtype in ("fp32", "int8"):
        entry = energy.get(dtype) or energy.get("fp32")
        energy[dtype] = {"value": entry["value"], "source": f"copied from catalog device '{base.name}' "
                                                            "(host power is not measured)"}
    data["energy_pj_per_flop"] = {k: energy[k] for k in ("fp32", "int8")}
    return spec_from_dict(data, "<host calibration>")


Probe = tuple[str, list[Op], Callable[[], object], float]


def calibrate_host(threads: int | None = None, quick: bool = False, energy_like: str = "laptop-i7-1185g7",
                   log: Callable[[str], None] | None = None, clock: str = "wall",
                   extra_probes: list[Probe] | None = None) -> dict[str, Any]:
    """Run the probes, fit the model, and return ``{"spec", "efficiency", "probes", "key"}`` (not saved).

    ``clock="cpu"`` (one thread only) times CPU time, which a busy shared machine does not inflate.
    ``extra_probes`` — (label, ops, runnable, weight) — add probes of the layer implementations in use
    (e.g. a TT or low-rank module inside a tiny encoder).
    """
    threads = threads or torch.get_num_threads()
    if clock == "cpu" and threads != 1:
        raise UserError("CPU-time calibration needs one thread (CPU time of several threads is not latency); "
                        "use --threads 1 or --clock wall")
    torch.set_num_threads(threads)
    log = log or (lambda _msg: None)
    base = get_device(energy_like)
    measured = {"dram_bw": _bandwidth(256 * 2**20 if not quick else 64 * 2**20, quick, clock),
                "cache_bytes": _largest_cache_bytes()}
    measured["chip_bw"] = max(_bandwidth(256 * 1024, quick, clock), measured["dram_bw"])
    log(f"bandwidth: DRAM {measured['dram_bw'] / 1e9:.1f} GB/s, cache {measured['chip_bw'] / 1e9:.1f} GB/s")
    probes = _probes(quick) + list(extra_probes or [])
    times = []
    for label, _ops, fn, _w in probes:
        times.append(_time_s(fn, quick, clock))
        log(f"{label}: {times[-1] * 1e3:.3f} ms")
    times_arr = np.array(times)
    weights = np.array([w for *_, w in probes])
    names = ["peak_fp32", "peak_int8", "m_half", "n_half", "k_half", "elem_frac", "launch_s", "sparse_frac",
             "bmm_frac", "framework_s", "int_gemm_s", "bmm_half"]
    x0 = np.log([50e9, 100e9, 4.0, 16.0, 16.0, 0.05, 5e-6, 0.05, 0.5, 20e-6, 5e-6, 8.0])

    def model_for(theta: np.ndarray) -> AnalyticModel:
        v = dict(zip(names, np.exp(theta), strict=True))
        spec = _build_spec(base, v, threads, measured)
        eff = Efficiency(gemm_frac=1.0, m_half=v["m_half"], n_half=v["n_half"], k_half=v["k_half"],
                         elem_frac=v["elem_frac"], mem_frac=1.0, launch_scale=1.0, sparse_frac=v["sparse_frac"],
                         bmm_frac=v["bmm_frac"], framework_s=v["framework_s"], int_gemm_s=v["int_gemm_s"],
                         bmm_half=v["bmm_half"])
        return AnalyticModel(spec, eff)

    def residuals(theta: np.ndarray) -> np.ndarray:
        m = model_for(theta)
        pred = np.array([m.latency_s(ops) for _l, ops, _f, _w in probes])
        return weights * (np.log(pred) - np.log(times_arr))

    lower = np.log([1e8, 1e8, 0.01, 0.01, 0.01, 1e-5, 1e-8, 1e-4, 1e-3, 1e-8, 1e-9, 0.01])
    upper = np.log([1e14, 1e15, 1e4, 1e4, 1e4, 10.0, 1e-2, 10.0, 10.0, 1e-2, 1e-2, 1e4])
    fit = least_squares(residuals, x0, bounds=(lower, upper), loss="soft_l1", f_scale=0.1)
    model = model_for(fit.x)
    pred = np.array([model.latency_s(ops) for _l, ops, _f, _w in probes])
    ape = np.abs(pred - times_arr) / times_arr
    log(f"fit: probe MAPE {ape.mean():.3f} over {len(probes)} probes")
    return {
        "key": host_key(threads, clock),
        "spec": model.spec.model_dump(),
        "efficiency": model.eff.to_dict(),
        "probe_mape": float(ape.mean()),
        "probes": [{"label": p[0], "measured_s": float(t), "predicted_s": float(q)}
                   for p, t, q in zip(probes, times_arr, pred, strict=True)],
    }


def save_calibration(result: dict[str, Any], path: str | Path | None = None) -> Path:
    target = Path(path) if path else calibration_path(result["key"]["threads"], result["key"]["clock"])
    write_json_atomic(target, result)
    return target


def load_calibration(path: str | Path) -> AnalyticModel:
    """An analytic model from a calibration file written by :func:`save_calibration`."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no calibration file; run `fitformer calibrate` first")
    data = read_json(p)
    if not isinstance(data, dict) or "spec" not in data or "efficiency" not in data:
        raise UserError(f"{p}: not a calibration file (needs 'spec' and 'efficiency'); rerun `fitformer calibrate`")
    return AnalyticModel(spec_from_dict(data["spec"], str(p)), Efficiency.from_dict(data["efficiency"]))


def host_model(threads: int | None = None, calibrate_if_missing: bool = True, quick: bool = False,
               clock: str = "wall") -> AnalyticModel:
    """The calibrated analytic model of this host, from the cache (calibrating once if needed)."""
    threads = threads or torch.get_num_threads()
    path = calibration_path(threads, clock)
    if not path.exists():
        if not calibrate_if_missing:
            raise UserError(f"this host is not calibrated for {threads} threads; run `fitformer calibrate "
                            f"--threads {threads}`")
        save_calibration(calibrate_host(threads, quick=quick, clock=clock), path)
    return load_calibration(path)


def with_efficiency(model: AnalyticModel, **changes: float) -> AnalyticModel:
    """A copy of ``model`` with some efficiency parameters replaced."""
    return AnalyticModel(model.spec, dataclasses.replace(model.eff, **changes), model.sparse_crossover)


# Efficiency fields refined on whole-model measurements, and per-class figures (op_class names).
_REFINED = ("gemm_frac", "m_half", "n_half", "k_half", "elem_frac", "launch_scale", "sparse_frac", "bmm_frac",
            "bmm_half", "framework_s", "int_gemm_s")
_FLOOR = {"framework_s": 3e-6, "int_gemm_s": 3e-6, "bmm_half": 1e-3, "m_half": 1e-3, "n_half": 1e-3,
          "k_half": 1e-3}


def _unique_ops(samples: Sequence[Sequence[Op]], model: AnalyticModel) -> tuple[list[tuple[Op, bool]], np.ndarray]:
    """The distinct (op, weights on chip) pairs of ``samples`` and the count matrix (samples x distinct ops):
    a sample's latency is the count-weighted sum of distinct op latencies, so a fit costs few op evaluations."""
    index: dict[tuple[Op, bool], int] = {}
    entries: list[tuple[int, int]] = []
    for i, ops in enumerate(samples):
        on_chip = model.weights_fit(ops)
        for op in ops:
            key = (dataclasses.replace(op, name=op_class(op)), on_chip)
            entries.append((i, index.setdefault(key, len(index))))
    counts = np.zeros((len(samples), len(index)))
    for i, j in entries:
        counts[i, j] += 1.0
    return list(index), counts


def refine_calibration(model: AnalyticModel, samples: Sequence[Sequence[Op]], latencies_s: Sequence[float],
                       prior_weight: float = 0.05, log: Callable[[str], None] | None = None) -> AnalyticModel:
    """Refit the efficiency figures of ``model`` on measured latencies of whole models (their op lists).

    Micro-benchmarks time kernels alone; a whole eager model also pays the framework code around each call
    (module dispatch, the quantize/dequantize of dynamic int8, the reshapes of a TT layer, sparse-format
    conversions), which differs by kind of layer. This fits the shared efficiency figures plus a fixed cost
    per call and a rate factor per op class (:func:`~fitformer.hardware.analytic.op_class`) by robust least
    squares on log latency, with a weak prior (``prior_weight``) pulling every figure towards its
    micro-benchmark value so that figures the measurements do not constrain stay where they were. The
    device spec (peaks, bandwidths) is kept: only how much of it real kernels reach changes.
    """
    y = np.asarray(latencies_s, dtype=float)
    if len(samples) != len(y) or len(y) < 8:
        raise UserError(f"refining a calibration needs at least 8 measured models with latencies, got {len(y)}")
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise UserError("refining a calibration needs positive, finite measured latencies")
    unique, counts = _unique_ops(samples, model)
    classes = sorted({op_class(op) for op, _ in unique if op.kind != "dispatch"})
    base = model.eff
    start = {n: max(float(getattr(base, n)), _FLOOR.get(n, 1e-6)) for n in _REFINED}
    start.update({f"frac:{c}": base.class_frac.get(c, 1.0) for c in classes if c not in ("gemm",)})
    start.update({f"over:{c}": max(base.class_overhead_s.get(c, 0.0), 3e-6) for c in classes})
    narrow = [c for c in ("tt", "lowrank", "sparse", "int8") if c in classes]  # GEMMs with a thin operand
    start.update({f"half:{c}": max(base.class_narrow_half.get(c, 0.0), 1.0) for c in narrow})
    names = list(start)
    exps = [f"exp:{c}" for c in classes]  # size trends: signed, fitted as they are (the rest in log space)
    x0 = np.concatenate([np.log([start[n] for n in names]), [base.class_size_exp.get(c, 0.0) for c in classes]])
    span = np.concatenate([np.full(len(names), np.log(1e4)), np.full(len(exps), 1.0)])

    def eff_for(theta: np.ndarray) -> Efficiency:
        v = dict(zip(names, np.exp(theta[:len(names)]), strict=True))
        v.update(zip(exps, theta[len(names):], strict=True))
        return dataclasses.replace(
            base, **{n: float(v[n]) for n in _REFINED},
            class_frac={c: float(v[f"frac:{c}"]) for c in classes if f"frac:{c}" in v},
            class_overhead_s={c: float(v[f"over:{c}"]) for c in classes},
            class_size_exp={c: float(v[f"exp:{c}"]) for c in classes},
            class_narrow_half={c: float(v[f"half:{c}"]) for c in narrow})

    def predict(theta: np.ndarray) -> np.ndarray:
        m = AnalyticModel(model.spec, eff_for(theta), model.sparse_crossover)
        return counts @ np.array([m.op_cost(op, on_chip).latency_s for op, on_chip in unique])

    def residuals(theta: np.ndarray) -> np.ndarray:
        return np.concatenate([np.log(predict(theta)) - np.log(y), prior_weight * (theta - x0)])

    fit = least_squares(residuals, x0, bounds=(x0 - span, x0 + span), loss="soft_l1", f_scale=0.1, max_nfev=500)
    pred = predict(fit.x)
    if log:
        log(f"refined on {len(y)} measured models: MAPE {np.mean(np.abs(pred - y) / y):.3f}")
    return AnalyticModel(model.spec, eff_for(fit.x), model.sparse_crossover)
