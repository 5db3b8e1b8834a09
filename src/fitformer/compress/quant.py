"""The ``quant`` plan kind: LSQ quantization-aware training of Linear, Embedding and TT layers.

``quantize(model, spec)`` returns a copy ready for quantization-aware training, ``calibrate`` initialises
the activation step sizes from a few batches, and ``freeze`` turns the trained copy into integer weights
plus step sizes (saved packed by :mod:`fitformer.export.quantized`).

A spec is plain data: one :class:`QuantPlan` for every supported layer, or a mapping from layer names,
``fnmatch`` patterns or layer type names (``"Linear"``, ``"Embedding"``, ``"TTLinear"``, ``"TTEmbedding"``)
to a plan (or its dict form, or ``None`` to keep the layer in float). Names win over types.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError
from ..layers.quant import (
    LSQQuantizer,
    QuantEmbedding,
    QuantLinear,
    QuantModule,
    QuantTTEmbedding,
    QuantTTLinear,
    check_bits,
    quantizers,
    round_vectors,
)
from ..layers.tt import TTEmbedding, TTLinear
from .plan import CompressionPlan, LayerPlan, apply_plan, plan_from_dict, plan_to_dict, register_handler, register_plan


@register_plan
@dataclass(frozen=True)
class QuantPlan(LayerPlan):
    """Quantize a layer's weights to ``weight_bits`` and its inputs to ``act_bits`` (``None``: weight-only).

    ``per_channel`` gives each output row (linear), table row (embedding) or bond channel of a core
    (TT, :func:`~fitformer.layers.quant.core_channel_axis`) its own step size; ``symmetric`` chooses signed
    weights with zero point 0; activations are asymmetric (unsigned, with a learned zero point) unless
    ``act_symmetric``. TT layers also quantize every intermediate result of their contraction to
    ``act_bits`` unless ``intermediates`` is False: quantized intermediates pin the layer to its unfused
    core-by-core chain, which trains 27x slower than the planner's execution (3.4 s against 126 ms per
    step of a 4-bit 384x1536 rank-32 layer on 1,024 tokens, 2 cores).
    """

    kind: ClassVar[str] = "quant"
    weight_bits: int = 8
    act_bits: int | None = 8
    per_channel: bool = True
    symmetric: bool = True
    act_symmetric: bool = False
    intermediates: bool = True

    def validate(self) -> QuantPlan:
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        return self


# Layer type -> function(module, plan) -> quantized module.
QUANTIZERS: dict[type, Callable[[nn.Module, QuantPlan], nn.Module]] = {
    nn.Linear: lambda m, p: QuantLinear(m, p.weight_bits, p.act_bits, p.per_channel, p.symmetric, p.act_symmetric),
    nn.Embedding: lambda m, p: QuantEmbedding(m, p.weight_bits, p.per_channel, p.symmetric),
    TTLinear: lambda m, p: QuantTTLinear.wrap(m, p.weight_bits, p.act_bits, p.per_channel, p.symmetric,
                                              p.act_symmetric, p.intermediates),
    TTEmbedding: lambda m, p: QuantTTEmbedding.wrap(m, p.weight_bits, p.act_bits, p.per_channel, p.symmetric,
                                                    p.act_symmetric, p.intermediates),
}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantModule, LSQQuantizer)) for m in model.modules())


def _wrapper_for(module: nn.Module) -> Callable[[nn.Module, QuantPlan], nn.Module] | None:
    for cls in type(module).__mro__:
        if cls in QUANTIZERS:
            return QUANTIZERS[cls]
    return None


@register_handler(QuantPlan)
def quantize_layer(module: nn.Module, plan: QuantPlan, name: str) -> nn.Module:
    """Handler of ``quant`` steps: wrap one supported layer for quantization-aware training."""
    plan.validate()
    if is_quantized(module):
        raise UserError(f"layer '{name}' is already quantized; quantize the float model, not a quantized one")
    wrap = _wrapper_for(module)
    if wrap is None:
        known = ", ".join(sorted(c.__name__ for c in QUANTIZERS))
        raise UserError(f"layer '{name}' is a {type(module).__name__}, which cannot be quantized; "
                        f"name layers of type {known}")
    return wrap(module, plan)


def _as_plan(value: Any, key: str) -> QuantPlan | None:
    if value is None or value == "keep":
        return None
    if isinstance(value, QuantPlan):
        return value.validate()
    if isinstance(value, Mapping):
        plan = plan_from_dict({"kind": "quant", **value})
        assert isinstance(plan, QuantPlan)
        return plan.validate()
    raise UserError(f"spec entry '{key}': expected a QuantPlan, its dict form or null, got {type(value).__name__}")


def spec_to_layers(model: nn.Module, spec: QuantPlan | Mapping[str, Any]) -> dict[str, QuantPlan]:
    """Resolve a spec (see the module docstring) to ``{module name: plan}`` for this model."""
    implicit_types = isinstance(spec, QuantPlan)
    if isinstance(spec, QuantPlan):
        spec = {cls.__name__: spec for cls in QUANTIZERS}
    if not isinstance(spec, Mapping):
        raise UserError(f"a quantization spec is a QuantPlan or a mapping of layer names to plans, "
                        f"got {type(spec).__name__}")
    modules = [(n, m) for n, m in model.named_modules() if n]
    type_names = {cls.__name__ for cls in QUANTIZERS}
    chosen: dict[str, QuantPlan | None] = {}
    by_type: dict[str, QuantPlan | None] = {}
    for key, value in spec.items():
        plan = _as_plan(value, key)
        matches = [n for n, _ in modules if n == key or fnmatch.fnmatchcase(n, key)]
        if matches:
            for n in matches:
                chosen.setdefault(n, plan)
        elif key in type_names:
            by_type[key] = plan
        else:
            raise UserError(f"quantization spec names layer '{key}', which matches no module of the model; "
                            "use a module name, a pattern like '*.dense' or a type like 'Linear'")
    for key, plan in by_type.items():
        hits = [n for n, m in modules if any(c.__name__ == key for c in type(m).__mro__)]
        if not hits and not implicit_types:
            raise UserError(f"quantization spec names layer type '{key}', but the model has no such layer")
        for n in hits:
            if not any(n.startswith(p + ".") for p in chosen if chosen[p] is not None):
                chosen.setdefault(n, plan)
    # A wrapped layer's children (e.g. a TT layer's cores) are not quantized a second time.
    layers = {n: p for n, p in chosen.items() if p is not None}
    return {n: p for n, p in layers.items() if not any(n.startswith(o + ".") for o in layers)}


def quantize(model: nn.Module, spec: QuantPlan | Mapping[str, Any]) -> nn.Module:
    """A copy of ``model`` with the layers named by ``spec`` wrapped for quantization-aware training.

    Weight step sizes are initialised from the weights; activation step sizes from :func:`calibrate` (or
    the first batch the model sees).
    """
    if is_quantized(model):
        raise UserError("the model is already quantized; quantize the float model, not a quantized one")
    layers = spec_to_layers(model, spec)
    if not layers:
        raise UserError("the quantization spec selects no layer; name at least one Linear or Embedding layer")
    plan = CompressionPlan(layers={name: [p] for name, p in layers.items()})
    out = apply_plan(model, plan)
    out.fitformer_plans = [*getattr(model, "fitformer_plans", []), plan.to_dict()]
    return out


def spec_to_dict(spec: QuantPlan | Mapping[str, Any]) -> Any:
    """JSON-ready form of a spec (the inverse is accepted directly by :func:`quantize`)."""
    if isinstance(spec, QuantPlan):
        return {k: v for k, v in plan_to_dict(spec).items() if k != "kind"}
    return {k: (None if v is None else spec_to_dict(v) if isinstance(v, QuantPlan) else dict(v))
            for k, v in spec.items()}


def spec_from_dict(data: Any) -> QuantPlan | dict[str, QuantPlan | None]:
    """Inverse of :func:`spec_to_dict`: a single plan (a dict of plan fields) or a per-layer mapping."""
    if not isinstance(data, Mapping):
        raise UserError("a quantization spec must be a mapping")
    fields = set(QuantPlan.__dataclass_fields__)
    if set(data) <= fields:
        return _as_plan(data, "spec")  # type: ignore[return-value]
    return {k: _as_plan(v, k) for k, v in data.items()}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> nn.Module:
    """Initialise every activation step size from the given batches (run in float); returns ``model``."""
    acts = [q for q in quantizers(model) if q.activation]
    was_training = model.training
    model.eval()
    for q in acts:
        q.calibrating = True
    try:
        seen = 0
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
            seen += 1
        if seen == 0:
            raise UserError("calibration got no batches; pass at least one batch of inputs")
        for q in acts:
            if q._samples:
                q.init_from_observed()
    finally:
        for q in acts:
            q.calibrating = False
        model.train(was_training)
    return model


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """A copy of a quantized model with integer weights plus step sizes. The quantized layers' biases, step
    sizes and zero points are first rounded to fp16, as the packed file stores them; a model whose vectors
    are on that grid already (:func:`fitformer.layers.quant.round_vectors`) keeps its outputs bit for bit."""
    mods = [m for m in model.modules() if isinstance(m, QuantModule)]
    if not mods:
        raise UserError("the model has no quantized layer; run quantize(model, spec) first")
    missing = [q for q in quantizers(model) if not bool(q.initialized)]
    if missing:
        raise UserError(f"{len(missing)} activation quantizer(s) were never initialised; run calibrate(model, "
                        "batches) or at least one forward pass before freezing")
    out = round_vectors(copy.deepcopy(model))  # stored at half precision (vector_keys): first, so codes use them
    for m in out.modules():
        if isinstance(m, QuantModule):
            m.freeze()
    out.eval()
    return out


def quant_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The step sizes and zero points (for an optimizer parameter group of their own)."""
    return [p for q in quantizers(model) for p in q.parameters(recurse=False)]
