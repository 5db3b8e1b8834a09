"""Learned latency predictor (HAT, Wang et al. 2020, section 3.3, extended): residual correction of the
calibrated analytic model.

Features are computed from the op list (so any front end works): input shape, the analytic latency and
FLOPs split by kind of work (dense / int8 / sparse / TT / low-rank GEMM, attention, vector ops), launches
and weight bytes. The target is log(measured / analytic), so the learned part only has to correct the
roofline. Candidates — no correction, ridge with a Huber loss (robust to measurements slowed by other
processes) at several strengths, a small MLP — are scored by cross-validated MAPE with the folds split by
configuration, and the best is refitted on all samples. The file is safetensors (tensors) with JSON
metadata: no pickle, and a feature-version check on load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from scipy.stats import kendalltau

from ..errors import UserError
from ..io import atomic_path
from .analytic import AnalyticModel, Efficiency
from .ops import FEATURE_VERSION as OPS_VERSION
from .ops import Op
from .spec import spec_from_dict

PREDICTOR_VERSION = 3
FEATURE_VERSION = f"ops{OPS_VERSION}-pred{PREDICTOR_VERSION}"
CATEGORIES = ("gemm", "int8", "sparse", "tt", "lowrank", "bmm", "vector")
FEATURES = (["log_batch", "log_seq", "log_tokens", "log_analytic_s", "log_launches", "log_weight_mb",
             "mean_sparsity"] + [f"log_lat_{c}" for c in CATEGORIES] + [f"log_mflop_{c}" for c in CATEGORIES]
            + [f"log_count_{c}" for c in CATEGORIES] + [f"log_act_mb_{c}" for c in CATEGORIES]
            + [f"log_max_act_mb_{c}" for c in CATEGORIES] + [f"log_lat_attention_{c}" for c in CATEGORIES])
Sample = tuple[Sequence[Op], int, int]  # (ops, batch, seq_len)


def _category(op: Op) -> str:
    if op.kind == "bmm":
        return "bmm"
    if op.kind != "gemm":
        return "vector"
    if op.tag in ("tt", "lowrank"):
        return op.tag
    if op.sparse_format and op.sparsity > 0:
        return "sparse"
    return "int8" if op.bits <= 8 else "gemm"


def features(ops: Sequence[Op], batch: int, seq_len: int, analytic: AnalyticModel) -> np.ndarray:
    """The feature vector of one sample (order: :data:`FEATURES`)."""
    costs = analytic.breakdown(ops)
    lat = dict.fromkeys(CATEGORIES, 0.0)
    flop = dict.fromkeys(CATEGORIES, 0.0)
    count = dict.fromkeys(CATEGORIES, 0.0)
    act = dict.fromkeys(CATEGORIES, 0.0)
    max_act = dict.fromkeys(CATEGORIES, 0.0)
    # the attention block's share: a layer's output layout can change which attention kernel runs after it
    # (e.g. the transposed output of a CSR linear sends PyTorch's SDPA from its fused kernel to the math path)
    attention = dict.fromkeys(CATEGORIES, 0.0)
    sparsities = []
    for op, c in zip(ops, costs, strict=True):
        cat = _category(op)
        lat[cat] += c.latency_s
        flop[cat] += op.flops
        count[cat] += 1
        act[cat] += op.act_bytes
        max_act[cat] = max(max_act[cat], op.act_bytes)
        if op.tag == "attention" or ".attention." in op.name:
            attention[cat] += c.latency_s
        if cat == "sparse":
            sparsities.append(op.sparsity)
    total = sum(lat.values())
    row = [math.log(batch), math.log(seq_len), math.log(batch * seq_len), math.log(total),
           math.log(sum(op.launches for op in ops)), math.log1p(sum(op.weight_bytes for op in ops) / 1e6),
           float(np.mean(sparsities)) if sparsities else 0.0]
    row += [math.log1p(lat[c] * 1e6) for c in CATEGORIES]
    row += [math.log1p(flop[c] / 1e6) for c in CATEGORIES]
    row += [math.log1p(count[c]) for c in CATEGORIES]
    row += [math.log1p(act[c] / 1e6) for c in CATEGORIES]
    row += [math.log1p(max_act[c] / 1e6) for c in CATEGORIES]
    row += [math.log1p(attention[c] * 1e6) for c in CATEGORIES]
    return np.asarray(row, dtype=np.float64)


def metrics(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """MAPE (a fraction), RMSE (seconds) and Kendall tau of predicted against measured latencies."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    tau = kendalltau(p, m).statistic if len(p) > 1 else float("nan")
    return {"mape": float(np.mean(np.abs(p - m) / m)), "rmse_s": float(np.sqrt(np.mean((p - m) ** 2))),
            "kendall_tau": float(tau), "count": len(p)}


class _MLP(torch.nn.Module):
    def __init__(self, n_in: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.GELU(), torch.nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


@dataclass
class LatencyPredictor:
    """A fitted residual regressor plus the analytic model it corrects."""

    kind: str  # "none" (the analytic model alone), "ridge" or "mlp"
    analytic: AnalyticModel
    mean: np.ndarray
    std: np.ndarray
    tensors: dict[str, torch.Tensor]
    hidden: int = 0
    report: dict[str, Any] = field(default_factory=dict)

    def _residual(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        if self.kind == "none":
            out = np.zeros(len(z))
        elif self.kind == "ridge":
            out = z @ self.tensors["ridge.w"].numpy() + float(self.tensors["ridge.b"])
        else:
            members = sorted({k.split(".")[0] for k in self.tensors if k.startswith("mlp")})
            outs = []
            for member in members:  # an ensemble of MLPs from different seeds: their mean
                mlp = _MLP(z.shape[1], self.hidden)
                mlp.load_state_dict({k[len(member) + 1:]: v for k, v in self.tensors.items()
                                     if k.startswith(member + ".")})
                with torch.no_grad():
                    outs.append(mlp(torch.as_tensor(z, dtype=torch.float32)).double().numpy())
            out = np.mean(outs, axis=0)
        lo, hi = self.tensors["clip"].tolist()  # never extrapolate the correction beyond what was seen
        return np.clip(out, lo, hi)

    def predict(self, samples: Sequence[Sample]) -> np.ndarray:
        """Latencies in seconds."""
        x = np.stack([features(ops, b, s, self.analytic) for ops, b, s in samples])
        return np.exp(x[:, FEATURES.index("log_analytic_s")] + self._residual(x))

    def save(self, path: str | Path) -> Path:
        meta = {"format": "fitformer-latency-predictor", "feature_version": FEATURE_VERSION, "kind": self.kind,
                "hidden": str(self.hidden), "features": json.dumps(FEATURES),
                "spec": json.dumps(self.analytic.spec.model_dump()),
                "efficiency": json.dumps(self.analytic.eff.to_dict()), "report": json.dumps(self.report)}
        tensors = {"mean": torch.as_tensor(self.mean), "std": torch.as_tensor(self.std),
                   **{k: v.contiguous() for k, v in self.tensors.items()}}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> LatencyPredictor:
        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: no predictor file; fit one with `fitformer calibrate --predictor` or the benchmark")
        try:
            tensors = load_file(str(p))
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{p}: not a safetensors predictor file ({exc})") from None
        if meta.get("format") != "fitformer-latency-predictor":
            raise UserError(f"{p}: field 'format' is '{meta.get('format')}', not a fitformer latency predictor")
        if meta.get("feature_version") != FEATURE_VERSION:
            raise UserError(f"{p}: field 'feature_version' is '{meta.get('feature_version')}' but this fitformer "
                            f"computes features version '{FEATURE_VERSION}'; refit the predictor")
        analytic = AnalyticModel(spec_from_dict(json.loads(meta["spec"]), str(p)),
                                 Efficiency.from_dict(json.loads(meta["efficiency"])))
        return cls(kind=meta["kind"], analytic=analytic, mean=tensors.pop("mean").numpy(),
                   std=tensors.pop("std").numpy(), tensors=tensors, hidden=int(meta.get("hidden", "0")),
                   report=json.loads(meta.get("report", "{}")))


def _fit_ridge(z: np.ndarray, y: np.ndarray, alpha: float, huber: float = 0.1,
               iterations: int = 10) -> dict[str, torch.Tensor]:
    """Ridge regression with a Huber loss (iteratively reweighted least squares): measurements disturbed by
    other processes are only ever slower, and such outliers must not bend the correction."""
    weights = np.ones(len(y))
    for _ in range(iterations):
        sw = weights / weights.sum()
        b = float(sw @ y)
        zc = z - sw @ z
        w = np.linalg.solve(zc.T @ (zc * weights[:, None]) + alpha * np.eye(z.shape[1]),
                            zc.T @ (weights * (y - b)))
        b = float(sw @ (y - z @ w))
        r = np.abs(y - z @ w - b)
        weights = np.minimum(1.0, huber / np.maximum(r, 1e-12))
    return {"ridge.w": torch.as_tensor(w), "ridge.b": torch.tensor(b, dtype=torch.float64)}


def _fit_mlp(z: np.ndarray, y: np.ndarray, hidden: int, seed: int, steps: int,
             members: int = 5) -> dict[str, torch.Tensor]:
    """``members`` MLPs from different seeds (averaged at prediction: one small MLP on a few hundred noisy
    samples depends on its seed more than an ensemble does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation
    try:
        return {f"mlp{i}.{k}": v for i in range(members)
                for k, v in _train_mlp(z, y, hidden, seed + i, steps).items()}
    finally:
        torch.set_num_threads(threads)


def _train_mlp(z: np.ndarray, y: np.ndarray, hidden: int, seed: int, steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    mlp = _MLP(z.shape[1], hidden)
    x_t, y_t = torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.AdamW(mlp.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.smooth_l1_loss(mlp(x_t), y_t, beta=0.05)
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in mlp.state_dict().items()}


def _folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` validation index sets; samples of one group (e.g. one architecture at several input shapes)
    stay together, so validation never sees a configuration the fit has seen."""
    unique = np.random.default_rng(seed).permutation(np.unique(groups))
    return [np.flatnonzero(np.isin(groups, part)) for part in np.array_split(unique, k) if len(part)]


def fit_predictor(samples: Sequence[Sample], latencies_s: Sequence[float], analytic: AnalyticModel,
                  folds: int = 4, seed: int = 0, hidden: int = 16, mlp_steps: int = 400,
                  groups: Sequence[Any] | None = None) -> LatencyPredictor:
    """Fit candidate corrections — none (the analytic model alone), Huber ridge at several strengths, an
    MLP — score each by ``folds``-fold cross-validated MAPE (folds split by ``groups`` when given), and refit
    the winner on all samples."""
    if len(samples) < 8:
        raise UserError(f"a predictor needs at least 8 measured samples, got {len(samples)}")
    x = np.stack([features(ops, b, s, analytic) for ops, b, s in samples])
    y_s = np.asarray(latencies_s, dtype=float)
    if np.any(~np.isfinite(y_s)) or np.any(y_s <= 0):
        raise UserError("a predictor needs positive, finite measured latencies")
    log_a = x[:, FEATURES.index("log_analytic_s")]
    y = np.log(y_s) - log_a
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / std
    clip = {"clip": torch.tensor([y.min() - 0.25, y.max() + 0.25], dtype=torch.float64)}
    group_ids = np.asarray([str(g) for g in groups]) if groups is not None else np.arange(len(y)).astype(str)
    if len(group_ids) != len(y):
        raise UserError(f"fit_predictor got {len(group_ids)} groups for {len(y)} samples")

    def fit(name: str, rows: np.ndarray) -> dict[str, torch.Tensor]:
        if name == "none":
            return {}
        if name == "mlp":
            return _fit_mlp(z[rows], y[rows], hidden, seed, mlp_steps)
        return _fit_ridge(z[rows], y[rows], float(name.split(":")[1]))

    names = ["none", *(f"ridge:{a}" for a in (0.1, 1.0, 10.0, 100.0)), "mlp"]
    errors: dict[str, list[float]] = {n: [] for n in names}
    for val in _folds(group_ids, max(2, folds), seed):
        train = np.setdiff1d(np.arange(len(y)), val)
        for name in names:
            pred = LatencyPredictor(name.split(":")[0], analytic, mean, std, {**fit(name, train), **clip},
                                    hidden if name == "mlp" else 0)
            errors[name].extend(np.abs(np.exp(log_a[val] + pred._residual(x[val])) - y_s[val]) / y_s[val])
    scores = {n: float(np.mean(e)) for n, e in errors.items()}
    best = min(scores, key=scores.get)
    kind = best.split(":")[0]
    report = {"chosen": best, "validation_mape": scores, "train_count": len(samples), "folds": folds}
    return LatencyPredictor(kind, analytic, mean, std, {**fit(best, np.arange(len(y))), **clip},
                            hidden if kind == "mlp" else 0, report)
