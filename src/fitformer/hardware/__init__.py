"""Hardware: timing, the device catalog, the host profiler, analytic and learned cost models.

Import what you need from the submodules; the names below are the public API.
"""

from .analytic import AnalyticModel, Cost, Efficiency
from .cost import AnalyticCostModel, CostModel, MeasuredCostModel, PredictorCostModel, measure_module
from .ops import (
    EncoderArch,
    LinearCompression,
    Op,
    compression_from_plan,
    linear_ops,
    ops_from_config,
    ops_from_module,
    ops_from_plan,
    register_plan_cost,
    tt_linear_ops,
    tt_runs_dense,
)
from .spec import DeviceSpec, get_device, load_catalog, load_spec
from .timing import Timing, measure, measure_interleaved, random_token_inputs

__all__ = [
    "AnalyticCostModel",
    "AnalyticModel",
    "Cost",
    "CostModel",
    "DeviceSpec",
    "Efficiency",
    "EncoderArch",
    "LinearCompression",
    "MeasuredCostModel",
    "Op",
    "PredictorCostModel",
    "Timing",
    "compression_from_plan",
    "get_device",
    "linear_ops",
    "load_catalog",
    "load_spec",
    "measure",
    "measure_interleaved",
    "measure_module",
    "ops_from_config",
    "ops_from_module",
    "ops_from_plan",
    "random_token_inputs",
    "register_plan_cost",
    "tt_linear_ops",
    "tt_runs_dense",
]
