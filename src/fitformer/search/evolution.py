"""HAT's constrained evolutionary search (Wang et al., 2020, Sec. 3.3 and Algorithm 1).

A population of candidates that meet a latency constraint (checked with the cost model, so infeasible
candidates are rejected before their accuracy is ever estimated) evolves for as many iterations as the
budget allows: the ``parents`` best by the accuracy proxy survive; ``mutations`` children come from a random
parent with each position resampled with ``mutation_prob``; ``crossovers`` children take each position from
one of two random parents.

HAT searches for one constraint at a time. :func:`evolution_front` runs it for several latency constraints
(remaining budget shared equally) and returns everything it evaluated, whose non-dominated set is the
trade-off curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .engine import Candidate, SearchResult, Session, rng_for


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 32
    parents: int = 8
    mutations: int = 12
    crossovers: int = 12
    mutation_prob: float = 0.1
    objective: str = "proxy_loss"  # minimised
    constraint: str = "latency_ms"


def evolution(session: Session, max_latency: float | None, seed: int = 0, config: EvolutionConfig | None = None,
              budget: int | None = None) -> list[Candidate]:
    """One constrained evolution; spends at most ``budget`` (default: all remaining) evaluations."""
    config = config or EvolutionConfig()
    rng = rng_for(seed)
    space, cost = session.problem.space, session.problem.cost
    stop_at = len(session.history) + min(budget if budget is not None else session.remaining, session.remaining)

    def feasible(spec) -> bool:
        return max_latency is None or cost(spec)[config.constraint] <= max_latency

    def left() -> int:
        return stop_at - len(session.history)

    def fitness(c: Candidate) -> tuple[float, str]:
        return (c.metrics[config.objective], c.key)

    pending: set[str] = set()
    init = [g for g in (session.draw(lambda: space.sample(rng), pending, feasible)
                        for _ in range(min(config.population, left()))) if g is not None]
    population = session.evaluate(init)
    while left() > 0 and population:
        parents = sorted(population, key=fitness)[:config.parents]
        pending = set()
        children = []

        def mutant(parents: list[Candidate] = parents) -> tuple[int, ...]:
            return space.mutate(parents[rng.integers(len(parents))].genes, rng, config.mutation_prob)

        def cross(parents: list[Candidate] = parents) -> tuple[int, ...]:
            i, j = rng.integers(0, len(parents), size=2)
            return space.crossover(parents[i].genes, parents[j].genes, rng)

        for make, count in ((mutant, config.mutations), (cross, config.crossovers)):
            for _ in range(count):
                if len(children) >= left():
                    break
                g = session.draw(make, pending, feasible)
                if g is not None:
                    children.append(g)
        if not children:
            break
        population = parents + session.evaluate(children)
    return population


def evolution_front(session: Session, max_latencies: Sequence[float | None], seed: int = 0,
                    config: EvolutionConfig | None = None) -> SearchResult:
    """HAT's evolution once per latency constraint, remaining budget shared equally; everything is kept."""
    if not max_latencies:
        max_latencies = [None]
    for i, bound in enumerate(max_latencies):
        share = session.remaining // (len(max_latencies) - i)  # what a tight constraint leaves passes on
        if share > 0:
            evolution(session, bound, seed=seed * 1000 + i, config=config, budget=share)
    return SearchResult("evolution", session.problem.objectives, list(session.history), session.evaluated_now)
