"""Compression plans (plain data) and ``apply_plan`` (a registry of handlers, one per plan kind)."""

from . import (
    positions,  # noqa: F401  (registers plan kind "positions")
    prune,  # noqa: F401  (registers plan kinds "structured_prune", "balanced_sparsity")
    quant,  # noqa: F401  (registers plan kind "quant")
    subnet,  # noqa: F401  (registers plan kind "subnet")
)
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
from .refit import EmbeddingFisher, RefitReport, embedding_fisher, refit_factorized
from .tt import LowRankPlan, TTEmbeddingPlan, TTPlan, tt_plan_for_model  # noqa: F401  (kinds tt, low_rank, tt_embedding)

__all__ = [
    "PLAN_TYPES",
    "CompressionPlan",
    "Keep",
    "LayerPlan",
    "ModelPlan",
    "RefitReport",
    "apply_plan",
    "embedding_fisher",
    "EmbeddingFisher",
    "plan_from_dict",
    "plan_to_dict",
    "refit_factorized",
    "register_handler",
    "register_plan",
    "resolve_layers",
]
