"""NSGA-II (Deb, Pratap, Agarwal & Meyarivan, 2002) over the joint design space.

Each generation: binary tournaments on (non-domination rank, crowding distance) choose parents; uniform
crossover and per-position mutation (:meth:`DesignSpace.crossover`, :meth:`DesignSpace.mutate`) make
valid, new children; parents and children are merged and the best ``population`` survive by rank, then by
crowding distance (Sec. III-C of the paper). Candidates that break the device's hard limits are never
evaluated (they are redrawn), so the population holds feasible candidates only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .engine import Candidate, SearchResult, Session, rng_for
from .pareto import crowding_distance, non_dominated_sort


@dataclass(frozen=True)
class NSGA2Config:
    population: int = 32
    crossover_prob: float = 0.9
    mutation_prob: float | None = None  # per position; default 1 / number of positions


def rank_and_crowding(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-domination rank and crowding distance (within its front) of every row."""
    rank = np.zeros(len(points), dtype=int)
    crowd = np.zeros(len(points))
    for r, front in enumerate(non_dominated_sort(points)):
        rank[front] = r
        crowd[front] = crowding_distance(points[front])
    return rank, crowd


def survivors(pool: list[Candidate], objectives: tuple[str, ...], size: int) -> list[Candidate]:
    """The ``size`` best of ``pool`` by rank, then crowding distance (ties broken by key, for determinism)."""
    points = np.array([c.objectives(objectives) for c in pool])
    rank, crowd = rank_and_crowding(points)
    order = sorted(range(len(pool)), key=lambda i: (rank[i], -crowd[i], pool[i].key))
    return [pool[i] for i in order[:size]]


def nsga2(session: Session, seed: int = 0, config: NSGA2Config | None = None,
          start: Sequence[Sequence[int]] = ()) -> SearchResult:
    """Run NSGA-II until the session's budget is spent; returns every evaluated candidate and the front.
    ``start`` genes (e.g. the whole model quantized) join the random initial population."""
    config = config or NSGA2Config()
    rng = rng_for(seed)
    space, objectives = session.problem.space, session.problem.objectives
    pmut = config.mutation_prob if config.mutation_prob is not None else 1.0 / len(space)
    pending: set[str] = set()
    given = [g for g in (session.draw(lambda x=x: x, pending) for x in start) if g is not None]
    init = given + [g for g in (session.draw(lambda: space.sample(rng), pending)
                                for _ in range(min(config.population, session.remaining) - len(given)))
                    if g is not None]
    population = session.evaluate(init)
    while session.remaining > 0 and population:
        points = np.array([c.objectives(objectives) for c in population])
        rank, crowd = rank_and_crowding(points)

        def tournament(population: list[Candidate] = population, rank: np.ndarray = rank,
                       crowd: np.ndarray = crowd) -> Candidate:
            i, j = rng.integers(0, len(population), size=2)
            better = i if (rank[i], -crowd[i]) <= (rank[j], -crowd[j]) else j
            return population[better]

        def child(tournament=tournament) -> tuple[int, ...]:
            a, b = tournament(), tournament()
            g = space.crossover(a.genes, b.genes, rng) if rng.random() < config.crossover_prob else a.genes
            return space.mutate(g, rng, pmut)

        pending = set()
        offspring = []
        for _ in range(min(config.population, session.remaining)):
            g = session.draw(child, pending)
            if g is None:
                g = session.draw(lambda: space.sample(rng), pending)  # the population has converged
            if g is not None:
                offspring.append(g)
        if not offspring:
            break
        population = survivors(population + session.evaluate(offspring), objectives, config.population)
    return SearchResult("nsga2", objectives, list(session.history), session.evaluated_now)
