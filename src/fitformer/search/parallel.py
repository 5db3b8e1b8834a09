"""Where candidates are evaluated: in this process, in local worker processes, or on a Ray cluster.

Every backend yields results **in submission order**, and the algorithms only decide after a whole batch has
come back, so a search gives the same candidates and metrics with any backend and worker count (the
evaluator itself must be deterministic, which the cost models and proxies are).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from ..errors import UserError

Evaluator = Callable[[Any], dict[str, float]]

_WORKER_EVALUATOR: Evaluator | None = None


def _init_worker(evaluator: Evaluator, threads: int) -> None:
    global _WORKER_EVALUATOR
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    _WORKER_EVALUATOR = evaluator


def _call_worker(item: Any) -> dict[str, float]:
    assert _WORKER_EVALUATOR is not None
    return _WORKER_EVALUATOR(item)


class SerialExecutor:
    """Evaluate one candidate after another in this process."""

    workers = 1

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def map(self, items: Sequence[Any]) -> Iterator[dict[str, float]]:
        for item in items:
            yield self.evaluator(item)

    def close(self) -> None:
        pass


class ProcessExecutor:
    """``workers`` local processes, each holding its own copy of the evaluator (sent once, at start-up)."""

    def __init__(self, evaluator: Evaluator, workers: int, threads_per_worker: int = 1) -> None:
        if workers < 1:
            raise UserError(f"--workers {workers}: use 1 or more")
        self.workers = workers
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                              else "spawn")
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                         initargs=(evaluator, threads_per_worker))

    def map(self, items: Sequence[Any]) -> Iterator[dict[str, float]]:
        return self._pool.map(_call_worker, items)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class RayExecutor:
    """Tasks on a Ray cluster (``address`` of an existing one, or ``"local"`` to start one here)."""

    def __init__(self, evaluator: Evaluator, address: str | None = None, workers: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray; install it with pip install 'fitformer[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False,
                                      "log_to_driver": False}
            if address and address != "local":
                kwargs["address"] = address
            elif workers:
                kwargs["num_cpus"] = workers
            ray.init(**kwargs)
        self.workers = workers or int(ray.cluster_resources().get("CPU", 1))
        self._evaluator_ref = ray.put(evaluator)
        self._remote = ray.remote(num_cpus=1)(_ray_call)

    def map(self, items: Sequence[Any]) -> Iterator[dict[str, float]]:
        refs = [self._remote.remote(self._evaluator_ref, item) for item in items]
        for ref in refs:  # in order; each one as soon as it and those before it are done
            yield self._ray.get(ref)

    def close(self) -> None:
        pass  # the cluster belongs to the user; a local instance ends with the process


def _ray_call(evaluator: Evaluator, item: Any) -> dict[str, float]:
    return evaluator(item)


def make_executor(evaluator: Evaluator, workers: int = 1, backend: str = "local",
                  address: str | None = None) -> SerialExecutor | ProcessExecutor | RayExecutor:
    """The executor named by ``--backend`` and ``--workers``."""
    if backend == "ray":
        return RayExecutor(evaluator, address=address, workers=workers if workers > 1 else None)
    if backend != "local":
        raise UserError(f"--backend {backend}: use 'local' or 'ray'")
    if workers < 1:
        raise UserError(f"--workers {workers}: use 1 or more")
    return SerialExecutor(evaluator) if workers == 1 else ProcessExecutor(evaluator, workers)
