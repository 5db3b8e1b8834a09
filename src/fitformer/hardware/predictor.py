"""Learned latency predictor (HAT, Wang et al. 2020, section 3.3, extended): residual correction of the
calibrated analytic model.

Features are computed from the op list (so any front end works): input shape, the analytic latency and
FLOPs split by kind of work (dense / int8 / sparse / TT / low-rank GEMM, attention, vector ops), launches
and weight bytes. The target is log(measured / analytic), so the learned part only has to correct the
roofline. Two regressors are fitted — closed-form ridge and a small MLP — and the one with the lower
validation MAPE is kept. The file is safetensors (tensors) with JSON metadata: no pickle, and a
feature-version check on load.
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

PREDICTOR_VERSION = 2
FEATURE_VERSION = f"ops{OPS_VERSION}-pred{PREDICTOR_VERSION}"
CATEGORIES = ("gemm", "int8", "sparse", "tt", "lowrank", "bmm", "vector")
FEATURES = (["log_batch", "log_seq", "log_tokens", "log_analytic_s", "log_launches", "log_weight_mb",
             "mean_sparsity"] + [f"log_lat_{c}" for c in CATEGORIES] + [f"log_mflop_{c}" for c in CATEGORIES]
            + [f"log_count_{c}" for c in CATEGORIES] + [f"log_act_mb_{c}" for c in CATEGORIES]
            + [f"log_max_act_mb_{c}" for c in CATEGORIES])
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
    sparsities = []
    for op, c in zip(ops, costs, strict=True):
        cat = _category(op)
        lat[cat] += c.latency_s
        flop[cat] += op.flops
        count[cat] += 1
        act[cat] += op.act_bytes
        max_act[cat] = max(max_act[cat], op.act_bytes)
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

    kind: str  # "ridge" or "mlp"
    analytic: AnalyticModel
    mean: np.ndarray
    std: np.ndarray
    tensors: dict[str, torch.Tensor]
    hidden: int = 0
    report: dict[str, Any] = field(default_factory=dict)

    def _residual(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        if self.kind == "ridge":
            out = z @ self.tensors["ridge.w"].numpy() + float(self.tensors["ridge.b"])
        else:
            mlp = _MLP(z.shape[1], self.hidden)
            mlp.load_state_dict({k[4:]: v for k, v in self.tensors.items() if k.startswith("mlp.")})
            with torch.no_grad():
                out = mlp(torch.as_tensor(z, dtype=torch.float32)).double().numpy()
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


def _fit_ridge(z: np.ndarray, y: np.ndarray, alpha: float) -> dict[str, torch.Tensor]:
    b = float(y.mean())
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - b))
    return {"ridge.w": torch.as_tensor(w), "ridge.b": torch.tensor(b, dtype=torch.float64)}


def _fit_mlp(z: np.ndarray, y: np.ndarray, hidden: int, seed: int, steps: int) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation
    try:
        return _train_mlp(z, y, hidden, seed, steps)
    finally:
        torch.set_num_threads(threads)


def _train_mlp(z: np.ndarray, y: np.ndarray, hidden: int, seed: int, steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    mlp = _MLP(z.shape[1], hidden)
    x_t, y_t = torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.AdamW(mlp.parameters(), lr=3e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.smooth_l1_loss(mlp(x_t), y_t, beta=0.05)
        loss.backward()
        opt.step()
        sched.step()
    return {f"mlp.{k}": v.detach().clone() for k, v in mlp.state_dict().items()}


def fit_predictor(samples: Sequence[Sample], latencies_s: Sequence[float], analytic: AnalyticModel,
                  val_fraction: float = 0.25, seed: int = 0, hidden: int = 64,
                  mlp_steps: int = 1500) -> LatencyPredictor:
    """Fit ridge and MLP on a training split, pick by validation MAPE, refit the winner on all samples."""
    if len(samples) < 8:
        raise UserError(f"a predictor needs at least 8 measured samples, got {len(samples)}")
    x = np.stack([features(ops, b, s, analytic) for ops, b, s in samples])
    y_s = np.asarray(latencies_s, dtype=float)
    y = np.log(y_s) - x[:, FEATURES.index("log_analytic_s")]
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / std
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = max(2, int(len(samples) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    clip = {"clip": torch.tensor([y.min() - 0.25, y.max() + 0.25], dtype=torch.float64)}
    candidates: dict[str, tuple[dict[str, torch.Tensor], int, float]] = {}
    for alpha in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
        candidates[f"ridge:{alpha}"] = ({**_fit_ridge(z[train], y[train], alpha), **clip}, 0, alpha)
    candidates["mlp"] = ({**_fit_mlp(z[train], y[train], hidden, seed, mlp_steps), **clip}, hidden, 0.0)
    scores = {}
    for name, (tensors, h, _a) in candidates.items():
        pred = LatencyPredictor(name.split(":")[0], analytic, mean, std, tensors, h)
        scores[name] = metrics(np.exp(x[val, FEATURES.index("log_analytic_s")] + pred._residual(x[val])),
                               y_s[val])["mape"]
    best = min(scores, key=scores.get)
    kind = best.split(":")[0]
    fitted = _fit_ridge(z, y, candidates[best][2]) if kind == "ridge" else _fit_mlp(z, y, hidden, seed, mlp_steps)
    tensors = {**fitted, **clip}
    report = {"chosen": best, "validation_mape": scores, "train_count": len(samples)}
    return LatencyPredictor(kind, analytic, mean, std, tensors, hidden if kind == "mlp" else 0, report)
