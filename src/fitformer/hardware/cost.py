"""One question, three answers: what does this plan cost on this device for this input shape?

``CostModel.estimate(plan, input_shape) -> Cost`` is implemented by

* :class:`AnalyticCostModel` — the roofline model of :mod:`.analytic` (any catalog device, or the
  calibrated host); fast enough for search (well over 100 candidates/s);
* :class:`PredictorCostModel` — the learned latency predictor of :mod:`.predictor` (host only);
* :class:`MeasuredCostModel` — applies the plan to a real model and times it on the host.

A cost model is built for one base architecture; plans are turned into ops by
:func:`fitformer.hardware.ops.ops_from_plan` (the one place that translation lives).
``input_shape`` is ``(batch, seq_len)``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import UserError
from .analytic import AnalyticModel, Cost
from .ops import EncoderArch, LinearCompression, Op, ops_from_config, ops_from_plan
from .timing import measure


def _shape(input_shape: Any) -> tuple[int, int]:
    try:
        batch, seq_len = (int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise UserError(f"input shape must be (batch, seq_len), got {input_shape!r}") from None
    if batch < 1 or seq_len < 1:
        raise UserError(f"input shape must be positive, got {input_shape!r}")
    return batch, seq_len


class CostModel(Protocol):
    """Anything that answers ``estimate(plan, input_shape) -> Cost``."""

    def estimate(self, plan: Any, input_shape: tuple[int, int]) -> Cost: ...


class AnalyticCostModel:
    """Roofline latency / energy / EDP of plans for a base architecture on a device."""

    def __init__(self, model: AnalyticModel, arch: EncoderArch):
        self.model, self.arch = model, arch

    def ops(self, plan: Any, input_shape: tuple[int, int]) -> list[Op]:
        batch, seq_len = _shape(input_shape)
        return ops_from_plan(self.arch, plan, batch, seq_len)

    def estimate(self, plan: Any, input_shape: tuple[int, int]) -> Cost:
        return self.model.estimate_ops(self.ops(plan, input_shape))

    def estimate_config(self, arch: EncoderArch, compression: dict[str, LinearCompression] | None,
                        input_shape: tuple[int, int]) -> Cost:
        """The fast path for search: plain numbers, no plan objects."""
        batch, seq_len = _shape(input_shape)
        return self.model.estimate_ops(ops_from_config(arch, compression, batch=batch, seq_len=seq_len))


class PredictorCostModel:
    """Latency from the learned predictor; energy from the analytic model's per-op energy at that latency."""

    def __init__(self, predictor: Any, arch: EncoderArch):
        self.predictor, self.analytic, self.arch = predictor, predictor.analytic, arch

    def estimate(self, plan: Any, input_shape: tuple[int, int]) -> Cost:
        batch, seq_len = _shape(input_shape)
        ops = ops_from_plan(self.arch, plan, batch, seq_len)
        return self.estimate_ops(ops, batch, seq_len)

    def estimate_ops(self, ops: list[Op], batch: int, seq_len: int) -> Cost:
        base = self.analytic.estimate_ops(ops)
        latency = float(self.predictor.predict([(ops, batch, seq_len)])[0])
        static = self.analytic.spec.static_power_w.value
        energy = base.energy_j - static * base.latency_s + static * latency
        return Cost(latency_s=latency, energy_j=energy, weight_bytes=base.weight_bytes,
                    peak_memory_bytes=base.peak_memory_bytes, flops=base.flops,
                    weights_fit_on_chip=base.weights_fit_on_chip, supported=base.supported, source="predictor")


class MeasuredCostModel:
    """Applies the plan to ``base_model`` and times the forward pass on this host (energy not measured)."""

    def __init__(self, base_model: nn.Module, threads: int | None = None, repeats: int = 20):
        self.base_model, self.threads, self.repeats = base_model, threads, repeats

    def estimate(self, plan: Any, input_shape: tuple[int, int]) -> Cost:
        from ..compress import apply_plan

        batch, seq_len = _shape(input_shape)
        model = apply_plan(self.base_model, plan) if plan is not None else self.base_model
        return measure_module(model, batch, seq_len, threads=self.threads, repeats=self.repeats)


def measure_module(model: nn.Module, batch: int, seq_len: int, threads: int | None = None,
                   repeats: int = 20) -> Cost:
    """Time ``model(input_ids)`` on random token ids; latency is the median, spread the trimmed std."""
    if threads:
        torch.set_num_threads(threads)
    model.eval()
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2)
    ids = torch.randint(0, vocab, (batch, seq_len))

    def run() -> object:
        with torch.inference_mode():
            return model(input_ids=ids)

    timing = measure(run, warmup=3, repeats=repeats)
    wbytes = float(sum(p.numel() * p.element_size() for p in model.parameters()))
    return Cost(latency_s=timing.median_ms / 1e3, energy_j=math.nan, weight_bytes=wbytes,
                peak_memory_bytes=wbytes, source="measured", latency_std_s=timing.std_ms / 1e3)
