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
  file size. Given calibration batches, each layer's error is weighted by its measured sensitivity
  (:func:`site_sensitivity`: the distillation loss when only that layer's rows carry a set relative error of
  random noise), so the proxy is a sensitivity-weighted mean: on the fine-tuned MiniLM the word embedding
  measured 5.8x the mean layer, the FFN input layers of the first three blocks 3.2-3.9x, every layer of the
  last two blocks at most 0.4x, where the unweighted mean counts each of the 37 layers alike. Given
  calibration batches, each linear layer is also scored on its *outputs* rather than its weights: with its
  inputs' second moment ``C`` (:func:`input_moments`, real tokens only), an error ``D`` counts as
  ``tr(D C D^T) / tr(W C W^T)``, and factorisations are fitted to ``W C^(1/2)`` (the data-aware fit the
  refit and distillation make; the word embedding's token-count weighting is the same rule for one-hot
  inputs); a TT whose input splits over several cores cannot absorb ``C^(1/2)``, so its cores are fitted to
  the outputs by a short Adam run from the TT-SVD (:func:`fit_tt_to_outputs`). Transformer activations are
  far from isotropic, so on MiniLM this lowers a factorised layer's error several-fold (the first FFN
  output layer at lopsided TT rank 32: 0.85 on the weights, 0.02 on the outputs) while a dropped layer
  still loses everything: scored on weights, a 4-bit TT layer at rank 32 looked nearly as lost as a
  dropped one, and the search preferred shallow models that distilled worse than full-depth ones of their
  size. Milliseconds per candidate once its cache is warm, but fitting those TT cores takes 0.1-1.7 s per
  layer, shape and rank on two cores (about 560 fits, some five minutes, in the thorough size search).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..compress import apply_plan
from ..compress.quant import QuantPlan
from ..errors import UserError
from ..layers.quant import core_quantizers
from ..layers.tt import merge_cores, tt_svd
from ..models.activations import record_layer_inputs
from ..models.elastic import kept_layers
from ..train.losses import logits_kl
from .cost import spec_to_plan
from .space import EMBEDDING_NAME, CandidateSpec, EncoderShape, LayerSpec

MOMENT_RIDGE = 0.01  # of the mean eigenvalue, added to each input moment (see input_moments)
TT_FIT_STEPS = 50  # Adam steps fitting a multi-input-core TT to a layer's outputs (see fit_tt_to_outputs)
TT_FIT_LR = 0.1  # each core's step size, as a fraction of its root-mean-square entry


def _rel_error(delta: torch.Tensor, ref: torch.Tensor, moment: torch.Tensor | None = None) -> float:
    """Relative squared error of ``ref + delta`` against ``ref`` (``out x in``): of the weights, or given the
    inputs' second moment ``C``, of the outputs, ``tr(D C D^T) / tr(W C W^T)``."""
    if moment is None:
        return float((delta**2).sum() / (ref**2).sum().clamp_min(1e-30))
    delta, ref, moment = delta.double(), ref.double(), moment.double()
    return float(((delta @ moment) * delta).sum() / ((ref @ moment) * ref).sum().clamp_min(1e-300))


def _quant_round(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row round-to-nearest of ``w`` at ``bits``."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale


def _rel_quant_error(w: torch.Tensor, bits: int, moment: torch.Tensor | None = None) -> float:
    """Relative squared error (see :func:`_rel_error`) of symmetric per-row round-to-nearest at ``bits``."""
    if bits >= 32:
        return 0.0
    return _rel_error(_quant_round(w, bits) - w, w, moment)


def _rel_prune_error(w: torch.Tensor, sparsity: float, m: int = 4, moment: torch.Tensor | None = None) -> float:
    """Relative squared error (see :func:`_rel_error`) of keeping the largest ``n`` of every ``m`` consecutive
    weights of a row."""
    if sparsity <= 0:
        return 0.0
    n = max(1, round(m * (1 - sparsity)))
    cols = w.shape[1] - w.shape[1] % m
    blocks = w[:, :cols].reshape(w.shape[0], -1, m)
    dropped = torch.topk(blocks.abs(), m - n, dim=-1, largest=False).indices
    delta = torch.zeros_like(w)
    delta[:, :cols] = (blocks.scatter(-1, dropped, 0.0) - blocks).reshape(w.shape[0], -1)
    return _rel_error(delta, w, moment)


def input_moments(model: nn.Module, names: Sequence[str], batches: Sequence[dict[str, torch.Tensor]],
                  ridge: float = MOMENT_RIDGE) -> dict[str, torch.Tensor]:
    """Second moment ``E[x x^T]`` (float64, ``in x in``) of the input of each named linear layer over the real
    tokens of ``batches`` (padding excluded), plus ``ridge`` times its mean eigenvalue on the diagonal.

    Why the ridge: a few thousand calibration tokens leave directions of a 1536-wide input unseen, and a
    factorization that drops them would score no error there although the test data reach them a little."""
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise UserError(f"no linear layer named {missing[0]!r}; give names of nn.Linear modules")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)

    def accumulate(name: str, rows: torch.Tensor) -> None:
        rows = rows.double()
        sums[name] = sums.get(name, 0) + rows.T @ rows
        counts[name] += rows.shape[0]

    record_layer_inputs(model, list(names), batches, accumulate)
    out = {}
    for n in names:
        if not counts[n]:
            raise UserError(f"layer {n!r} saw no tokens in the calibration batches; pass non-empty batches")
        moment = sums[n] / counts[n]
        out[n] = moment + torch.eye(len(moment), dtype=moment.dtype) * (ridge * moment.trace() / len(moment))
    return out


def _psd_sqrt(moment: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh(moment.double())
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _rel_tt_error(matrix: torch.Tensor, in_modes: tuple[int, ...], out_modes: tuple[int, ...], rank: int,
                  bits: int) -> float:
    """Relative squared error of the TT-SVD of ``matrix`` with its cores rounded to ``bits`` as the
    quantized TT layer rounds them (per bond channel, MSE-fitted step size)."""
    cores, err = tt_svd(matrix, in_modes, out_modes, max_rank=rank)
    if bits >= 32:
        return err**2
    rounded = [c.double() for c in _rounded_cores([c.float() for c in cores], bits)]
    rebuilt = merge_cores(rounded).reshape(matrix.shape).to(matrix.dtype)
    return float(((rebuilt - matrix) ** 2).sum() / (matrix**2).sum().clamp_min(1e-30))


def _rounded_cores(cores: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
    """TT ``cores`` rounded to ``bits`` as the quantized TT layer rounds them (per bond channel, MSE-fitted
    step size); unchanged at 32 bits."""
    if bits >= 32:
        return cores
    plan = QuantPlan(weight_bits=bits)
    with torch.no_grad():
        return [q(c) for q, c in zip(core_quantizers(cores, bits, plan.symmetric, plan.per_channel), cores,
                                     strict=True)]


def _padded(matrix: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> torch.Tensor:
    """``matrix`` (``in x out``) zero-padded to ``prod(in_modes) x prod(out_modes)``."""
    out = torch.zeros(math.prod(in_modes), math.prod(out_modes), dtype=matrix.dtype)
    out[: matrix.shape[0], : matrix.shape[1]] = matrix
    return out


def _tt_weight(cores: Sequence[torch.Tensor], shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """The ``out x in`` weight (``shape``) that TT-matrix ``cores`` stand for, padding cut off."""
    merged = merge_cores(list(cores))  # (1, prod in_modes, prod out_modes, 1)
    return merged.reshape(merged.shape[1], merged.shape[2])[: shape[1], : shape[0]].t()


def fit_tt_to_outputs(weight: torch.Tensor, in_modes: tuple[int, ...], out_modes: tuple[int, ...], rank: int,
                      moment: torch.Tensor, steps: int = TT_FIT_STEPS) -> list[torch.Tensor]:
    """TT-matrix cores of ``weight`` (``out x in``) fitted to its outputs on inputs of second moment
    ``moment``: the TT-SVD of the weight, then ``steps`` Adam steps on ``tr(D C D^T)`` for the error ``D``
    (each core's step size a fixed fraction of its own scale, since TT-SVD leaves the whole norm in the last
    core). Returns the cores (float32) of the lowest error seen, so never worse than the TT-SVD."""
    cores, _ = tt_svd(_padded(weight.float().t(), in_modes, out_modes), in_modes, out_modes, max_rank=rank)
    target, moment = weight.float(), moment.float()
    scale = float(((target @ moment) * target).sum().clamp_min(1e-30))
    params = [nn.Parameter(c.float().clone()) for c in cores]
    optimizer = torch.optim.Adam([{"params": [p], "lr": TT_FIT_LR * float(p.detach().pow(2).mean().sqrt())}
                                  for p in params])
    best, best_loss = [c.float() for c in cores], float("inf")
    with torch.enable_grad():
        for _ in range(steps + 1):
            delta = _tt_weight(params, weight.shape) - target
            loss = ((delta @ moment) * delta).sum() / scale
            value = loss.item()
            if value < best_loss:
                best, best_loss = [p.detach().clone() for p in params], value
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return best


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return (out.logits if hasattr(out, "logits") else out).float()


def _kd_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], teacher: Sequence[torch.Tensor],
             temperature: float) -> tuple[float, int, int]:
    """Summed per-example soft-target loss of ``model`` against the teacher's logits; correct and count."""
    loss, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for batch, target in zip(batches, teacher, strict=True):
            logits = _logits(model, batch)
            loss += float(logits_kl(logits.double(), target.double(), temperature)) * len(logits)  # tiny KLs
            if "labels" in batch:
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
            count += len(logits)
    return loss, correct, count


def site_sensitivity(model: nn.Module, names: Sequence[str], batches: Sequence[dict[str, torch.Tensor]],
                     relative_error: float = 0.05, temperature: float = 2.0, seed: int = 0,
                     moments: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Distillation loss per unit of relative squared weight error, per layer: how much the output moves when
    only that layer is perturbed.

    Every row of the layer's weight gets Gaussian noise of ``relative_error`` times its own energy, so the
    layer's relative error is ``relative_error`` both plainly and weighted by any row weighting (the word
    embedding's token counts); the loss is that of :class:`KDProxy` on ``batches``. To first order the loss
    of small errors adds up over layers as ``sum(sensitivity * error)``, which is what weighting the proxy by
    these values approximates. Given a layer's input ``moments`` (:func:`input_moments`), the loss is per unit
    of the noise's relative *output* error (:func:`_rel_error`), the error the proxy then scores that layer on.
    One forward pass over ``batches`` per layer; the weights are restored."""
    if not 0 < relative_error < 1:
        raise UserError(f"relative_error must lie in (0, 1), got {relative_error}")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise UserError(f"no layer named {missing[0]!r} in the model; give names from model.named_modules()")
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        teacher = [_logits(model, b) for b in batches]
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        weight = modules[name].weight
        original = weight.detach().clone()
        noise = torch.randn(weight.shape, generator=generator)
        noise *= (original.float().norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True).clamp_min(1e-30)
                  * relative_error**0.5)
        with torch.no_grad():
            weight.add_(noise.to(weight.dtype))
        try:
            loss, _, count = _kd_loss(model, batches, teacher, temperature)
        finally:
            with torch.no_grad():
                weight.copy_(original)
        moment = (moments or {}).get(name)
        error = relative_error if moment is None else _rel_error(noise, original.float(), moment)
        out[name] = max(0.0, loss / max(count, 1)) / error
    model.train(was_training)
    return out


@dataclass
class WeightErrorProxy:
    """Mean relative error of a candidate's layers; ``weights`` maps module name -> dense weight (``out x in``,
    as ``nn.Linear`` stores it; the embedding as ``vocab x hidden``); ``sensitivity`` maps module name ->
    weight of its error in the mean (missing: the mean of the given ones; None: all equal); ``moments`` maps a
    linear layer's name -> its inputs' second moment (:func:`input_moments`), which makes its error that of
    its outputs on the task's data (missing: of its weights)."""

    weights: dict[str, torch.Tensor]
    shape: EncoderShape
    token_counts: torch.Tensor | None = None  # per vocabulary row: weights the word embedding's error
    sensitivity: dict[str, float] | None = None
    moments: dict[str, torch.Tensor] | None = None
    _cache: dict[tuple, Any] = field(default_factory=dict, repr=False)
    _site_weight: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.sensitivity is not None:
            bad = [n for n, v in self.sensitivity.items() if not (math.isfinite(v) and v >= 0)]
            if bad or not any(self.sensitivity.values()):
                raise UserError(f"sensitivity needs finite non-negative values, not all zero (bad: {bad[:1]})")
        self._site_weight = self._site_weights()
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
    def from_model(cls, model: nn.Module, shape: EncoderShape, token_counts: torch.Tensor | None = None,
                   batches: Sequence[dict[str, torch.Tensor]] | None = None, seed: int = 0,
                   moment_batches: Sequence[dict[str, torch.Tensor]] | None = None) -> WeightErrorProxy:
        """The proxy of ``model``'s layers; with calibration ``batches``, each linear layer scored on its
        outputs (input moments over ``moment_batches``, default ``batches``) and weighted by
        :func:`site_sensitivity` per unit of that error (noise drawn with ``seed``)."""
        weights = {name: m.weight.detach().float().clone() for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Embedding)) and (name.startswith(shape.prefix)
                                                                    or name.endswith(EMBEDDING_NAME))}
        if not batches:
            return cls(weights, shape, token_counts)
        linears = [n for n in weights if not n.endswith(EMBEDDING_NAME)]
        moments = input_moments(model, linears, moment_batches or batches)
        sensitivity = site_sensitivity(model, list(weights), batches, seed=seed, moments=moments)
        return cls(weights, shape, token_counts, sensitivity, moments)

    def __call__(self, spec: CandidateSpec) -> dict[str, float]:
        names = [n for n in self._all_site_names()
                 if not n.endswith(EMBEDDING_NAME) or spec.embedding is not None]  # embedding only if searched
        present = {x.name: x for x in map(self._full_model_site(spec.arch.num_layers), spec.all_layers())}
        weight = self._site_weight
        total = sum(weight[n] * (self._layer_error(present[n]) if n in present else 1.0) for n in names)
        return {"proxy_loss": total / max(sum(weight[n] for n in names), 1e-300)}

    def _full_model_site(self, depth: int) -> Callable[[LayerSpec], LayerSpec]:
        """A sub-network's layer ``k`` is the full model's layer ``kept_layers(depth)[k]`` (the rule the
        ``subnet`` plan extracts with): its weight and sensitivity are that layer's, and the full model's
        layers it skips count as lost. Scoring layer ``k`` as the full model's ``k`` priced the FFN input layer
        of a 3-of-6 MiniLM's last block (the full model's sixth: at most 0.4x the mean sensitivity) as the
        third block's (3.2-3.9x), and its lost layers as the cheap last three."""
        kept = kept_layers(depth, self.shape.num_layers)
        head = self.shape.prefix + "."

        def rename(x: LayerSpec) -> LayerSpec:
            if not x.name.startswith(head):
                return x
            index, _, rest = x.name[len(head):].partition(".")
            return replace(x, name=f"{head}{kept[int(index)]}.{rest}")

        return rename

    def _site_weights(self) -> dict[str, float]:
        names = self._all_site_names()
        if self.sensitivity is None:
            return dict.fromkeys(names, 1.0)
        given = [self.sensitivity[n] for n in names if n in self.sensitivity]
        fill = sum(given) / len(given) if given else 1.0
        return {n: self.sensitivity.get(n, fill) for n in names}

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
            moment = self._moment(x.name, part.shape[1])
            kept = 1.0 - _rel_error(self._dropped(full, part), full, self._moment(x.name, full.shape[1]))
            kept = min(1.0, max(0.0, kept))
            rounding = 0.0 if x.format == "tt" else _rel_quant_error(part, x.bits, moment)  # TT: in _factor_error
            err = self._factor_error(x, part) + rounding + _rel_prune_error(part, x.sparsity, moment=moment)
            self._cache[key] = (1.0 - kept) + kept * min(1.0, err)
        return self._cache[key]

    @staticmethod
    def _dropped(full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """``-full`` where a sub-network's slice ``part`` (its leading rows and columns) does not reach."""
        delta = -full.clone()
        delta[: part.shape[0], : part.shape[1]] = 0.0
        return delta

    def _moment(self, name: str, width: int) -> torch.Tensor | None:
        """The input moment of a layer's leading ``width`` inputs (None: score its weights)."""
        moment = (self.moments or {}).get(name)
        return None if moment is None else moment[:width, :width]

    def _whitened(self, name: str, part: torch.Tensor) -> torch.Tensor:
        """``part @ C^(1/2)``: its Frobenius norm is the output norm on the task's inputs, so factorising it
        minimises the output error (for a 2-core TT, exactly the data-aware low-rank fit), not the weight's."""
        moment = self._moment(name, part.shape[1])
        if moment is None:
            return part
        key = ("sqrt", name, part.shape[1])
        if key not in self._cache:
            self._cache[key] = _psd_sqrt(moment)
        return (part.double() @ self._cache[key]).to(part.dtype)

    def _factor_error(self, x: LayerSpec, part: torch.Tensor) -> float:
        key = ("factor", x.name, tuple(part.shape), x.format, x.rank, x.in_modes, x.out_modes,
               x.bits if x.format == "tt" else 32)
        if x.format not in ("lowrank", "tt"):
            return 0.0
        if key in self._cache:
            return self._cache[key]
        split_input = x.format == "tt" and sum(m > 1 for m in x.in_modes) > 1
        if split_input and self._moment(x.name, part.shape[1]) is not None:
            error = self._fitted_tt_error(x, part)
        elif x.format == "lowrank":
            s = torch.linalg.svdvals(self._whitened(x.name, part).double())
            error = float((s[x.rank:] ** 2).sum() / (s**2).sum().clamp_min(1e-300))
        else:
            part = self._whitened(x.name, part)
            mat = part if x.name.endswith(EMBEDDING_NAME) else part.t()  # in x out
            error = _rel_tt_error(_padded(mat, x.in_modes, x.out_modes), x.in_modes, x.out_modes, x.rank, x.bits)
        self._cache[key] = error
        return error

    def _fitted_tt_error(self, x: LayerSpec, part: torch.Tensor) -> float:
        """Output error of a TT layer whose input splits over several cores, fitted to the task's inputs.

        Why not the TT-SVD of ``W C^(1/2)``: with more than one input core, ``C^(1/2)`` mixes the input modes,
        so that fit mapped back is no TT of the same ranks, and its error is no error any TT layer has. Scored
        that way, a balanced 3-core TT of MiniLM at rank 29 lost 0.47 of a query layer's output where a
        data-aware fit of its cores (what the refit and distillation do) loses 0.16, against 0.19 for the
        exact low-rank fit at rank 32 (docs/search.md). The cores are fitted once per layer, shape and rank
        (:func:`fit_tt_to_outputs`) and rounded per bit width."""
        moment = self._moment(x.name, part.shape[1])
        key = ("fitted", x.name, tuple(part.shape), x.in_modes, x.out_modes, x.rank)
        if key not in self._cache:
            self._cache[key] = fit_tt_to_outputs(part, x.in_modes, x.out_modes, x.rank, moment)
        rebuilt = _tt_weight(_rounded_cores(self._cache[key], x.bits), part.shape)
        return _rel_error(rebuilt.double() - part.double(), part, moment)


class KDProxy:
    """Distillation loss and accuracy of the built candidate on calibration batches (inherited weights)."""

    def __init__(self, model: nn.Module, shape: EncoderShape, batches: Sequence[dict[str, torch.Tensor]],
                 temperature: float = 2.0) -> None:
        self.model, self.shape, self.batches, self.temperature = model.eval(), shape, list(batches), temperature
        with torch.inference_mode():
            self._teacher = [_logits(model, b) for b in self.batches]

    def __call__(self, spec: CandidateSpec) -> dict[str, float]:
        student = apply_plan(self.model, spec_to_plan(spec, self.shape)).eval()
        loss, correct, count = _kd_loss(student, self.batches, self._teacher, self.temperature)
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
