"""Random search: the baseline every search algorithm must beat at the same evaluation budget."""

from __future__ import annotations

import itertools

from ..errors import UserError
from .engine import SearchResult, Session, rng_for

MAX_EXHAUSTIVE = 1e5


def random_search(session: Session, seed: int = 0, batch_size: int = 32) -> SearchResult:
    """Evaluate uniformly random, valid, distinct candidates until the budget is spent."""
    rng = rng_for(seed)
    space = session.problem.space
    while session.remaining > 0:
        pending: set[str] = set()
        batch = []
        for _ in range(min(batch_size, session.remaining)):
            g = session.draw(lambda: space.sample(rng), pending)
            if g is None:
                break
            batch.append(g)
        if not batch:
            break
        session.evaluate(batch)
    return SearchResult("random", session.problem.objectives, list(session.history), session.evaluated_now)


def exhaustive(session: Session, batch_size: int = 64) -> SearchResult:
    """Every distinct valid candidate of a small space, in gene order (brute force; budget permitting)."""
    space = session.problem.space
    if space.size() > MAX_EXHAUSTIVE:
        raise UserError(f"the design space has {space.size():.3g} genes; brute force handles up to "
                        f"{MAX_EXHAUSTIVE:g}; use nsga2 or evolution")
    batch: list[tuple[int, ...]] = []
    keys: set[str] = set()
    for genes in itertools.product(*(range(int(c)) for c in space.cardinalities)):
        if session.remaining - len(batch) <= 0:
            break
        g = space.canonical(genes)
        key = session.key(g)[2]
        if key in keys or key in session.seen or not session.acceptable(g):
            continue
        keys.add(key)
        batch.append(g)
        if len(batch) == batch_size:
            session.evaluate(batch)
            batch = []
    if batch:
        session.evaluate(batch)
    return SearchResult("exhaustive", session.problem.objectives, list(session.history), session.evaluated_now)
