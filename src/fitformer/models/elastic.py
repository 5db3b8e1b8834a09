"""The elastic SuperTransformer: one BERT encoder whose sub-networks share its weights (HAT, Wang et al. 2020).

A sub-network is described by a :class:`SubConfig` — depth, hidden (embedding) size, and per layer the number
of attention heads and the FFN width — and uses the *leading slices* of every weight matrix of the full
model: the first ``depth`` layers, the first ``hidden`` channels of the residual stream, the first ``heads``
heads and the first ``ffn`` neurons of each layer (HAT §3.1, "weight sharing by leading slices").

Unlike the original HAT, the heads, FFN neurons and hidden channels are first reordered by importance
(:func:`compute_importance`, :func:`reorder_`; the idea of DynaBERT, Hou et al. 2020, §3.1), so the leading
slice of every width is its most important part. Reordering is an exact permutation: the full model's outputs
do not change.

Choices fixed here (and why):

- **Head dimension is fixed** at the pretrained model's (32 for MiniLM: 384/12; 64 for BERT-base), as in HAT.
  The attention's inner width is ``heads x head_dim``, independent of the hidden size, so any head count
  goes with any hidden size. Hidden-size choices are multiples of ``head_dim`` so that the extracted model's
  Hugging Face config (``hidden_size / num_attention_heads == head_dim``) stays valid.
- **LayerNorm on a slice normalises over the active channels only** (mean and variance of the first ``hidden``
  channels, with the first ``hidden`` entries of its weight and bias). The elastic forward and :func:`extract`
  do exactly the same (the extracted model has ``LayerNorm(hidden)`` with the sliced parameters), so the
  extracted model reproduces the elastic model at that configuration.
- **Depth keeps evenly spread layers, the first and the last always among them** (``layers="spread"``, the
  default; :func:`kept_layers`): depth 2 of 6 runs layers 0 and 5, depth 5 drops layer 3. The pooler and
  classifier were trained on the last layer's output, so a shallow sub-network that keeps it starts far
  closer to the teacher (MiniLM-L6 on rotten-tomatoes, no training: 0.70 at depth 2 vs the majority class
  when keeping layers 0-1). ``layers="first"`` keeps the first ``depth`` layers, as in HAT.

:func:`extract` returns a real ``transformers.BertForSequenceClassification`` with smaller matrices (so its
latency is really lower); per-layer head counts and FFN widths may differ, which Hugging Face's
``from_pretrained`` cannot rebuild, so such models are saved with :func:`save_subnet` and loaded with
:func:`load_subnet` (the per-layer sizes live in ``config.json`` under ``fitformer_layer_sizes``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from ..errors import UserError

LAYER_SIZES_KEY = "fitformer_layer_sizes"  # config.json field: [[heads, ffn], ...] per layer


# --------------------------------------------------------------------------------------------- descriptions
@dataclass(frozen=True)
class SubConfig:
    """One sub-network: hidden size, and per layer (``len(heads)`` layers) its head count and FFN width."""

    hidden: int
    heads: tuple[int, ...]
    ffn: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "ffn", tuple(int(f) for f in self.ffn))
        if len(self.heads) != len(self.ffn):
            raise UserError(f"sub-network has {len(self.heads)} head counts but {len(self.ffn)} FFN widths; "
                            "give one of each per layer")
        if not self.heads or self.hidden < 1 or min(self.heads) < 1 or min(self.ffn) < 1:
            raise UserError(f"sub-network {self.to_dict()} needs at least one layer and positive sizes")

    @property
    def depth(self) -> int:
        return len(self.heads)

    def to_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "hidden": self.hidden, "heads": list(self.heads), "ffn": list(self.ffn)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubConfig:
        unknown = set(data) - {"depth", "hidden", "heads", "ffn"}
        if unknown:
            raise UserError(f"sub-network has unknown field(s) {sorted(unknown)}; use hidden, heads, ffn (depth)")
        try:
            sub = cls(hidden=int(data["hidden"]), heads=tuple(data["heads"]), ffn=tuple(data["ffn"]))
        except KeyError as exc:
            raise UserError(f"sub-network lacks field {exc}; give hidden, heads and ffn (per layer)") from None
        if "depth" in data and int(data["depth"]) != sub.depth:
            raise UserError(f"sub-network says depth {data['depth']} but lists {sub.depth} layers")
        return sub

    def describe(self) -> str:
        """A short human-readable label, e.g. ``L4 d256 h[8,8,6,4] f[768,...]``."""
        return f"L{self.depth} d{self.hidden} h{list(self.heads)} f{list(self.ffn)}"


@dataclass(frozen=True)
class ElasticSpace:
    """The choices of every elastic dimension; heads and FFN width are chosen per layer."""

    depth: tuple[int, ...]
    hidden: tuple[int, ...]
    heads: tuple[int, ...]
    ffn: tuple[int, ...]
    head_dim: int
    layers: str = "spread"  # which layers a shallower sub-network keeps: "spread" or "first" (kept_layers)

    def __post_init__(self) -> None:
        if self.layers not in LAYER_RULES:
            raise UserError(f"unknown depth rule layers='{self.layers}'; use one of {list(LAYER_RULES)}")

    @classmethod
    def for_config(cls, config: BertConfig) -> ElasticSpace:
        """Defaults for a pretrained BERT config: depth 2..L, heads H/3..H, FFN I/4..I, hidden D/2..D.

        For MiniLM-L6 (L=6, H=12, I=1536, D=384): depth 2..6, heads 4,6,..,12, FFN 384,768,1152,1536,
        hidden 192,256,320,384.
        """
        layers, d, h, inter = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                               config.intermediate_size)
        head_dim = d // h
        lo_h = max(1, h // 3)
        heads = sorted(set(range(lo_h, h + 1, max(1, (h - lo_h) // 4))) | {h})
        ffn = sorted({max(1, round(inter * k / 4)) for k in range(1, 5)})
        lo_d = math.ceil(d / 2 / head_dim) * head_dim
        step = max(1, round((d - lo_d) / 3 / head_dim)) * head_dim
        hidden = sorted(set(range(lo_d, d + 1, step)) | {d})
        return cls(depth=tuple(range(min(2, layers), layers + 1)), hidden=tuple(hidden), heads=tuple(heads),
                   ffn=tuple(ffn), head_dim=head_dim)

    def largest(self) -> SubConfig:
        n = max(self.depth)
        return SubConfig(max(self.hidden), (max(self.heads),) * n, (max(self.ffn),) * n)

    def smallest(self) -> SubConfig:
        n = min(self.depth)
        return SubConfig(min(self.hidden), (min(self.heads),) * n, (min(self.ffn),) * n)

    def sample(self, rng: random.Random) -> SubConfig:
        """A uniformly random sub-network (each choice independent, heads and FFN per layer)."""
        n = rng.choice(self.depth)
        return SubConfig(rng.choice(self.hidden), tuple(rng.choice(self.heads) for _ in range(n)),
                         tuple(rng.choice(self.ffn) for _ in range(n)))

    def validate(self, sub: SubConfig) -> SubConfig:
        """``sub`` if every choice is in the space; otherwise a UserError naming the first bad one."""
        checks = [("depth", sub.depth, self.depth), ("hidden", sub.hidden, self.hidden)]
        checks += [(f"heads of layer {i}", v, self.heads) for i, v in enumerate(sub.heads)]
        checks += [(f"FFN width of layer {i}", v, self.ffn) for i, v in enumerate(sub.ffn)]
        for name, value, choices in checks:
            if value not in choices:
                raise UserError(f"sub-network {name} = {value} is not in the design space; choose one of "
                                f"{list(choices)}")
        return sub

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ElasticSpace:
        """Inverse of :meth:`to_dict`; a space saved before the depth rule existed kept the first layers."""
        return cls(**{"layers": "first", **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}})


LAYER_RULES = ("spread", "first")


def kept_layers(depth: int, total: int, rule: str = "spread") -> tuple[int, ...]:
    """Indices of the ``total`` layers that a sub-network of ``depth`` layers runs, in order.

    ``"spread"``: evenly spaced from the first to the last layer (``round(k (total-1) / (depth-1))``);
    ``"first"``: layers ``0..depth-1``.
    """
    if not 1 <= depth <= total:
        raise UserError(f"depth {depth} must be between 1 and the model's {total} layers")
    if rule == "first" or depth == 1:
        return tuple(range(depth))
    if rule != "spread":
        raise UserError(f"unknown depth rule '{rule}'; use one of {list(LAYER_RULES)}")
    return tuple(round(k * (total - 1) / (depth - 1)) for k in range(depth))


# --------------------------------------------------------------------------------------------- elastic model
@dataclass
class Gates:
    """Multiplicative gates (all ones) whose gradients give first-order (Taylor) importance scores."""

    heads: list[torch.Tensor]  # per layer, (num_heads,)
    neurons: list[torch.Tensor]  # per layer, (ffn,)
    hidden: torch.Tensor  # (hidden,), applied after every LayerNorm


def _check_bert(model: nn.Module) -> BertConfig:
    config = getattr(model, "config", None)
    if not (hasattr(model, "bert") and hasattr(model, "classifier") and isinstance(config, BertConfig)):
        raise UserError(f"{type(model).__name__} is not a BERT-family sequence classifier; the elastic "
                        "SuperTransformer needs a BertForSequenceClassification")
    if config.is_decoder or getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise UserError("the elastic SuperTransformer supports encoder BERT with absolute positions only")
    if getattr(config, LAYER_SIZES_KEY, None) or model.bert.pooler is None:
        raise UserError("the elastic SuperTransformer starts from a full pretrained classifier with a pooler, "
                        "not from an extracted sub-network")
    return config


class ElasticBert(nn.Module):
    """A BertForSequenceClassification run at any :class:`SubConfig` of its design space.

    ``forward`` reads straight top to bottom (embeddings, ``depth`` layers, pooler, classifier), slicing each
    weight to the active sizes; it returns logits, so ``fitformer.train.evaluate`` works on it unchanged.
    """

    def __init__(self, model: BertForSequenceClassification, space: ElasticSpace | None = None):
        super().__init__()
        config = _check_bert(model)
        self.model = model
        self.space = space or ElasticSpace.for_config(config)
        self.head_dim = config.hidden_size // config.num_attention_heads
        if self.space.head_dim != self.head_dim:
            raise UserError(f"design space head_dim {self.space.head_dim} differs from the model's "
                            f"{self.head_dim}; build the space with ElasticSpace.for_config(model.config)")
        full = SubConfig(config.hidden_size, (config.num_attention_heads,) * config.num_hidden_layers,
                         (config.intermediate_size,) * config.num_hidden_layers)
        self.full = full
        for name, value, limit in [("depth", max(self.space.depth), full.depth),
                                   ("hidden", max(self.space.hidden), full.hidden),
                                   ("heads", max(self.space.heads), full.heads[0]),
                                   ("ffn", max(self.space.ffn), full.ffn[0])]:
            if value > limit:
                raise UserError(f"design space {name} choice {value} exceeds the model's {limit}")
        bad = [h for h in self.space.hidden if h % self.head_dim]
        if bad:
            raise UserError(f"hidden sizes {bad} are not multiples of the head dimension {self.head_dim}")
        self.active = self.space.largest()
        self.train(model.training)  # follow the wrapped model's mode (eval for a loaded classifier)

    @property
    def config(self) -> BertConfig:
        return self.model.config

    def layer_indices(self, sub: SubConfig) -> tuple[int, ...]:
        """The full model's layers that ``sub`` runs (see :func:`kept_layers`)."""
        return kept_layers(sub.depth, self.full.depth, self.space.layers)

    def set_active(self, sub: SubConfig) -> SubConfig:
        """Run later forwards at ``sub`` (validated against the design space); returns the previous one."""
        previous, self.active = self.active, self.space.validate(sub)
        return previous

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        gates: Gates | None = None,
    ) -> torch.Tensor:
        """Logits of the active sub-network."""
        sub, bert = self.active, self.model.bert
        d, hd = sub.hidden, self.head_dim
        emb = bert.embeddings
        batch, length = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(length, device=input_ids.device)
        x = (F.embedding(input_ids, emb.word_embeddings.weight[:, :d])
             + F.embedding(token_type_ids, emb.token_type_embeddings.weight[:, :d])
             + F.embedding(positions, emb.position_embeddings.weight[:, :d]))
        x = emb.dropout(self._norm(x, emb.LayerNorm, d, gates))
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].to(torch.bool)
        for i, j in enumerate(self.layer_indices(sub)):
            layer = bert.encoder.layer[j]
            att, heads, f = layer.attention, sub.heads[i], sub.ffn[i]
            inner = heads * hd
            q, k, v = (F.linear(x, lin.weight[:inner, :d], lin.bias[:inner]).view(batch, length, heads, hd)
                       .transpose(1, 2) for lin in (att.self.query, att.self.key, att.self.value))
            p = att.self.dropout.p if self.training else 0.0
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=hd ** -0.5)
            if gates is not None:
                ctx = ctx * gates.heads[i][:heads, None, None]
            ctx = ctx.transpose(1, 2).reshape(batch, length, inner)
            out = F.linear(ctx, att.output.dense.weight[:d, :inner], att.output.dense.bias[:d])
            x = self._norm(att.output.dropout(out) + x, att.output.LayerNorm, d, gates)
            h = layer.intermediate.intermediate_act_fn(
                F.linear(x, layer.intermediate.dense.weight[:f, :d], layer.intermediate.dense.bias[:f]))
            if gates is not None:
                h = h * gates.neurons[i][:f]
            out = F.linear(h, layer.output.dense.weight[:d, :f], layer.output.dense.bias[:d])
            x = self._norm(layer.output.dropout(out) + x, layer.output.LayerNorm, d, gates)
        pooler = bert.pooler.dense
        pooled = torch.tanh(F.linear(x[:, 0], pooler.weight[:d, :d], pooler.bias[:d]))
        head = self.model.classifier
        return F.linear(self.model.dropout(pooled), head.weight[:, :d], head.bias)

    @staticmethod
    def _norm(x: torch.Tensor, ln: nn.LayerNorm, d: int, gates: Gates | None) -> torch.Tensor:
        """LayerNorm over the active ``d`` channels (statistics of those channels only; see module doc)."""
        y = F.layer_norm(x, (d,), ln.weight[:d], ln.bias[:d], ln.eps)
        return y * gates.hidden[:d] if gates is not None else y


# --------------------------------------------------------------------------------------------- importance
@dataclass
class Importance:
    """Scores (higher = more important) of each layer's heads and neurons and of the hidden channels."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    hidden: torch.Tensor


def compute_importance(elastic: ElasticBert, batches: Iterable[dict[str, torch.Tensor]] | None = None) -> Importance:
    """First-order Taylor importance (Molchanov et al. 2019; for heads, Michel et al. 2019, eq. 2).

    Each score is ``|dL/dg|`` of a gate ``g = 1`` on that head, neuron or hidden channel, summed over
    ``batches`` (cross-entropy against the model's own predictions, so labels are not needed). With no
    batches the scores fall back to weight magnitudes (L2 norms of the rows/columns a unit owns).
    """
    model, full = elastic.model, elastic.full
    layers = model.bert.encoder.layer
    if batches is None:
        return _magnitude_importance(elastic)
    previous, elastic.active = elastic.active, full  # score every unit, even outside the space
    gates = Gates([torch.ones(full.heads[i], requires_grad=True) for i in range(full.depth)],
                  [torch.ones(full.ffn[i], requires_grad=True) for i in range(full.depth)],
                  torch.ones(full.hidden, requires_grad=True))
    scores = Importance([torch.zeros(full.heads[i]) for i in range(full.depth)],
                        [torch.zeros(full.ffn[i]) for i in range(full.depth)], torch.zeros(full.hidden))
    was_training = elastic.training
    elastic.eval()
    try:
        for batch in batches:
            logits = elastic(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), gates)
            loss = F.cross_entropy(logits, logits.detach().argmax(-1))
            grads = torch.autograd.grad(loss, [*gates.heads, *gates.neurons, gates.hidden])
            n = len(layers)
            for i in range(n):
                scores.heads[i] += grads[i].abs()
                scores.neurons[i] += grads[n + i].abs()
            scores.hidden += grads[-1].abs()
    finally:
        elastic.train(was_training)
        elastic.active = previous
    return scores


def _magnitude_importance(elastic: ElasticBert) -> Importance:
    bert, hd = elastic.model.bert, elastic.head_dim
    heads, neurons = [], []
    hidden = bert.embeddings.word_embeddings.weight.detach().norm(dim=0)
    for layer in bert.encoder.layer:
        wo = layer.attention.output.dense.weight.detach()
        heads.append(wo.view(wo.shape[0], -1, hd).norm(dim=(0, 2)))
        wi, wout = layer.intermediate.dense.weight.detach(), layer.output.dense.weight.detach()
        neurons.append(wi.norm(dim=1) * wout.norm(dim=0))
        hidden = hidden + layer.output.LayerNorm.weight.detach().abs()
    return Importance(heads, neurons, hidden)


def _permute_linear(lin: nn.Linear, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> None:
    w = lin.weight.data
    if out_index is not None:
        w = w.index_select(0, out_index)
        lin.bias.data = lin.bias.data.index_select(0, out_index).contiguous()
    if in_index is not None:
        w = w.index_select(1, in_index)
    lin.weight.data = w.contiguous()


def _permute_norm(ln: nn.LayerNorm, index: torch.Tensor) -> None:
    ln.weight.data = ln.weight.data.index_select(0, index).contiguous()
    ln.bias.data = ln.bias.data.index_select(0, index).contiguous()


@torch.no_grad()
def reorder_(elastic: ElasticBert, importance: Importance) -> ElasticBert:
    """Permute heads, neurons and hidden channels in place so each leading slice is the most important.

    Every permutation is applied consistently to all weights that read or write the permuted units, so the
    full model computes exactly the same function (LayerNorm statistics are permutation-invariant).
    """
    bert, hd = elastic.model.bert, elastic.head_dim
    ch = torch.argsort(importance.hidden, descending=True, stable=True)
    emb = bert.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        table.weight.data = table.weight.data.index_select(1, ch).contiguous()
    _permute_norm(emb.LayerNorm, ch)
    for i, layer in enumerate(bert.encoder.layer):
        att = layer.attention
        order = torch.argsort(importance.heads[i], descending=True, stable=True)
        cols = (order[:, None] * hd + torch.arange(hd)).reshape(-1)  # head order -> channel order
        for lin in (att.self.query, att.self.key, att.self.value):
            _permute_linear(lin, cols, ch)
        _permute_linear(att.output.dense, ch, cols)
        _permute_norm(att.output.LayerNorm, ch)
        neurons = torch.argsort(importance.neurons[i], descending=True, stable=True)
        _permute_linear(layer.intermediate.dense, neurons, ch)
        _permute_linear(layer.output.dense, ch, neurons)
        _permute_norm(layer.output.LayerNorm, ch)
    _permute_linear(bert.pooler.dense, ch, ch)  # the pooler's output shares the hidden order, sliced alike
    _permute_linear(elastic.model.classifier, None, ch)
    return elastic


def make_elastic(
    model: BertForSequenceClassification,
    space: ElasticSpace | None = None,
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
) -> ElasticBert:
    """An importance-reordered elastic copy of ``model`` (the input is not modified)."""
    elastic = ElasticBert(copy.deepcopy(model), space)
    return reorder_(elastic, compute_importance(elastic, batches))


# --------------------------------------------------------------------------------------------- extraction
def build_subnet_model(config: BertConfig) -> BertForSequenceClassification:
    """An (untrained) classifier whose layers have the sizes named in ``config.fitformer_layer_sizes``."""
    model = BertForSequenceClassification(config)
    sizes = getattr(config, LAYER_SIZES_KEY, None)
    if sizes is None:
        return model
    if len(sizes) != config.num_hidden_layers:
        raise UserError(f"config lists {len(sizes)} layer sizes for {config.num_hidden_layers} layers")
    d = config.hidden_size
    hd = d // config.num_attention_heads
    for layer, (heads, f) in zip(model.bert.encoder.layer, sizes, strict=True):
        att = layer.attention
        inner = int(heads) * hd
        att.self.query, att.self.key, att.self.value = (nn.Linear(d, inner) for _ in range(3))
        att.self.num_attention_heads, att.self.all_head_size = int(heads), inner
        att.output.dense = nn.Linear(inner, d)
        layer.intermediate.dense = nn.Linear(d, int(f))
        layer.output.dense = nn.Linear(int(f), d)
    return model


def subnet_config(elastic: ElasticBert, sub: SubConfig) -> BertConfig:
    """The Hugging Face config of the sub-network ``sub`` (per-layer sizes under ``fitformer_layer_sizes``)."""
    config = copy.deepcopy(elastic.config)
    config.hidden_size = sub.hidden
    config.num_hidden_layers = sub.depth
    config.num_attention_heads = sub.hidden // elastic.head_dim  # keeps hidden_size / heads == head_dim
    config.intermediate_size = max(sub.ffn)
    setattr(config, LAYER_SIZES_KEY, [[h, f] for h, f in zip(sub.heads, sub.ffn, strict=True)])
    return config


@torch.no_grad()
def extract(supernet: ElasticBert, sub: SubConfig) -> BertForSequenceClassification:
    """A standalone dense ``BertForSequenceClassification`` with the leading-slice weights of ``sub`` (of the
    layers :meth:`ElasticBert.layer_indices` keeps).

    Its matrices are really smaller, and it computes the same function as ``supernet`` run at ``sub``.
    """
    sub = supernet.space.validate(sub)
    d, hd = sub.hidden, supernet.head_dim
    src = supernet.model
    out = build_subnet_model(subnet_config(supernet, sub))

    def copy_linear(dst: nn.Linear, s: nn.Linear, rows: int | None, cols: int | None) -> None:
        dst.weight.copy_(s.weight[:rows, :cols])
        dst.bias.copy_(s.bias[:rows])

    def copy_norm(dst: nn.LayerNorm, s: nn.LayerNorm) -> None:
        dst.weight.copy_(s.weight[:d])
        dst.bias.copy_(s.bias[:d])

    se, de = src.bert.embeddings, out.bert.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        getattr(de, name).weight.copy_(getattr(se, name).weight[:, :d])
    copy_norm(de.LayerNorm, se.LayerNorm)
    for i, j in enumerate(supernet.layer_indices(sub)):
        s, t = src.bert.encoder.layer[j], out.bert.encoder.layer[i]
        inner, f = sub.heads[i] * hd, sub.ffn[i]
        for name in ("query", "key", "value"):
            copy_linear(getattr(t.attention.self, name), getattr(s.attention.self, name), inner, d)
        copy_linear(t.attention.output.dense, s.attention.output.dense, d, inner)
        copy_norm(t.attention.output.LayerNorm, s.attention.output.LayerNorm)
        copy_linear(t.intermediate.dense, s.intermediate.dense, f, d)
        copy_linear(t.output.dense, s.output.dense, d, f)
        copy_norm(t.output.LayerNorm, s.output.LayerNorm)
    copy_linear(out.bert.pooler.dense, src.bert.pooler.dense, d, d)
    copy_linear(out.classifier, src.classifier, None, d)
    out.eval()
    return out


# --------------------------------------------------------------------------------------------- save / load
def save_subnet(model: BertForSequenceClassification, tokenizer, out_dir: str | Path,
                meta: dict[str, Any] | None = None) -> Path:
    """Save an extracted sub-network (atomically, like ``save_classifier``); reload with :func:`load_subnet`."""
    from .hf import save_classifier

    return save_classifier(model, tokenizer, out_dir, {**(meta or {}), "subnet": True})


def load_subnet(model_dir: str | Path) -> tuple[BertForSequenceClassification, Any]:
    """Load a classifier saved by :func:`save_subnet` (per-layer sizes rebuilt from ``config.json``)."""
    from .hf import load_tokenizer

    path = Path(model_dir)
    weights = path / "model.safetensors"
    if not weights.exists():
        raise UserError(f"{path}: no model.safetensors; save the sub-network with save_subnet first")
    config = BertConfig.from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
    model = build_subnet_model(config)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids") and not k.endswith("token_type_ids")]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); re-save the sub-network with save_subnet")
    model.eval()
    return model, load_tokenizer(path)


def subnet_macs(sub: SubConfig, head_dim: int, seq_len: int = 128) -> int:
    """Multiply-accumulates of the encoder layers of ``sub`` for one sequence of ``seq_len`` tokens.

    Per layer: Q, K, V and output projections ``4 d (heads x head_dim)``, FFN ``2 d ffn`` per token, plus the
    ``2 L (heads x head_dim)`` of attention scores and context. A cheap ordering of sub-networks by cost.
    """
    total = 0
    for heads, ffn in zip(sub.heads, sub.ffn, strict=True):
        inner = heads * head_dim
        total += seq_len * (4 * sub.hidden * inner + 2 * sub.hidden * ffn + 2 * seq_len * inner)
    return total
