"""Accuracy proxies: how much a candidate loses, judged without training it.

- :class:`KDProxy` builds the candidate for real (``apply_plan`` on the SuperTransformer / teacher: inherited
  weights, TT-SVD, quantization, N:M pruning) and measures, on a few calibration batches, the distillation
  loss against the teacher (KL divergence of the softened outputs, Hinton et al. 2015) and the accuracy.
  Seconds per candidate on MiniLM; it is the proxy whose agreement with post-distillation accuracy the
  benchmark measures.
- :class:`WeightErrorProxy` is the cheap, deterministic proxy: per layer, the relative squared Frobenius error
  of the compressed weight against the full one — the energy of the slice a sub-network drops, then the
  truncation error of the low-rank / TT-SVD factorisation, the rounding error of the bit width and the error
  of N:M magnitude pruning, each measured once on the real weights and cached — averaged over the layers.
  A quantized TT layer is scored on its rounded *cores* (rebuilt and compared with the full weight), since
  that is what it stores: the dense weight's rounding error (about 0.01 at 4 bits) says nothing about
  4-bit cores, whose per-core errors multiply through the train. Given the task's token counts, the word
  embedding's error is weighted by how often each row is used (rows scaled by the square root of their
  count before factorising and rounding), as the data-aware refit fits it: unweighted, MiniLM's 30522 x 384
  table has TT-SVD error 0.957 at rank 32 and 0.881 at rank 64, too close to tell the two apart, where
  weighted by rotten-tomatoes' tokens it is 0.668 and 0.531 (the refit reaches 0.557 at rank 64), and an
  8-minute distillation of the rank-64 embedding beat the rank-32 one by 4.7 validation points at equal
  file size. Milliseconds per candidate once its cache is warm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import apply_plan
from ..compress.quant import QuantPlan
from ..errors import UserError
from ..layers.quant import core_quantizers
from ..layers.tt import merge_cores, tt_svd
from .cost import spec_to_plan
from .space import EMBEDDING_NAME, CandidateSpec, EncoderShape, LayerSpec


def _rel_quant_error(w: torch.Tensor, bits: int) -> float:
    """Relative squared error of symmetric per-row round-to-nearest at ``bits``."""
    if bits >= 32:
        return 0.0
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale
    return float(((q - w) ** 2).sum() / (w**2).sum().clamp_min(1e-30))


def _rel_prune_error(w: torch.Tensor, sparsity: float, m: int = 4) -> float:
    """Relative squared error of keeping the largest ``n`` of every ``m`` consecutive weights of a row."""
    if sparsity <= 0:
        return 0.0
    n = max(1, round(m * (1 - sparsity)))
    cols = w.shape[1] - w.shape[1] % m
    blocks = w[:, :cols].reshape(w.shape[0], -1, m).abs()
    dropped = torch.topk(blocks, m - n, dim=-1, largest=False).values
    return float((dropped**2).sum() / (w**2).sum().clamp_min(1e-30))


def _rel_tt_error(matrix: torch.Tensor, in_modes: tuple[int, ...], out_modes: tuple[int, ...], rank: int,
                  bits: int) -> float:
    """Relative squared error of the TT-SVD of ``matrix`` with its cores rounded to ``bits`` as the
    quantized TT layer rounds them (per bond channel, MSE-fitted step size)."""
    cores, err = tt_svd(matrix, in_modes, out_modes, max_rank=rank)
    if bits >= 32:
        return err**2
    plan = QuantPlan(weight_bits=bits)
    cores = [c.float() for c in cores]
    with torch.no_grad():
        rounded = [q(c).double() for q, c in zip(core_quantizers(cores, bits, plan.symmetric, plan.per_channel),
                                                  cores, strict=True)]
    rebuilt = merge_cores(rounded).reshape(matrix.shape).to(matrix.dtype)
    return float(((rebuilt - matrix) ** 2).sum() / (matrix**2).sum().clamp_min(1e-30))


@dataclass
class WeightErrorProxy:
    """Mean relative weight error of a candidate's layers; ``weights`` maps module name -> dense weight
    (``out x in``, as ``nn.Linear`` stores it; the embedding as ``vocab x hidden``)."""

    weights: dict[str, torch.Tensor]
    shape: EncoderShape
    token_counts: torch.Tensor | None = None  # per vocabulary row: weights the word embedding's error
    _cache: dict[tuple, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.token_counts is None:
            return
        counts = self.token_counts.detach().double().flatten()
        name = next((n for n in self.weights if n.endswith(EMBEDDING_NAME)), None)
        if name is None or counts.sum() <= 0:
            return
        rows = self.weights[name]
        if counts.numel() != rows.shape[0]:
            raise UserError(f"token_counts has {counts.numel()} entries but the word embedding has "
                            f"{rows.shape[0]} rows; count the tokens with the model's own vocabulary size")
        self.weights = {**self.weights, name: (rows.double() * counts.sqrt()[:, None]).to(rows.dtype)}

    @classmethod
    def from_model(cls, model: nn.Module, shape: EncoderShape,
                   token_counts: torch.Tensor | None = None) -> WeightErrorProxy:
        weights = {name: m.weight.detach().float().clone() for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Embedding)) and (name.startswith(shape.prefix)
                                                                    or name.endswith(EMBEDDING_NAME))}
        return cls(weights, shape, token_counts)

    def __call__(self, spec: CandidateSpec) -> dict[str, float]:
        names = [n for n in self._all_site_names()
                 if not n.endswith(EMBEDDING_NAME) or spec.embedding is not None]  # embedding only if searched
        present = {x.name: x for x in spec.all_layers()}
        total = sum(self._layer_error(present[n]) if n in present else 1.0 for n in names)
        return {"proxy_loss": total / len(names)}

    def _all_site_names(self) -> list[str]:
        return [n for n in self.weights if n.startswith(self.shape.prefix) or n.endswith(EMBEDDING_NAME)]

    def _slice(self, x: LayerSpec) -> torch.Tensor:
        w = self.weights[x.name]
        if x.name.endswith(EMBEDDING_NAME):
            return w[: x.in_features, : x.out_features]  # vocab x hidden
        return w[: x.out_features, : x.in_features]

    def _layer_error(self, x: LayerSpec) -> float:
        key = (x.name, x.in_features, x.out_features, x.format, x.rank, x.in_modes, x.out_modes, x.bits, x.sparsity)
        if key not in self._cache:
            full = self.weights[x.name]
            part = self._slice(x)
            kept = float((part**2).sum() / (full**2).sum().clamp_min(1e-30))
            rounding = 0.0 if x.format == "tt" else _rel_quant_error(part, x.bits)  # TT: in _factor_error
            err = self._factor_error(x, part) + rounding + _rel_prune_error(part, x.sparsity)
            self._cache[key] = (1.0 - kept) + kept * min(1.0, err)
        return self._cache[key]

    def _factor_error(self, x: LayerSpec, part: torch.Tensor) -> float:
        key = ("factor", x.name, tuple(part.shape), x.format, x.rank, x.in_modes, x.out_modes,
               x.bits if x.format == "tt" else 32)
        if key not in self._cache:
            if x.format == "lowrank":
                s = torch.linalg.svdvals(part.double())
                self._cache[key] = float((s[x.rank:] ** 2).sum() / (s**2).sum().clamp_min(1e-300))
            elif x.format == "tt":
                mat = part if x.name.endswith(EMBEDDING_NAME) else part.t()  # in x out
                padded = torch.zeros(math.prod(x.in_modes), math.prod(x.out_modes), dtype=mat.dtype)
                padded[: mat.shape[0], : mat.shape[1]] = mat
                self._cache[key] = _rel_tt_error(padded, x.in_modes, x.out_modes, x.rank, x.bits)
            else:
                self._cache[key] = 0.0
        return self._cache[key]


class KDProxy:
    """Distillation loss and accuracy of the built candidate on calibration batches (inherited weights)."""

    def __init__(self, model: nn.Module, shape: EncoderShape, batches: Sequence[dict[str, torch.Tensor]],
                 temperature: float = 2.0) -> None:
        self.model, self.shape, self.batches, self.temperature = model.eval(), shape, list(batches), temperature
        with torch.inference_mode():
            self._teacher = [self._logits(model, b) for b in self.batches]

    @staticmethod
    def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        return (out.logits if hasattr(out, "logits") else out).float()

    def __call__(self, spec: CandidateSpec) -> dict[str, float]:
        student = apply_plan(self.model, spec_to_plan(spec, self.shape)).eval()
        t = self.temperature
        loss, correct, count = 0.0, 0, 0
        with torch.inference_mode():
            for batch, teacher in zip(self.batches, self._teacher, strict=True):
                logits = self._logits(student, batch)
                loss += float(F.kl_div(F.log_softmax(logits / t, -1), F.softmax(teacher / t, -1),
                                       reduction="batchmean")) * t * t * len(logits)
                if "labels" in batch:
                    correct += int((logits.argmax(-1) == batch["labels"]).sum())
                count += len(logits)
        out: dict[str, Any] = {"proxy_loss": max(0.0, loss / max(count, 1))}  # KL >= 0 up to rounding
        if any("labels" in b for b in self.batches):
            out["accuracy"] = correct / max(count, 1)
        return out


@dataclass
class CombinedEvaluator:
    """Cost metrics plus proxy metrics for one candidate: what a search's ``evaluate`` returns."""

    cost: Any
    proxy: Any

    def __call__(self, spec: CandidateSpec) -> dict[str, float]:
        return {**self.cost(spec), **self.proxy(spec)}
