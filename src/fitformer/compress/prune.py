"""Hierarchical pruning of BERT-family classifiers: structured (level 1), then fine-grained balanced (level 2).

Level 1 removes whole attention heads, FFN neurons (rows of the up-projection with the matching columns
of the down-projection) and whole layers. While a model is being pruned, *gates* (forward hooks that
multiply a head's context, a neuron's activation or a layer's residual update by 0 or 1) form the
*masked twin*; :class:`StructuredPrunePlan` then removes the gated-off parts physically, giving a smaller
dense model with the same interface and per-layer head counts, which saves and reloads as such
(:func:`load_pruned_classifier`). Groups are scored by

- ``magnitude``: L2 norm of the group's weights;
- ``taylor``: first-order Taylor estimate of the loss change when the group is removed, ``|dL/dg|`` at
  gate ``g = 1`` averaged over batches (Michel et al., "Are Sixteen Heads Really Better than One?",
  NeurIPS 2019, eq. 2; Molchanov et al., CVPR 2019);
- ``movement``: ``-sum_t dL/dg_t`` accumulated while training; since ``dL/dg = sum W * dL/dW`` over the
  group's output weights, this is the movement score ``S = -sum_t W * dL/dW`` of Sanh et al., "Movement
  Pruning", NeurIPS 2020, summed per group.

The fraction pruned follows the cubic schedule of Zhu & Gupta ("To prune, or not to prune", 2017, eq. 1)
during distillation (:class:`GradualPruner`). Level 2 is :class:`BalancedSparsityPlan`: N:M masks inside
each remaining linear layer, stored in the HP format of :mod:`fitformer.layers.sparse`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError
from ..io import atomic_path
from ..layers.sparse import HPTensor, SparseLinear, choose_kernel, decode_hp, encode_hp, nm_mask
from .plan import LayerPlan, ModelPlan, register_handler, register_plan

SHAPES_KEY = "fitformer_layer_shapes"  # per-layer {"heads", "intermediate"} saved in config.json
METHODS = ("magnitude", "taylor", "movement")


# ------------------------------------------------------------------------------------------ structure


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT-family model (``model.<base>.encoder.layer``)."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UserError(f"{type(model).__name__} has no BERT-style encoder.layer list; structured pruning "
                        "supports BERT-family models")
    return layers


def head_size(model: nn.Module) -> int:
    attn = encoder_layers(model)[0].attention.self
    return int(attn.attention_head_size)


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Heads and FFN width of every layer, read from the weights."""
    dh = head_size(model)
    return [{"heads": layer.attention.self.query.out_features // dh,
             "intermediate": layer.intermediate.dense.out_features} for layer in encoder_layers(model)]


def _slice_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new linear keeping ``index`` along ``dim`` (0: outputs, 1: inputs), same dtype and device."""
    weight = layer.weight.detach().index_select(dim, index).clone()
    bias = None if layer.bias is None else (layer.bias.detach()[index] if dim == 0 else layer.bias.detach()).clone()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    out.weight = nn.Parameter(weight)
    if bias is not None:
        out.bias = nn.Parameter(bias)
    return out


def _set_layer_shape(layer: nn.Module, dh: int, heads: torch.Tensor, neurons: torch.Tensor) -> None:
    """Keep heads ``heads`` and FFN neurons ``neurons`` of one block, in place."""
    attn = layer.attention.self
    rows = (heads[:, None] * dh + torch.arange(dh)).reshape(-1)
    for name in ("query", "key", "value"):
        setattr(attn, name, _slice_linear(getattr(attn, name), rows, 0))
    layer.attention.output.dense = _slice_linear(layer.attention.output.dense, rows, 1)
    attn.num_attention_heads = int(heads.numel())
    attn.all_head_size = int(rows.numel())
    layer.intermediate.dense = _slice_linear(layer.intermediate.dense, neurons, 0)
    layer.output.dense = _slice_linear(layer.output.dense, neurons, 1)


def _keep_layers(model: nn.Module, keep: list[int]) -> None:
    base = model.base_model
    base.encoder.layer = nn.ModuleList([base.encoder.layer[i] for i in keep])
    for new_index, layer in enumerate(base.encoder.layer):
        for attn in (layer.attention.self,):
            attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)


def _record_shapes(model: nn.Module) -> None:
    shapes = layer_shapes(model)
    setattr(model.config, SHAPES_KEY, shapes)
    if model.base_model.config is not model.config:
        setattr(model.base_model.config, SHAPES_KEY, shapes)


# ----------------------------------------------------------------------------------------------- plans


@register_plan
@dataclass(frozen=True)
class StructuredPrunePlan(ModelPlan):
    """Level 1: which heads and FFN neurons each layer keeps, and which layers are dropped.

    ``keep_heads[i]`` / ``keep_neurons[i]`` list the kept indices of layer ``i`` (``None``: decide by
    weight magnitude from ``prune_heads`` / ``prune_ffn``, the fractions to remove). Indices refer to the
    model the plan is applied to; ``drop_layers`` removes whole blocks after that."""

    kind: ClassVar[str] = "structured_prune"
    keep_heads: tuple[tuple[int, ...], ...] | None = None
    keep_neurons: tuple[tuple[int, ...], ...] | None = None
    drop_layers: tuple[int, ...] = ()
    prune_heads: float = 0.0
    prune_ffn: float = 0.0

    def resolve(self, model: nn.Module) -> StructuredPrunePlan:
        """The explicit plan for ``model``: fractions turned into kept indices by weight magnitude."""
        shapes = layer_shapes(model)
        for name, frac in (("prune_heads", self.prune_heads), ("prune_ffn", self.prune_ffn)):
            if not 0.0 <= frac < 1.0:
                raise UserError(f"{name} must be a fraction in [0, 1), got {frac}")
        heads, neurons = self.keep_heads, self.keep_neurons
        if heads is None or neurons is None:
            auto = select_structure(importance_magnitude(model), self.prune_heads, self.prune_ffn)
            heads = auto.keep_heads if heads is None else heads
            neurons = auto.keep_neurons if neurons is None else neurons
        plan = StructuredPrunePlan(tuple(tuple(int(i) for i in h) for h in heads),
                                   tuple(tuple(int(i) for i in n) for n in neurons), tuple(self.drop_layers))
        plan._validate(shapes)
        return plan

    def _validate(self, shapes: list[dict[str, int]]) -> None:
        assert self.keep_heads is not None and self.keep_neurons is not None
        n = len(shapes)
        if len(self.keep_heads) != n or len(self.keep_neurons) != n:
            raise UserError(f"structured prune plan lists {len(self.keep_heads)} head sets and "
                            f"{len(self.keep_neurons)} neuron sets for a model of {n} layers; give one per layer")
        if any(not 0 <= i < n for i in self.drop_layers) or len(set(self.drop_layers)) >= n:
            raise UserError(f"drop_layers {list(self.drop_layers)} must name distinct layers in 0..{n - 1} "
                            "and keep at least one")
        for i, (h, f, s) in enumerate(zip(self.keep_heads, self.keep_neurons, shapes, strict=True)):
            if i in self.drop_layers:
                continue
            if not h or len(set(h)) != len(h) or min(h) < 0 or max(h) >= s["heads"]:
                raise UserError(f"layer {i}: keep_heads {list(h)} must be distinct indices in 0..{s['heads'] - 1}"
                                " and keep at least one head (drop the layer to remove all)")
            if len(set(f)) != len(f) or (f and (min(f) < 0 or max(f) >= s["intermediate"])):
                raise UserError(f"layer {i}: keep_neurons must be distinct indices in 0..{s['intermediate'] - 1}")

    def flops_ratio(self, shapes: list[dict[str, int]], hidden: int, dh: int, tokens: int = 128) -> float:
        """Encoder multiply-adds per token after / before (projections, attention, FFN)."""
        assert self.keep_heads is not None and self.keep_neurons is not None

        def block(h: int, f: int) -> float:
            return 4 * hidden * h * dh + 2 * tokens * h * dh + 2 * hidden * f

        before = sum(block(s["heads"], s["intermediate"]) for s in shapes)
        pairs = enumerate(zip(self.keep_heads, self.keep_neurons, strict=True))
        after = sum(block(len(h), len(f)) for i, (h, f) in pairs if i not in self.drop_layers)
        return after / before


@register_handler(StructuredPrunePlan)
def compact(model: nn.Module, plan: StructuredPrunePlan) -> nn.Module:
    """Physically remove what ``plan`` prunes (in place on the copy ``apply_plan`` hands over)."""
    plan = plan.resolve(model)
    dh = head_size(model)
    assert plan.keep_heads is not None and plan.keep_neurons is not None
    for layer, heads, neurons in zip(encoder_layers(model), plan.keep_heads, plan.keep_neurons, strict=True):
        _set_layer_shape(layer, dh, torch.tensor(sorted(heads), dtype=torch.long),
                         torch.tensor(sorted(neurons), dtype=torch.long))
    if plan.drop_layers:
        _keep_layers(model, [i for i in range(len(plan.keep_heads)) if i not in plan.drop_layers])
    _record_shapes(model)
    return model


@register_plan
@dataclass(frozen=True)
class BalancedSparsityPlan(LayerPlan):
    """Level 2 for one linear layer: keep the ``n`` largest of every ``m`` consecutive inputs of each row.

    ``kernel``: ``"auto"`` measures dense vs CSR/BSR at ``tokens`` input rows on this machine and uses a
    sparse kernel only if it is faster; ``"dense"``, ``"csr"`` or ``"bsr"`` force one."""

    kind: ClassVar[str] = "balanced_sparsity"
    n: int = 2
    m: int = 4
    kernel: str = "auto"
    tokens: int = 4096


@register_handler(BalancedSparsityPlan)
def sparsify(module: nn.Module, plan: BalancedSparsityPlan, name: str) -> nn.Module:
    if isinstance(module, SparseLinear):
        weight = module.weight.detach() * module.mask
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        module = linear
    if not isinstance(module, nn.Linear):
        raise UserError(f"balanced sparsity applies to linear layers; '{name}' is a {type(module).__name__}")
    if plan.kernel not in ("auto", "dense", "csr", "bsr"):
        raise UserError(f"unknown kernel '{plan.kernel}' for '{name}'; use auto, dense, csr or bsr")
    mask = nm_mask(module.weight, plan.n, plan.m)
    kernel = plan.kernel
    if kernel == "auto":
        kernel = choose_kernel(module.weight.detach() * mask, plan.tokens)
    return SparseLinear(module, mask, plan.n, plan.m, kernel)


# ---------------------------------------------------------------------------------------------- gates


def _live(gate: torch.Tensor) -> torch.Tensor:
    """The gate as a graph input while gradients flow, as a constant when tracing or exporting."""
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    return gate if torch.is_grad_enabled() and not tracing else gate.data


class Gates:
    """0/1 gates on every head, FFN neuron and layer, applied by forward hooks: the masked twin.

    Gates are leaf tensors with gradients (not model parameters, so no optimiser moves them); after a
    backward pass ``.grad`` holds ``dL/dg`` for Taylor and movement scores. The hooks are traceable, so a
    gated model exports to ONNX as extra ``Mul`` nodes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.dh = head_size(model)
        shapes = layer_shapes(model)
        dtype = next(model.parameters()).dtype
        self.heads = [torch.ones(s["heads"], dtype=dtype, requires_grad=True) for s in shapes]
        self.neurons = [torch.ones(s["intermediate"], dtype=dtype, requires_grad=True) for s in shapes]
        self.layers = torch.ones(len(shapes), dtype=dtype, requires_grad=True)
        self._handles = []
        for i, layer in enumerate(encoder_layers(model)):
            self._handles.append(layer.attention.output.dense.register_forward_pre_hook(self._head_hook(i)))
            self._handles.append(layer.output.dense.register_forward_pre_hook(self._neuron_hook(i)))
            self._handles.append(layer.register_forward_hook(self._layer_hook(i)))

    def _head_hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            return (args[0] * _live(self.heads[i]).repeat_interleave(self.dh).to(args[0].dtype), *args[1:])
        return hook

    def _neuron_hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            return (args[0] * _live(self.neurons[i]).to(args[0].dtype), *args[1:])
        return hook

    def _layer_hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            x = args[0]
            out = output[0] if isinstance(output, tuple) else output
            gated = x + _live(self.layers)[i].to(x.dtype) * (out - x)  # gate 0: the block is skipped
            return (gated, *output[1:]) if isinstance(output, tuple) else gated
        return hook

    def all(self) -> list[torch.Tensor]:
        return [*self.heads, *self.neurons, self.layers]

    def zero_grad(self) -> None:
        for g in self.all():
            g.grad = None

    @torch.no_grad()
    def apply(self, plan: StructuredPrunePlan) -> None:
        """Set the gates to the plan's (explicit) keep sets."""
        plan = plan.resolve(self.model)
        assert plan.keep_heads is not None and plan.keep_neurons is not None
        for i, (h, f) in enumerate(zip(plan.keep_heads, plan.keep_neurons, strict=True)):
            self.heads[i].zero_()[list(h)] = 1
            self.neurons[i].zero_()[list(f)] = 1
            self.layers[i] = 0.0 if i in plan.drop_layers else 1.0

    def plan(self) -> StructuredPrunePlan:
        """The structured plan the current gates describe."""
        drop = tuple(i for i in range(len(self.heads)) if float(self.layers[i].detach()) == 0.0)
        return StructuredPrunePlan(
            tuple(tuple(int(j) for j in torch.nonzero(h).flatten()) for h in self.heads),
            tuple(tuple(int(j) for j in torch.nonzero(f).flatten()) for f in self.neurons), drop)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def masked_twin(model: nn.Module, plan: StructuredPrunePlan) -> tuple[nn.Module, Gates]:
    """A deep copy of ``model`` with gates set to ``plan``: same outputs as the compacted model."""
    import copy

    twin = copy.deepcopy(model)
    gates = Gates(twin)
    gates.apply(plan)
    return twin, gates


# ------------------------------------------------------------------------------------------ importance


@dataclass
class Importance:
    """Scores per layer: ``heads[i]`` (heads of layer i), ``neurons[i]`` (FFN neurons), ``layers`` (blocks)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    layers: torch.Tensor


@torch.no_grad()
def importance_magnitude(model: nn.Module) -> Importance:
    """L2 norm of each group's weights: q/k/v rows and output columns of a head; up-row and down-column of
    a neuron; a layer scores the sum of its normalised head and neuron scores."""
    dh = head_size(model)
    heads, neurons = [], []
    for layer in encoder_layers(model):
        attn = layer.attention.self
        sq = sum(getattr(attn, n).weight.float().pow(2).sum(1) for n in ("query", "key", "value"))
        sq = sq + layer.attention.output.dense.weight.float().pow(2).sum(0)
        heads.append(sq.view(-1, dh).sum(1).sqrt())
        up = layer.intermediate.dense.weight.float().pow(2).sum(1)
        neurons.append((up + layer.output.dense.weight.float().pow(2).sum(0)).sqrt())
    layers = torch.stack([h.sum() / h.norm().clamp_min(1e-12) + f.sum() / f.norm().clamp_min(1e-12)
                          for h, f in zip(heads, neurons, strict=True)])
    return Importance(heads, neurons, layers)


def importance_from_gradients(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    method: str = "taylor", gates: Gates | None = None,
) -> Importance:
    """Taylor (``|mean dL/dg|`` per batch, averaged as ``mean |dL/dg|``) or movement (``-sum dL/dg``) scores
    from gate gradients over ``batches``; ``loss_fn(model, batch)`` returns the scalar loss."""
    if method not in ("taylor", "movement"):
        raise UserError(f"gradient importance method must be 'taylor' or 'movement', got '{method}'")
    own = gates is None
    gates = gates or Gates(model)
    acc = Accumulator(gates, method)
    try:
        for batch in batches:
            gates.zero_grad()
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            acc.observe()
    finally:
        model.zero_grad(set_to_none=True)
        if own:
            gates.remove()
    return acc.importance()


class Accumulator:
    """Collects gate gradients after each backward pass into Taylor or movement scores."""

    def __init__(self, gates: Gates, method: str):
        self.gates, self.method, self.steps = gates, method, 0
        self.sums = [torch.zeros_like(g, dtype=torch.float64) for g in gates.all()]

    @torch.no_grad()
    def observe(self) -> None:
        for s, g in zip(self.sums, self.gates.all(), strict=True):
            if g.grad is not None:
                s += g.grad.double().abs() if self.method == "taylor" else -g.grad.double()
        self.steps += 1

    def importance(self) -> Importance:
        scale = 1.0 / max(1, self.steps) if self.method == "taylor" else 1.0
        parts = [s.float() * scale for s in self.sums]
        n = len(self.gates.heads)
        return Importance(parts[:n], parts[n : 2 * n], parts[2 * n])


def importance(model: nn.Module, method: str = "magnitude", batches: Iterable[dict] | None = None,
               loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> Importance:
    """Group importance by ``method`` (magnitude, taylor or movement); the gradient methods need data."""
    if method not in METHODS:
        raise UserError(f"unknown importance method '{method}'; use one of {', '.join(METHODS)}")
    if method == "magnitude":
        return importance_magnitude(model)
    if batches is None or loss_fn is None:
        raise UserError(f"importance method '{method}' needs batches and a loss function; or use 'magnitude'")
    return importance_from_gradients(model, batches, loss_fn, method)


def select_structure(
    scores: Importance, prune_heads: float, prune_ffn: float, drop_layers: int = 0,
    alive: StructuredPrunePlan | None = None,
) -> StructuredPrunePlan:
    """Keep the best groups: heads ranked globally after per-layer L2 normalisation (Michel et al. 2019),
    at least one per layer; FFN neurons ranked within each layer (equal widths keep matmuls regular);
    the ``drop_layers`` lowest-scoring layers dropped. ``alive`` restricts choices to groups not yet
    pruned, so gradual pruning only ever removes more."""
    n_layers = len(scores.heads)
    alive_h = [set(range(len(h))) for h in scores.heads] if alive is None else [set(h) for h in alive.keep_heads]
    alive_f = [set(range(len(f))) for f in scores.neurons] if alive is None else [set(f) for f in alive.keep_neurons]
    dropped = set(alive.drop_layers) if alive is not None else set()
    layer_order = sorted((i for i in range(n_layers) if i not in dropped), key=lambda i: float(scores.layers[i]))
    dropped |= set(layer_order[: max(0, drop_layers - len(dropped))])

    total_heads = sum(len(h) for h in scores.heads)
    n_remove = int(round(prune_heads * total_heads))
    candidates = []
    for i, h in enumerate(scores.heads):
        normed = h / h.norm().clamp_min(1e-12)
        candidates += [(float(normed[j]), i, j) for j in range(len(h))]
    candidates.sort()
    keep_h = [set(a) for a in alive_h]
    removed = sum(len(h) for h in scores.heads) - sum(len(k) for k in keep_h)
    for _, i, j in candidates:
        if removed >= n_remove:
            break
        if j in keep_h[i] and len(keep_h[i]) > 1:
            keep_h[i].discard(j)
            removed += 1
    keep_f = []
    for i, f in enumerate(scores.neurons):
        target = len(f) - int(round(prune_ffn * len(f)))
        live = sorted(alive_f[i], key=lambda j: -float(f[j]))
        keep_f.append(tuple(sorted(live[: max(0, target)])))
    return StructuredPrunePlan(tuple(tuple(sorted(k)) for k in keep_h), tuple(keep_f), tuple(sorted(dropped)))


# -------------------------------------------------------------------------------------------- schedule


def cubic_schedule(step: int, total_steps: int, final: float, initial: float = 0.0,
                   start: int = 0, end: int | None = None) -> float:
    """Fraction pruned at ``step``: Zhu & Gupta (2017) eq. 1,
    ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt))^3``, flat before ``start`` and after ``end``
    (default ``total_steps``)."""
    end = total_steps if end is None else end
    if end <= start:
        return final
    progress = min(1.0, max(0.0, (step - start) / (end - start)))
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualPruner:
    """Structured pruning during training: call :meth:`observe` after each backward pass and
    :meth:`update` after each optimiser step; the gates follow the cubic schedule to the targets.

    Example::

        pruner = GradualPruner(student, prune_heads=0.25, prune_ffn=0.5, total_steps=300, method="taylor")
        for step, batch in enumerate(batches):
            loss(student, batch).backward(); pruner.observe(); opt.step(); opt.zero_grad(); pruner.update(step)
        small = pruner.compact()   # a smaller dense model
    """

    def __init__(self, model: nn.Module, prune_heads: float, prune_ffn: float, total_steps: int,
                 method: str = "taylor", drop_layers: int = 0, end_fraction: float = 0.7,
                 update_every: int = 10):
        if method not in METHODS:
            raise UserError(f"unknown importance method '{method}'; use one of {', '.join(METHODS)}")
        if total_steps < 1:
            raise UserError("gradual pruning needs total_steps >= 1")
        self.model, self.method = model, method
        self.prune_heads, self.prune_ffn, self.drop_layers = prune_heads, prune_ffn, drop_layers
        self.total_steps, self.end = total_steps, max(1, int(end_fraction * total_steps))
        self.update_every = update_every
        self.gates = Gates(model)
        self.acc = Accumulator(self.gates, "movement" if method == "movement" else "taylor")

    def observe(self) -> None:
        if self.method != "magnitude":
            self.acc.observe()
        self.gates.zero_grad()

    def fraction(self, step: int) -> float:
        return cubic_schedule(step, self.total_steps, 1.0, 0.0, 0, self.end)

    def update(self, step: int) -> None:
        if step % self.update_every and step < self.end:
            return
        f = self.fraction(step)
        scores = importance_magnitude(self.model) if self.method == "magnitude" else self.acc.importance()
        layers = int(round(f * self.drop_layers))
        self.gates.apply(select_structure(scores, f * self.prune_heads, f * self.prune_ffn, layers,
                                          alive=self.gates.plan()))

    def plan(self) -> StructuredPrunePlan:
        return self.gates.plan()

    def compact(self) -> nn.Module:
        """Remove the gates and return the physically pruned model (the input model is left gated-free)."""
        from .plan import CompressionPlan, apply_plan

        plan = self.plan()
        self.gates.remove()
        return apply_plan(self.model, CompressionPlan(model_steps=[plan]))


# ------------------------------------------------------------------------------------- save and reload


def load_pruned_classifier(model_dir: str | Path) -> tuple[nn.Module, Any]:
    """Load a classifier saved after structured pruning (``save_classifier`` of the compacted model): the
    architecture is rebuilt from the per-layer shapes in ``config.json``, then the weights are loaded.
    A directory without those shapes loads as an ordinary classifier."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ..models.hf import load_classifier, load_tokenizer

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise UserError(f"{model_dir}: no config.json; save the model with fitformer.models.save_classifier")
    shapes = json.loads(config_path.read_text(encoding="utf-8")).get(SHAPES_KEY)
    if not shapes:
        return load_classifier(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForSequenceClassification.from_config(config)
    dh = head_size(model)
    for layer, s in zip(encoder_layers(model), shapes, strict=True):
        _set_layer_shape(layer, dh, torch.arange(s["heads"]), torch.arange(s["intermediate"]))
    state = load_file(str(model_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(f"{model_dir}: weights do not match the saved layer shapes (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); re-save the pruned model")
    model.eval()
    return model, load_tokenizer(model_dir)


_RECORD = struct.Struct("<HQ")  # name length, blob length


def save_hp_state(model: nn.Module, out_dir: str | Path) -> dict[str, int]:
    """Save a model with :class:`SparseLinear` layers compactly: their weights as HP records in
    ``sparse.hp`` (name, length, HP blob per layer), everything else in ``dense.safetensors``.
    Returns the byte count of each file (equal to its size on disk)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    blob = bytearray()
    for name, module in sparse.items():
        data = encode_hp(module.to_hp())
        key = name.encode("utf-8")
        blob += _RECORD.pack(len(key), len(data)) + key + data
    skip = {f"{n}.weight" for n in sparse} | {f"{n}.mask" for n in sparse}
    dense = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in skip}
    with atomic_path(out / "sparse.hp") as tmp:
        tmp.write_bytes(bytes(blob))
    with atomic_path(out / "dense.safetensors") as tmp:
        save_file(dense, str(tmp))
    return {name: (out / name).stat().st_size for name in ("sparse.hp", "dense.safetensors")}


def read_hp_archive(path: str | Path) -> dict[str, HPTensor]:
    """Name -> HP tensor from a ``sparse.hp`` file."""
    data = Path(path).read_bytes()
    out, pos = {}, 0
    while pos < len(data):
        klen, blen = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        name = data[pos : pos + klen].decode("utf-8")
        pos += klen
        out[name] = decode_hp(data[pos : pos + blen])
        pos += blen
    return out


@torch.no_grad()
def load_hp_state(model: nn.Module, out_dir: str | Path) -> nn.Module:
    """Load what :func:`save_hp_state` wrote into a model of the same structure (built by the same plan)."""
    out = Path(out_dir)
    records = read_hp_archive(out / "sparse.hp")
    state = load_file(str(out / "dense.safetensors"))
    for name, t in records.items():
        module = model.get_submodule(name)
        if not isinstance(module, SparseLinear) or (module.out_features, module.in_features) != (t.rows, t.cols):
            raise UserError(f"{out}: layer '{name}' does not match the model; build it with the same plan first")
        weight = t.to_dense().to(module.weight.dtype)
        module.weight.copy_(weight)
        module.mask.copy_(hp_mask(t))
        module._packed = None
    model.load_state_dict(state, strict=False)
    return model


def hp_mask(t: HPTensor) -> torch.Tensor:
    """The mask an HP tensor stores (its kept positions, explicit zeros included)."""
    ones = HPTensor(t.rows, t.cols, t.n, t.m, torch.ones_like(t.values), t.indices)
    return ones.to_dense().bool()


def model_sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the weights of :class:`SparseLinear` layers (0 if none)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            zeros += int((~m.mask).sum())
            total += m.mask.numel()
    return zeros / total if total else 0.0


def flops_per_token(model: nn.Module, tokens: int = 128) -> float:
    """Encoder multiply-adds per token (projections, attention products, FFN), from the weights' shapes."""
    hidden = model.config.hidden_size
    dh = head_size(model)
    return float(sum(4 * hidden * s["heads"] * dh + 2 * tokens * s["heads"] * dh + 2 * hidden * s["intermediate"]
                     for s in layer_shapes(model)))


__all__ = [
    "METHODS", "Accumulator", "BalancedSparsityPlan", "Gates", "GradualPruner", "Importance",
    "StructuredPrunePlan", "compact", "cubic_schedule", "encoder_layers", "flops_per_token", "hp_mask",
    "importance", "importance_from_gradients", "importance_magnitude", "layer_shapes", "load_hp_state",
    "load_pruned_classifier", "masked_twin", "model_sparsity", "read_hp_archive", "save_hp_state",
    "select_structure", "sparsify",
]
