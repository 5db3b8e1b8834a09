"""Optuna's NSGA-II sampler driving the same design space and session: the peer baseline.

Each gene position is a categorical parameter ``g<i>`` over its choice indices; trials are asked in batches
of the sampler's population, evaluated through the :class:`~fitformer.search.engine.Session` (so they share
the budget accounting, the de-duplication and the run store with our algorithms) and told back. A trial
whose candidate breaks the device's hard limits is told as failed (Optuna's NSGA-II ignores failed trials);
a repeated candidate is told its stored metrics without spending budget.
"""

from __future__ import annotations

from .engine import SearchResult, Session

MAX_TRIALS_PER_EVALUATION = 20


def optuna_nsga2(session: Session, seed: int = 0, population: int = 32) -> SearchResult:
    """Run Optuna's ``NSGAIISampler`` until the budget is spent (needs ``pip install 'fitformer[compare]'``)."""
    try:
        import optuna
    except ImportError:
        from ..errors import UserError

        raise UserError("the optuna algorithm needs Optuna; pip install 'fitformer[compare]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space, objectives = session.problem.space, session.problem.objectives
    sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    study = optuna.create_study(directions=["minimize"] * len(objectives), sampler=sampler)
    distributions = {f"g{i}": optuna.distributions.CategoricalDistribution(list(range(g.cardinality)))
                     for i, g in enumerate(space.genes)}
    max_trials = MAX_TRIALS_PER_EVALUATION * session.budget
    trials = 0
    while session.remaining > 0 and trials < max_trials:
        batch = [study.ask(distributions) for _ in range(population)]
        trials += len(batch)
        genes = [space.canonical([t.params[f"g{i}"] for i in range(len(space.genes))]) for t in batch]
        valid = [session.acceptable(g) for g in genes]
        results = session.evaluate([g for g, ok in zip(genes, valid, strict=True) if ok])
        by_key = {c.key: c for c in results}
        for trial, g, ok in zip(batch, genes, valid, strict=True):
            cand = by_key.get(session.key(g)[2]) if ok else None
            if cand is None:  # invalid on the device, or beyond the budget
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, cand.objectives(objectives))
    return SearchResult("optuna_nsga2", objectives, list(session.history), session.evaluated_now)
