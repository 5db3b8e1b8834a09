"""``CompressionPlan``: a plain, serialisable description of what to do to a model, and ``apply_plan``.

A plan has two parts, applied in order:

1. ``model_steps`` — transforms of the whole model that change its shape (sub-network extraction,
   structured pruning). Each is a :class:`ModelPlan`.
2. ``layers`` — for each module name (or ``fnmatch`` pattern, e.g. ``"*.intermediate.dense"``), an ordered
   list of :class:`LayerPlan` steps (factorise, then quantize, then sparsify, ...). Each step's handler
   takes the current module and returns its replacement.

A new compression is one dataclass registered with :func:`register_plan` plus one handler registered
with :func:`register_handler` — nothing else is edited (the torchao pattern). Plans are data: they
round-trip through ``to_dict``/``from_dict`` (JSON/YAML), and applying one is a pure function of
(model, plan): the input model is never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class LayerPlan:
    """Base of per-layer steps; subclasses are frozen dataclasses with a unique ``kind``."""

    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class ModelPlan:
    """Base of whole-model steps; subclasses are frozen dataclasses with a unique ``kind``."""

    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class Keep(LayerPlan):
    """Leave the layer as it is (explicit, so a plan can say "dense" for a layer)."""

    kind: ClassVar[str] = "keep"


PLAN_TYPES: dict[str, type] = {}
LayerHandler = Callable[[nn.Module, Any, str], nn.Module]
ModelHandler = Callable[[nn.Module, Any], nn.Module]
_LAYER_HANDLERS: dict[type, LayerHandler] = {}
_MODEL_HANDLERS: dict[type, ModelHandler] = {}
P = TypeVar("P", bound=type)


def register_plan(cls: P) -> P:
    """Class decorator: make a plan dataclass known to ``from_dict`` under its ``kind``."""
    if not cls.kind:
        raise TypeError(f"{cls.__name__} needs a non-empty `kind`")
    if PLAN_TYPES.get(cls.kind, cls) is not cls:
        raise TypeError(f"plan kind '{cls.kind}' is already registered by {PLAN_TYPES[cls.kind].__name__}")
    PLAN_TYPES[cls.kind] = cls
    return cls


def register_handler(plan_type: type) -> Callable[[Callable], Callable]:
    """Decorator: ``handler(module, plan, name) -> module`` for a LayerPlan type, or
    ``handler(model, plan) -> model`` for a ModelPlan type."""

    def decorate(fn: Callable) -> Callable:
        table = _MODEL_HANDLERS if issubclass(plan_type, ModelPlan) else _LAYER_HANDLERS
        table[plan_type] = fn
        return fn

    return decorate


register_plan(Keep)
register_handler(Keep)(lambda module, plan, name: module)


def plan_to_dict(step: LayerPlan | ModelPlan) -> dict[str, Any]:
    """A step as a JSON-ready dict tagged with its kind (tuples become lists)."""
    return {"kind": step.kind, **dataclasses.asdict(step)}


def plan_from_dict(data: dict[str, Any]) -> LayerPlan | ModelPlan:
    """Inverse of :func:`plan_to_dict`; unknown kinds and fields are user errors."""
    data = dict(data)
    kind = data.pop("kind", None)
    cls = PLAN_TYPES.get(kind)
    if cls is None:
        raise UserError(f"unknown plan kind '{kind}'; known kinds: {', '.join(sorted(PLAN_TYPES))}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise UserError(f"plan kind '{kind}' has no field(s) {sorted(unknown)}; fields: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = _tuplify(value)
    return cls(**kwargs)


def _tuplify(value: Any) -> Any:
    """Lists from JSON become tuples so frozen plans stay hashable."""
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuplify(v) for k, v in value.items()}
    return value


@dataclass
class CompressionPlan:
    """What to do to every layer of a model; see the module docstring."""

    layers: dict[str, list[LayerPlan]] = field(default_factory=dict)
    model_steps: list[ModelPlan] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_steps": [plan_to_dict(s) for s in self.model_steps],
            "layers": {name: [plan_to_dict(s) for s in steps] for name, steps in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionPlan:
        if not isinstance(data, dict):
            raise UserError("a compression plan must be a mapping with 'layers' and optional 'model_steps'")
        unknown = set(data) - {"layers", "model_steps"}
        if unknown:
            raise UserError(f"compression plan has unknown key(s) {sorted(unknown)}; use 'layers' and 'model_steps'")
        steps = [plan_from_dict(s) for s in data.get("model_steps", [])]
        layers = {name: [plan_from_dict(s) for s in entries] for name, entries in data.get("layers", {}).items()}
        for s in steps:
            if not isinstance(s, ModelPlan):
                raise UserError(f"plan kind '{s.kind}' is a per-layer step; put it under 'layers'")
        for name, entries in layers.items():
            for s in entries:
                if not isinstance(s, LayerPlan):
                    raise UserError(f"plan kind '{s.kind}' (layer '{name}') is a whole-model step; "
                                    "put it under 'model_steps'")
        return cls(layers=layers, model_steps=steps)


def resolve_layers(model: nn.Module, plan: CompressionPlan) -> dict[str, list[LayerPlan]]:
    """Module name -> steps, expanding patterns; the first matching key wins. Unmatched keys are errors."""
    names = [n for n, _ in model.named_modules() if n]
    resolved: dict[str, list[LayerPlan]] = {}
    for key, steps in plan.layers.items():
        matches = [n for n in names if n == key or fnmatch.fnmatchcase(n, key)]
        if not matches:
            raise UserError(f"plan names layer '{key}', which matches no module of the model; "
                            "list the model's layers with `fitformer layers` or check the name")
        for n in matches:
            resolved.setdefault(n, list(steps))
    return resolved


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """Return a compressed copy of ``model`` (the input is left untouched)."""
    out = copy.deepcopy(model)
    for step in plan.model_steps:
        handler = _MODEL_HANDLERS.get(type(step))
        if handler is None:
            raise UserError(f"no handler registered for model step '{step.kind}'")
        out = handler(out, step)
    for name, steps in resolve_layers(out, plan).items():
        module = out.get_submodule(name)
        for step in steps:
            handler = _LAYER_HANDLERS.get(type(step))
            if handler is None:
                raise UserError(f"no handler registered for layer step '{step.kind}' (layer '{name}')")
            module = handler(module, step, name)
        _set_module(out, name, module)
    return out
