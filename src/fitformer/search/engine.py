"""What every search algorithm shares: the problem, candidates, and a budgeted, cached evaluation session.

A :class:`Problem` couples a design space with two functions: ``cost`` (cheap: the hardware cost model,
run in this process to reject candidates that break the device's hard limits before anything expensive
happens) and ``evaluate`` (cost plus accuracy proxy, run by an executor, possibly in parallel). All
objectives are minimised metric names (e.g. ``proxy_loss`` and ``latency_ms``).

:class:`Session` is the one door to evaluation: it canonicalises genes, serves repeated candidates from
memory or from the run store without spending budget, evaluates the new ones through the executor, and
commits each result to the store as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from .parallel import SerialExecutor
from .pareto import non_dominated_sort
from .space import CandidateSpec, DesignSpace
from .store import RunStore

MAX_DRAWS = 200  # tries to draw one valid, new candidate before giving up


@dataclass
class Problem:
    """A design space, a cheap cost function, a full evaluator, objectives and hard limits."""

    space: DesignSpace
    cost: Callable[[CandidateSpec], dict[str, float]]
    evaluate: Callable[[CandidateSpec], dict[str, float]]
    objectives: tuple[str, ...] = ("proxy_loss", "latency_ms")
    limits: dict[str, float] = field(default_factory=dict)  # cost metric -> maximum (e.g. weight bytes)

    def is_valid(self, spec: CandidateSpec) -> bool:
        """Meets the device's hard limits (checked with the cheap cost model only)."""
        if not self.limits:
            return True
        cost = self.cost(spec)
        return all(cost[name] <= bound for name, bound in self.limits.items())


@dataclass
class Candidate:
    """A plan (as gene and decoded spec) with its metrics."""

    genes: tuple[int, ...]
    spec: CandidateSpec
    metrics: dict[str, float]
    key: str

    def objectives(self, names: Sequence[str]) -> list[float]:
        return [float(self.metrics[n]) for n in names]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "genes": list(self.genes), "metrics": self.metrics, "spec": self.spec.to_dict()}


class BudgetExhausted(Exception):
    """Raised inside an algorithm when the evaluation budget is spent."""


class Session:
    """Budgeted evaluation with de-duplication, a run store and an executor."""

    def __init__(self, problem: Problem, budget: int, store: RunStore | None = None, executor: Any = None,
                 on_result: Callable[[Candidate, bool], None] | None = None) -> None:
        if budget < 1:
            raise UserError(f"budget {budget}: evaluate at least one candidate")
        self.problem = problem
        self.budget = budget
        self.store = store
        self.executor = executor or SerialExecutor(problem.evaluate)
        self.on_result = on_result
        self.seen: dict[str, Candidate] = {}
        self.history: list[Candidate] = []  # unique candidates in the order the search met them
        self.evaluated_now = 0  # evaluations done by this process (not served by the store)
        self._valid: dict[str, bool] = {}

    @property
    def remaining(self) -> int:
        return self.budget - len(self.history)

    def key(self, genes: Sequence[int]) -> tuple[tuple[int, ...], CandidateSpec, str]:
        g = self.problem.space.canonical(genes)
        spec = self.problem.space.decode(g)
        return g, spec, spec.key()

    def acceptable(self, genes: Sequence[int], extra: Callable[[CandidateSpec], bool] | None = None) -> bool:
        """Valid on the device (and under ``extra``, e.g. an algorithm's own latency constraint)."""
        _, spec, key = self.key(genes)
        if key not in self._valid:
            self._valid[key] = self.problem.is_valid(spec)
        return self._valid[key] and (extra is None or extra(spec))

    def is_new(self, genes: Sequence[int]) -> bool:
        return self.key(genes)[2] not in self.seen

    def draw(self, make: Callable[[], Sequence[int]], pending: set[str],
             extra: Callable[[CandidateSpec], bool] | None = None) -> tuple[int, ...] | None:
        """Call ``make`` until it gives a valid candidate not seen and not pending; None if it never does."""
        for _ in range(MAX_DRAWS):
            g = self.problem.space.canonical(make())
            key = self.key(g)[2]
            if key not in self.seen and key not in pending and self.acceptable(g, extra):
                pending.add(key)
                return g
        return None

    def evaluate(self, batch: Sequence[Sequence[int]]) -> list[Candidate]:
        """Metrics of every gene in ``batch`` (in order); new ones spend budget, beyond it they are dropped."""
        out: list[Candidate | None] = []
        todo: list[tuple[int, tuple[int, ...], CandidateSpec, str]] = []
        for genes in batch:
            g, spec, key = self.key(genes)
            if key in self.seen:
                out.append(self.seen[key])
                continue
            if any(key == t[3] for t in todo):
                out.append(None)
                continue
            if len(self.history) + len(todo) >= self.budget:
                break
            stored = self.store.get(key) if self.store is not None else None
            if stored is not None:
                self._record(Candidate(g, spec, stored, key), fresh=False)
                out.append(self.seen[key])
                continue
            todo.append((len(out), g, spec, key))
            out.append(None)
        if todo:
            results = self.executor.map([t[2] for t in todo])
            for (pos, g, spec, key), metrics in zip(todo, results, strict=False):
                cand = Candidate(g, spec, dict(metrics), key)
                if self.store is not None:
                    self.store.put(key, g, spec.to_dict(), cand.metrics)
                self.evaluated_now += 1
                self._record(cand, fresh=True)
                out[pos] = cand
        resolved = []
        for i, c in enumerate(out):
            if c is None:  # a duplicate inside the batch
                c = self.seen.get(self.key(batch[i])[2])
            if c is not None:
                resolved.append(c)
        return resolved

    def _record(self, cand: Candidate, fresh: bool) -> None:
        self.seen[cand.key] = cand
        self.history.append(cand)
        if self.on_result is not None:
            self.on_result(cand, fresh)


@dataclass
class SearchResult:
    """Everything a search evaluated, and its Pareto front over the problem's objectives."""

    algorithm: str
    objectives: tuple[str, ...]
    history: list[Candidate]
    evaluated_now: int = 0

    @property
    def front(self) -> list[Candidate]:
        pts = [c for c in self.history if all(np.isfinite(c.objectives(self.objectives)))]
        if not pts:
            return []
        fronts = non_dominated_sort(np.array([c.objectives(self.objectives) for c in pts]))
        return sorted((pts[i] for i in fronts[0]), key=lambda c: c.objectives(self.objectives))

    def points(self) -> np.ndarray:
        return np.array([c.objectives(self.objectives) for c in self.history]).reshape(-1, len(self.objectives))

    def best(self, objective: str, constraints: dict[str, float] | None = None) -> Candidate | None:
        """The candidate lowest in ``objective`` among those meeting every ``metric <= bound``."""
        ok = [c for c in self.history
              if all(c.metrics.get(m, np.inf) <= b for m, b in (constraints or {}).items())]
        return min(ok, key=lambda c: (c.metrics[objective], c.key)) if ok else None


def rng_for(seed: int) -> np.random.Generator:
    """The one random generator of a search (PCG64 seeded by ``seed``)."""
    return np.random.default_rng(seed)
