"""Device selection: search per device, keep each device's best feasible candidate, pick the cheapest device.

For every device a search runs against that device's cost model. A candidate is *feasible* when it meets
both constraints: ``latency_ms <= max_latency_ms`` and ``accuracy >= min_accuracy`` (the accuracy proxy's
estimate). A device's best candidate is its most accurate feasible one (ties: lower latency). The chosen
device is the lowest-cost device (relative price from the catalog) that has a feasible candidate (ties: lower
latency of its best candidate). When no device has one, the report says which constraint binds on each
device and how close its best candidate came.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import Candidate, SearchResult


@dataclass
class DeviceOutcome:
    """One row of the selection table."""

    device: str
    relative_cost: float
    best: Candidate | None  # the best feasible candidate, or the closest one when none is feasible
    feasible: bool
    reason: str  # why the device failed ("" when feasible)
    evaluated: int

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "relative_cost": self.relative_cost, "feasible": self.feasible,
                "reason": self.reason, "evaluated": self.evaluated,
                "best": None if self.best is None else {"key": self.best.key, "metrics": self.best.metrics,
                                                         "spec": self.best.spec.to_dict()}}


@dataclass
class Selection:
    """The chosen device (None when nothing is feasible) and every device's outcome."""

    device: str | None
    outcomes: list[DeviceOutcome]
    binding: str  # "" when a device was chosen; otherwise "latency", "accuracy" or "both"

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "binding": self.binding, "devices": [o.to_dict() for o in self.outcomes]}


def judge(result: SearchResult, device: str, relative_cost: float, max_latency_ms: float,
          min_accuracy: float) -> DeviceOutcome:
    """The best feasible candidate of one device's search, or the closest miss and the reason."""
    cands = [c for c in result.history if "accuracy" in c.metrics and "latency_ms" in c.metrics]
    ok = [c for c in cands if c.metrics["latency_ms"] <= max_latency_ms and c.metrics["accuracy"] >= min_accuracy]
    if ok:
        best = min(ok, key=lambda c: (-c.metrics["accuracy"], c.metrics["latency_ms"], c.key))
        return DeviceOutcome(device, relative_cost, best, True, "", len(result.history))
    if not cands:
        return DeviceOutcome(device, relative_cost, None, False, "no candidate fits the device", 0)
    accurate = [c for c in cands if c.metrics["accuracy"] >= min_accuracy]
    fast = [c for c in cands if c.metrics["latency_ms"] <= max_latency_ms]
    if accurate:  # latency binds: the fastest accurate-enough candidate is still too slow
        best = min(accurate, key=lambda c: (c.metrics["latency_ms"], c.key))
        reason = (f"latency: the fastest candidate with accuracy >= {min_accuracy:g} takes "
                  f"{best.metrics['latency_ms']:.3g} ms > {max_latency_ms:g} ms")
    elif fast:  # accuracy binds
        best = max(fast, key=lambda c: (c.metrics["accuracy"], c.key))
        reason = (f"accuracy: the most accurate candidate within {max_latency_ms:g} ms reaches "
                  f"{best.metrics['accuracy']:.3f} < {min_accuracy:g}")
    else:
        best = min(cands, key=lambda c: (c.metrics["latency_ms"] / max_latency_ms
                                         + min_accuracy - c.metrics["accuracy"], c.key))
        reason = (f"both: no candidate is fast enough or accurate enough (closest: "
                  f"{best.metrics['latency_ms']:.3g} ms, accuracy {best.metrics['accuracy']:.3f})")
    return DeviceOutcome(device, relative_cost, best, False, reason, len(result.history))


def select_device(devices: Sequence[tuple[str, float]], search: Callable[[str], SearchResult],
                  max_latency_ms: float, min_accuracy: float) -> Selection:
    """Search every ``(name, relative_cost)`` device with ``search(name)`` and choose the cheapest feasible."""
    outcomes = [judge(search(name), name, cost, max_latency_ms, min_accuracy) for name, cost in devices]
    feasible = [o for o in outcomes if o.feasible]
    if feasible:
        chosen = min(feasible, key=lambda o: (o.relative_cost, o.best.metrics["latency_ms"], o.device))
        return Selection(chosen.device, outcomes, "")
    kinds = {o.reason.split(":", 1)[0] for o in outcomes if o.best is not None}
    binding = kinds.pop() if len(kinds) == 1 else "both" if kinds else "device"
    return Selection(None, outcomes, binding)
