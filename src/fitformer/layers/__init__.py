"""``nn.Module``s of compressed layers and the contraction planner of TT layers."""

from .lowrank import LowRankLinear
from .planner import Execution, Planner, RooflineCost, TTSpec, default_planner, set_default_planner
from .tensorize import (
    TTShape,
    balanced_modes,
    bond_ranks,
    choose_tensorization,
    enumerate_shapes,
    factorizations,
    full_ranks,
    tt_bytes,
    tt_flops,
    tt_params,
)
from .tt import TTEmbedding, TTLinear, tt_svd

__all__ = [
    "Execution",
    "LowRankLinear",
    "Planner",
    "RooflineCost",
    "TTEmbedding",
    "TTLinear",
    "TTShape",
    "TTSpec",
    "balanced_modes",
    "bond_ranks",
    "choose_tensorization",
    "default_planner",
    "enumerate_shapes",
    "factorizations",
    "full_ranks",
    "set_default_planner",
    "tt_bytes",
    "tt_flops",
    "tt_params",
    "tt_svd",
]
