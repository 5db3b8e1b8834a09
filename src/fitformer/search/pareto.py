"""Pareto utilities on minimised objective vectors: dominance, non-dominated sorting, crowding, hypervolume.

Everything here takes an ``(n, m)`` array of objectives where **every column is minimised** (turn a
maximised objective such as accuracy into ``-accuracy`` or ``1 - accuracy`` before calling).

- :func:`non_dominated_sort` is the fast non-dominated sort of NSGA-II (Deb et al., 2002, Sec. III-A).
- :func:`crowding_distance` is Deb et al.'s crowding distance (Sec. III-B), computed per front.
- :func:`hypervolume` is exact: a sweep in 2-D (O(n log n)); for three or more objectives it defers to
  Optuna's WFG implementation when Optuna is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import UserError


def _as_matrix(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.ndim == 1 and arr.size == 0:
        return arr.reshape(0, 0)
    if arr.ndim != 2:
        raise UserError(f"objectives must be an (n, m) array; got shape {arr.shape}")
    return arr


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when ``a`` is no worse than ``b`` in every objective and better in at least one."""
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.all(a_ <= b_) and np.any(a_ < b_))


def non_dominated_sort(points: Sequence[Sequence[float]] | np.ndarray) -> list[list[int]]:
    """Fronts of row indices, best first (rank 0 is the Pareto front). Ties (equal rows) share a front."""
    arr = _as_matrix(points)
    n = len(arr)
    if n == 0:
        return []
    le = np.all(arr[:, None, :] <= arr[None, :, :], axis=2)
    lt = np.any(arr[:, None, :] < arr[None, :, :], axis=2)
    dom = le & lt  # dom[i, j]: i dominates j
    counts = dom.sum(axis=0)  # how many dominate j
    fronts: list[list[int]] = []
    current = [int(i) for i in np.flatnonzero(counts == 0)]
    while current:
        fronts.append(current)
        counts = counts - dom[current].sum(axis=0)
        counts[current] = -1
        current = [int(i) for i in np.flatnonzero(counts == 0)]
    return fronts


def pareto_mask(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Boolean mask of the rows on the Pareto front (non-dominated rows)."""
    arr = _as_matrix(points)
    mask = np.zeros(len(arr), dtype=bool)
    fronts = non_dominated_sort(arr)
    if fronts:
        mask[fronts[0]] = True
    return mask


def crowding_distance(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Crowding distance of each row within one front; boundary rows get ``inf``."""
    arr = _as_matrix(points)
    n = len(arr)
    dist = np.zeros(n)
    if n <= 2:
        dist[:] = np.inf
        return dist
    for j in range(arr.shape[1]):
        order = np.argsort(arr[:, j], kind="stable")
        col = arr[order, j]
        span = col[-1] - col[0]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (col[2:] - col[:-2]) / span
    return dist


def hypervolume(points: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` and bounded by ``reference`` (points not better than it add nothing)."""
    arr = _as_matrix(points)
    ref = np.asarray(reference, dtype=float)
    if arr.size == 0:
        return 0.0
    if arr.shape[1] != ref.size:
        raise UserError(f"reference point has {ref.size} coordinates but the points have {arr.shape[1]}")
    arr = arr[np.all(arr < ref, axis=1)]
    if len(arr) == 0:
        return 0.0
    if arr.shape[1] == 1:
        return float(ref[0] - arr[:, 0].min())
    if arr.shape[1] == 2:
        return _hypervolume_2d(arr, ref)
    try:
        from optuna._hypervolume import compute_hypervolume
    except ImportError:  # pragma: no cover - optuna is an optional extra
        raise UserError("hypervolume in 3 or more objectives needs optuna; pip install 'fitformer[compare]'") from None
    return float(compute_hypervolume(arr, ref))


def _hypervolume_2d(arr: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D sweep: sort by the first objective, add the rectangle each new best second objective adds."""
    order = np.lexsort((arr[:, 1], arr[:, 0]))
    volume, best_y = 0.0, ref[1]
    for x, y in arr[order]:
        if y < best_y:
            volume += (ref[0] - x) * (best_y - y)
            best_y = y
    return float(volume)
