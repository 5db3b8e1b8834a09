"""Compression plans (plain data) and ``apply_plan`` (a registry of handlers, one per plan kind)."""

from .plan import (
    PLAN_TYPES,
    CompressionPlan,
    Keep,
    LayerPlan,
    ModelPlan,
    apply_plan,
    plan_from_dict,
    plan_to_dict,
    register_handler,
    register_plan,
    resolve_layers,
)

__all__ = [
    "PLAN_TYPES",
    "CompressionPlan",
    "Keep",
    "LayerPlan",
    "ModelPlan",
    "apply_plan",
    "plan_from_dict",
    "plan_to_dict",
    "register_handler",
    "register_plan",
    "resolve_layers",
]
