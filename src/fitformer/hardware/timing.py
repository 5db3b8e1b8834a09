"""Wall-clock latency measurement: warm-up, repetitions, trimmed mean and spread.

The one way fitformer times anything on the host; the profiler and every benchmark use it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Timing:
    """Latency statistics in milliseconds over ``repeats`` timed calls."""

    mean_ms: float  # trimmed mean (the fastest and slowest 10% dropped)
    median_ms: float
    std_ms: float
    min_ms: float
    repeats: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def measure(
    fn: Callable[[], object],
    warmup: int = 3,
    repeats: int = 20,
    min_seconds: float = 0.0,
    max_seconds: float = 30.0,
    clock: str = "wall",
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls (more until
    ``min_seconds`` have passed, fewer if ``max_seconds`` runs out after three).

    ``clock="cpu"`` times the process's CPU time instead of wall-clock time: with one intra-op thread it
    equals the latency on an idle core, and it is not inflated while other processes hold the CPU.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    timer = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = timer()
        fn()
        samples.append((timer() - t0) * 1e3)
        elapsed = time.perf_counter() - start
        if len(samples) >= repeats and elapsed >= min_seconds:
            break
        if len(samples) >= 3 and elapsed >= max_seconds:
            break
    ordered = sorted(samples)
    cut = len(ordered) // 10
    kept = ordered[cut : len(ordered) - cut] or ordered
    return Timing(
        mean_ms=statistics.fmean(kept),
        median_ms=statistics.median(ordered),
        std_ms=statistics.pstdev(kept) if len(kept) > 1 else 0.0,
        min_ms=ordered[0],
        repeats=len(samples),
    )


def measure_interleaved(
    fns: Sequence[Callable[[], object]], rounds: int = 8, repeats: int = 3, max_seconds: float = 2.0,
    settle_seconds: float = 0.0, min_seconds: float = 0.0, warmup: int = 2, settle_calls: int | None = None,
    shuffle: bool = False,
) -> list[float]:
    """Median milliseconds of each of ``fns`` over ``rounds`` that alternate between them.

    Why: on a shared machine load comes and goes; timing A then B lets a burst land on one side only,
    while alternating short rounds spreads it over both, so the ratio of two results is trustworthy.
    ``settle_seconds``: each round first calls the function untimed for that long (at least once), so its
    timed calls are in its own steady state and not in the wake of the other function: right after a 30 ms
    dense GEMM, successive calls of a 2,048-token TT layer took 3.1, 2.8, 2.3, 1.9, 1.8, then 1.7-1.9 ms,
    a wake that costs the fast side a larger share of its time than the slow one; ``settle_calls`` caps the
    untimed calls. ``shuffle``: every round after the first runs the functions in a new (seeded) order, so the
    wake of a slow function does not always land on the same neighbour. ``warmup`` untimed calls
    precede the first round; ``repeats``, ``min_seconds`` and ``max_seconds`` bound each round's timed calls
    (see :func:`measure`).
    """
    chunks: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    rng = random.Random(0)
    for r in range(rounds):
        if shuffle and r:
            rng.shuffle(order)
        for i in order:
            settle(fns[i], settle_seconds, settle_calls)
            t = measure(fns[i], warmup=warmup if r == 0 else 0, repeats=repeats, min_seconds=min_seconds,
                        max_seconds=max_seconds)
            chunks[i].append(t.median_ms)
    return [statistics.median(c) for c in chunks]


def settle(fn: Callable[[], object], seconds: float, max_calls: int | None = None) -> int:
    """Call ``fn`` untimed for ``seconds`` (at least once if positive, at most ``max_calls`` times); returns the
    number of calls."""
    calls, end = 0, time.perf_counter() + seconds
    while seconds > 0 and (calls == 0 or time.perf_counter() < end) and (max_calls is None or calls < max_calls):
        fn()
        calls += 1
    return calls


def random_token_inputs(batch: int, seq_len: int, vocab: int, seed: int = 0,
                        token_type_ids: bool = True) -> dict[str, torch.Tensor]:
    """Seeded random token ids with a full attention mask: the inputs every latency measurement times
    (the cost of a forward pass does not depend on which ids it sees, only on their shape)."""
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if token_type_ids:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs
