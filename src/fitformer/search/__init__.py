"""Joint hardware-aware search: design space, evolution / NSGA-II, Pareto utilities, run store, device selection."""

from .engine import Candidate, Problem, SearchResult, Session
from .evolution import EvolutionConfig, evolution, evolution_front
from .nsga2 import NSGA2Config, nsga2
from .optuna_adapter import optuna_nsga2
from .pareto import crowding_distance, dominates, hypervolume, non_dominated_sort, pareto_mask
from .random_search import random_search
from .space import (
    ArchSpec,
    CandidateSpec,
    DesignSpace,
    DeviceLimits,
    EncoderShape,
    LayerSpec,
    SpaceConfig,
)
from .store import RunStore

__all__ = [
    "ArchSpec",
    "Candidate",
    "CandidateSpec",
    "DesignSpace",
    "DeviceLimits",
    "EncoderShape",
    "EvolutionConfig",
    "LayerSpec",
    "NSGA2Config",
    "Problem",
    "RunStore",
    "SearchResult",
    "Session",
    "SpaceConfig",
    "crowding_distance",
    "dominates",
    "evolution",
    "evolution_front",
    "hypervolume",
    "non_dominated_sort",
    "nsga2",
    "optuna_nsga2",
    "pareto_mask",
    "random_search",
]
