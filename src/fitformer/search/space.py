"""The joint design space: sub-network architecture x per-layer {dense, low-rank, TT} x bits x HP sparsity.

A candidate is encoded as a **gene**: a fixed-length tuple of small integers, one per decision, each an index
into that decision's list of choices (:attr:`DesignSpace.genes`). Every tuple in the box
``0 <= g[i] < cardinality[i]`` decodes to a valid :class:`CandidateSpec`, so uniform sampling, per-position
mutation and uniform crossover (HAT, Wang et al. 2020, Sec. 3.3) never produce an invalid candidate:

- decisions of layers beyond the chosen depth, and rank/shape/sparsity decisions a format does not use, are
  ignored (and zeroed by :meth:`DesignSpace.canonical`, so equal candidates have equal genes);
- a TT shape gene is taken modulo the number of tensorization shapes of the layer's *current* dimensions
  (which depend on the elastic hidden and FFN sizes); a rank is clipped to what the shape admits. The
  shapes are the most balanced ones (HEAT's choice) and, unless ``SpaceConfig.factor_shapes`` is off, the
  lopsided shape with the fewest FLOPs and the 2-core low rank ``(in, 1) x (1, out)``
  (:func:`factor_tt_shapes`).

Device constraints enter twice: the supported formats, bit widths and sparsities restrict the choice lists
(:class:`DeviceLimits`), and a cost check (weights must fit) rejects candidates at generation time
(see :class:`fitformer.search.engine.Problem`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import UserError
from ..layers.tensorize import _mode_tuples, bond_ranks, choose_tensorization, enumerate_shapes, tt_params

FORMATS = ("dense", "lowrank", "tt")
FLOAT_BITS = 32  # "not quantized"
MIN_SIDE_BITS = 4  # side weights (CandidateSpec.side_params) follow a quantized word embedding, at least 4 bits
HALF_BYTES = 2  # a quantized layer's bias, step sizes and zero points are stored at half precision
# A saved weights file beyond the values (CandidateSpec.file_bytes), fitted to a 4-bit TT MiniLM file:
INDEX_ENTRY_BYTES = 53  # one tensor's safetensors index entry beyond its name and its two data offsets
METADATA_BYTES = 800  # format tag, Hugging Face config, plans
BLOB_NAMES = ("__codes__", "__vectors__")  # a quantized file's packed codes and fp16 vectors (export.quantized)
# Linear modules of one BERT encoder layer: (name suffix, in-dimension role, out-dimension role).
LINEAR_SITES = (
    ("attention.self.query", "hidden", "attn"),
    ("attention.self.key", "hidden", "attn"),
    ("attention.self.value", "hidden", "attn"),
    ("attention.output.dense", "attn", "hidden"),
    ("intermediate.dense", "hidden", "ffn"),
    ("output.dense", "ffn", "hidden"),
)
EMBEDDING_NAME = "embeddings.word_embeddings"


@dataclass(frozen=True)
class EncoderShape:
    """What the space needs to know of a BERT-style encoder (the largest sub-network)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    prefix: str = "bert.encoder.layer"
    embedding_prefix: str = "bert"
    side_params: int = 0  # weights no site covers: position and token-type tables, pooler (see CandidateSpec)
    positions: int = 0  # rows of the position table
    dropped_positions: int = 0  # of them, the rows a candidate drops (beyond max_length; PositionTrimPlan)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def candidate_side_params(self) -> int:
        """:attr:`side_params` of a compressed candidate: without the position rows it never reads."""
        return self.side_params - self.dropped_positions * self.hidden_size

    @classmethod
    def from_config(cls, config: Any, prefix: str = "bert.encoder.layer", embedding_prefix: str = "bert",
                    max_length: int | None = None) -> EncoderShape:
        """From a Hugging Face ``BertConfig`` (or any object with the same fields); ``max_length``, the most
        tokens the model is run with, lets candidates drop the position rows beyond it."""
        h = config.hidden_size
        positions = getattr(config, "max_position_embeddings", 0)
        side = (positions + getattr(config, "type_vocab_size", 0)) * h + h * h
        dropped = max(0, positions - max_length) if max_length else 0
        return cls(num_layers=config.num_hidden_layers, hidden_size=h,
                   num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                   vocab_size=config.vocab_size, prefix=prefix, embedding_prefix=embedding_prefix, side_params=side,
                   positions=positions, dropped_positions=dropped)

    @property
    def position_rows(self) -> int:
        """The position-table rows a compressed candidate keeps."""
        return self.positions - self.dropped_positions

    def side_names(self) -> tuple[str, ...]:
        """The layers holding :attr:`side_params`."""
        return side_names(self.embedding_prefix)


def side_names(embedding_prefix: str) -> tuple[str, str, str]:
    """The side layers (see :class:`CandidateSpec`) of a BERT-style model whose embeddings and pooler sit
    under ``embedding_prefix``: position table, token-type table, pooler."""
    p = embedding_prefix
    return f"{p}.embeddings.position_embeddings", f"{p}.embeddings.token_type_embeddings", f"{p}.pooler.dense"


@dataclass(frozen=True)
class DeviceLimits:
    """What a target device supports: bit widths, HP sparsities and factorised formats it can run."""

    bits: tuple[int, ...] = (32, 8, 4)
    sparsities: tuple[float, ...] = (0.0, 0.5, 0.75)
    formats: tuple[str, ...] = FORMATS


@dataclass(frozen=True)
class SpaceConfig:
    """The choices of every dimension; ``None`` for an architecture list means "the full model only"."""

    depths: tuple[int, ...] | None = None
    hidden_sizes: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    ffn_sizes: tuple[int, ...] | None = None
    formats: tuple[str, ...] = FORMATS
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    tt_cores: int = 3
    max_tt_shapes: int = 4  # balanced tensorizations per layer
    factor_shapes: bool = True  # also the fewest-FLOP shape and the 2-core low rank (factor_tt_shapes)
    bits: tuple[int, ...] = (32, 8, 4)
    sparsities: tuple[float, ...] = (0.0, 0.5, 0.75)
    embedding: bool = True  # search the word embedding's format too

    def validate(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise UserError(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
        if not self.ranks or min(self.ranks) < 1:
            raise UserError("ranks must be a non-empty list of positive integers")
        if self.tt_cores < 2:
            raise UserError(f"tt_cores={self.tt_cores}: a TT-matrix needs at least 2 cores")
        if not self.bits or any(b not in (2, 3, 4, 5, 6, 7, 8, 16, 32) for b in self.bits):
            raise UserError(f"bits {self.bits}: use widths from 2..8, 16 or 32 (float)")
        if not self.sparsities or any(not 0.0 <= s < 1.0 for s in self.sparsities):
            raise UserError(f"sparsities {self.sparsities}: use fractions in [0, 1)")


@dataclass(frozen=True)
class ArchSpec:
    """The sub-network: depth, hidden size and, per kept layer, heads and FFN width."""

    num_layers: int
    hidden_size: int
    heads: tuple[int, ...]
    ffn: tuple[int, ...]


@dataclass(frozen=True)
class LayerSpec:
    """One weight's compression: format (+ rank / TT modes), bit width, HP sparsity."""

    name: str
    in_features: int
    out_features: int
    format: str = "dense"
    rank: int = 0
    in_modes: tuple[int, ...] = ()
    out_modes: tuple[int, ...] = ()
    bits: int = FLOAT_BITS
    sparsity: float = 0.0

    @property
    def params(self) -> int:
        """Exact stored weight count (bias excluded; non-zeros for a sparse dense weight)."""
        if self.format == "lowrank":
            return self.rank * (self.in_features + self.out_features)
        if self.format == "tt":
            return tt_params(self.in_modes, self.out_modes, tt_ranks(len(self.in_modes), self.rank,
                                                                     self.in_modes, self.out_modes))
        return round(self.in_features * self.out_features * (1.0 - self.sparsity))

    def stored_tensors(self, embedding: bool = False) -> tuple[tuple[str, ...], int]:
        """What a saved file holds for this weight: the names of its float tensors (a quantized layer's codes
        and vectors go into the file's two blobs, :mod:`fitformer.export.quantized`, and have no name), and
        the count of quantizer values (step sizes, zero points). It mirrors the modules: quantized weights
        keep one step size per output row, table row or TT bond channel
        (:func:`fitformer.layers.quant.core_channel_axis`), and a quantized linear layer's 8-bit input
        quantizer keeps a step size and a zero point. The bias is the caller's (:meth:`CandidateSpec.vector_bytes`)."""
        n, quantized = self.name, self.bits < FLOAT_BITS
        if self.format == "lowrank":
            return (f"{n}.first", f"{n}.second"), 0  # the quant handler cannot wrap a LowRankLinear yet
        if not quantized:
            if self.format == "tt":
                return tuple(f"{n}.cores.{k}" for k in range(len(self.in_modes))), 0
            return (f"{n}.weight",) + ((f"{n}.mask",) if self.sparsity else ()), 0
        if self.format == "tt":
            d = len(self.in_modes)
            ranks = tt_ranks(d, self.rank, self.in_modes, self.out_modes)
            scalars = sum(ranks[1:d]) + ranks[d - 1]  # outgoing bonds, and the last core's incoming one
        else:
            scalars = self.in_features if embedding else self.out_features
        return (), scalars + (0 if embedding else 2)


@dataclass(frozen=True)
class CandidateSpec:
    """A decoded candidate: plain data, hashable; :meth:`key` identifies equal plans.

    ``side_params`` counts the weights no site covers (position and token-type tables, pooler). They follow
    the word embedding: stored at its bit width (at least 4) when it is quantized, else in float. Without
    that, a model whose searched weights shrink 100x still carries 1.5 MB of float side tables (MiniLM-L6),
    which caps its size gain near 60x whatever the search chooses."""

    arch: ArchSpec
    layers: tuple[LayerSpec, ...]
    embedding: LayerSpec | None = None
    side_params: int = 0

    @property
    def side_bits(self) -> int:
        quantized = self.embedding is not None and self.embedding.bits < FLOAT_BITS
        return max(MIN_SIDE_BITS, self.embedding.bits) if quantized else FLOAT_BITS

    def vector_bytes(self) -> int:
        """Bytes of the vectors no weight count covers: each searched layer's bias (fp16 when the layer is
        quantized, :func:`fitformer.layers.quant.vector_keys`), the layer norms of the kept encoder layers and
        the embeddings (fp32), and the pooler's bias (fp16 with quantized side weights). Not the classifier,
        which depends on the task."""
        h = self.arch.hidden_size
        biases = sum(x.out_features * (HALF_BYTES if x.bits < FLOAT_BITS else 4) for x in self.layers)
        norms = 4 * (4 * h * self.arch.num_layers + 2 * h)
        return biases + norms + h * (HALF_BYTES if self.side_bits < FLOAT_BITS else 4)

    def rest_bytes(self, model_params: int) -> int:
        """Bytes of a float model of ``model_params`` parameters that this spec, taken as that model, does not
        count (the classifier): the pipeline adds them to every candidate's :meth:`file_bytes`."""
        return 4 * model_params - self.weight_bytes() - self.vector_bytes()

    def to_dict(self) -> dict[str, Any]:
        return {"arch": asdict(self.arch), "layers": [asdict(x) for x in self.layers],
                "embedding": None if self.embedding is None else asdict(self.embedding),
                "side_params": self.side_params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateSpec:
        arch = data["arch"]
        arch = ArchSpec(arch["num_layers"], arch["hidden_size"], tuple(arch["heads"]), tuple(arch["ffn"]))

        def layer(d: dict[str, Any]) -> LayerSpec:
            return LayerSpec(**{**d, "in_modes": tuple(d["in_modes"]), "out_modes": tuple(d["out_modes"])})

        emb = data.get("embedding")
        return cls(arch, tuple(layer(d) for d in data["layers"]), None if emb is None else layer(emb),
                   int(data.get("side_params", 0)))

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:32]

    def all_layers(self) -> tuple[LayerSpec, ...]:
        return self.layers + ((self.embedding,) if self.embedding is not None else ())

    def weight_bytes(self) -> int:
        """Bytes of the searched weights and the side weights at their bit widths (values only; sparse
        indices are the hardware model's business)."""
        searched = sum(math.ceil(x.params * x.bits / 8) for x in self.all_layers())
        return searched + math.ceil(self.side_params * self.side_bits / 8)

    def file_bytes(self) -> int:
        """The saved weights file as predicted: :meth:`weight_bytes`, :meth:`vector_bytes`, the quantizers'
        fp16 step sizes and zero points, and the safetensors index and metadata, with an entry for every
        named tensor (:meth:`stored_tensors`). Counting the weights alone predicted 52.2x for a 4-bit TT
        MiniLM file of 49.5x, when each of its 303 tensors had an index entry (58 KB)."""
        names, scalars = self.stored_tensors()
        values = self.weight_bytes() + self.vector_bytes() + HALF_BYTES * scalars
        entry = INDEX_ENTRY_BYTES + 2 * len(str(values))  # the offsets are decimal byte positions
        return values + sum(len(x) + entry for x in names) + METADATA_BYTES

    def stored_tensors(self) -> tuple[list[str], int]:
        """The names a saved file holds (:meth:`LayerSpec.stored_tensors` of every part, and the two blobs of
        a quantized model) and the count of quantizer values."""
        parts = [x.stored_tensors() for x in self.layers] + [self.unsearched_tensors()]
        if self.embedding is not None:
            parts.append(self.embedding.stored_tensors(embedding=True))
        names = [n for part in parts for n in part[0]]
        quantized = self.side_bits < FLOAT_BITS or any(x.bits < FLOAT_BITS for x in self.all_layers())
        return names + (list(BLOB_NAMES) if quantized else []), sum(p[1] for p in parts)

    def unsearched_tensors(self) -> tuple[tuple[str, ...], int]:
        """:meth:`LayerSpec.stored_tensors` of what no site covers: float layers' biases, layer norms, the side
        weights (quantized as :func:`fitformer.search.cost.spec_to_plan` does) and the classifier."""
        first = next((x.name for x in self.all_layers()), f"bert.{EMBEDDING_NAME}")
        root = first.split(".encoder.")[0] if ".encoder." in first else first.split(".embeddings.")[0]
        names = [f"{x.name}.bias" for x in self.layers if x.bits == FLOAT_BITS]
        names += [f"{x.name[:-len('dense')]}LayerNorm.{p}" for x in self.layers if x.name.endswith(".output.dense")
                  for p in ("weight", "bias")]
        names += [f"{root}.embeddings.LayerNorm.weight", f"{root}.embeddings.LayerNorm.bias",
                  "classifier.weight", "classifier.bias"]
        side = list(side_names(root))
        if not self.side_params or self.side_bits == FLOAT_BITS:
            names.append(f"{root}.pooler.dense.bias")
            return tuple(names + ([f"{x}.weight" for x in side] if self.side_params else [])), 0
        return tuple(names), self.side_params // self.arch.hidden_size + 2  # a step size per row, the pooler's input


@dataclass(frozen=True)
class Gene:
    """One decision: its name and the number of choices."""

    name: str
    choices: tuple[Any, ...]

    @property
    def cardinality(self) -> int:
        return len(self.choices)


def largest_rank_within(build: Callable[[int], CandidateSpec], limit_bytes: float, high: int) -> int:
    """The largest rank in ``1..high`` whose plan ``build(rank)`` keeps its file within ``limit_bytes`` (1 when
    none does), by bisection: a plan's size grows with its rank."""
    low = 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if build(mid).file_bytes() <= limit_bytes else (low, mid - 1)
    return low


def tt_ranks(d: int, rank: int, in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
    """Bond ranks (r_0 = r_d = 1) of a TT-matrix, each clipped to the largest rank its unfolding admits."""
    return bond_ranks(in_modes, out_modes, rank)


def _bounded_modes(low: int, d: int, cap: int, high: int, prefix: tuple[int, ...] = ()) -> Iterator[tuple[int, ...]]:
    """Every ``d``-tuple of factors in [2, cap] whose product lies in [low, high] (padded sizes, fast)."""
    done = math.prod(prefix)
    if d == 0:
        if low <= done <= high:
            yield prefix
        return
    for f in range(2, cap + 1):
        if done * f * 2 ** (d - 1) > high:
            break
        if done * f * cap ** (d - 1) >= low:
            yield from _bounded_modes(low, d - 1, cap, high, prefix + (f,))


@lru_cache(maxsize=4096)
def default_tt_shapes(in_features: int, out_features: int, d: int, limit: int) -> tuple[tuple[tuple[int, ...],
                                                                                           tuple[int, ...]], ...]:
    """Up to ``limit`` (in_modes, out_modes) tensorizations of a layer from
    :func:`fitformer.layers.tensorize.enumerate_shapes`, most balanced first (smallest largest modes), then
    least padded. A dimension that factors badly into ``d`` modes (not at all, or only with a mode over twice
    its d-th root: BERT's vocabulary 30522 = 2 x 3 x 5087) is padded by up to 10% (30522 -> 30 x 32 x 32)."""
    def balanced(p: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[int, int, tuple]:
        return max(p[0]) * max(p[1]), math.prod(p[0]) * math.prod(p[1]), p  # HEAT, Sec. 3; then padding

    def factors_well(modes: tuple[int, ...], n: int) -> bool:
        return max(modes) <= 2 * n ** (1 / d)

    shapes = enumerate_shapes(in_features, out_features, 16, num_cores=(d,), tokens=128)
    pairs = {(s.in_modes, s.out_modes) for s in shapes if min(s.in_modes + s.out_modes) >= 2}
    best = min(pairs, key=balanced) if pairs else None
    if best and factors_well(best[0], in_features) and factors_well(best[1], out_features):
        return tuple(sorted(pairs, key=balanced)[:limit])

    def modes(n: int) -> list[tuple[int, ...]]:  # per dimension: no cost model over thousands of padded sizes
        exact = list(_mode_tuples(n, d, 0.0, 2))
        if exact and factors_well(min(exact, key=max), n):
            return exact
        padded = list(_bounded_modes(n, d, int(2 * n ** (1 / d)), int(n * 1.1))) or list(_mode_tuples(n, d, 0.1, 2))
        return sorted(padded, key=lambda m: (max(m), math.prod(m), m))[:limit]

    pairs = {(i, o) for i in modes(in_features) for o in modes(out_features)}
    return tuple(sorted(pairs, key=balanced)[:limit])


@lru_cache(maxsize=4096)
def factor_tt_shapes(in_features: int, out_features: int, d: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]],
                                                                          ...]:
    """The two tensorizations a layer is offered beside the balanced ones: the ``d``-core shape with the fewest
    FLOPs (:func:`~fitformer.layers.tensorize.choose_tensorization`, lopsided, e.g. ``192x2x2-2x2x768``) and
    the 2-core low rank ``(in, 1) x (1, out)``.

    Why: at equal bytes they keep more of a pretrained weight than a balanced shape (relative TT-SVD error of
    MiniLM's first 384x1536 layer: 0.68 for low rank 64, 0.76 for ``96x2x2-2x2x384`` at rank 96, 0.84 for
    ``6x8x8-6x16x16`` at rank 32, each about 130k values), and they are the shapes whose savings become speed
    (``docs/tensorized.md``). As TT layers they are quantized like any other (a ``lowrank`` layer is not)."""
    shapes = []
    try:
        s = choose_tensorization(in_features, out_features, 32, num_cores=(d,), tokens=128)
        shapes.append((s.in_modes, s.out_modes))
    except UserError:  # the size does not factor into d modes of at least 2
        pass
    shapes.append(((in_features, 1), (1, out_features)))
    return tuple(shapes)


TTShapeFn = Callable[[int, int, int, int], Sequence[tuple[tuple[int, ...], tuple[int, ...]]]]


@dataclass
class DesignSpace:
    """Gene layout and decoding for one encoder shape, space configuration and device."""

    shape: EncoderShape
    config: SpaceConfig = field(default_factory=SpaceConfig)
    device: DeviceLimits = field(default_factory=DeviceLimits)
    tt_shapes: TTShapeFn = default_tt_shapes

    def __post_init__(self) -> None:
        self.config.validate()
        c, s = self.config, self.shape
        self.depths = c.depths or (s.num_layers,)
        self.hidden_sizes = c.hidden_sizes or (s.hidden_size,)
        self.head_counts = c.heads or (s.num_heads,)
        self.ffn_sizes = c.ffn_sizes or (s.intermediate_size,)
        if max(self.depths) > s.num_layers or max(self.hidden_sizes) > s.hidden_size or \
                max(self.head_counts) > s.num_heads or max(self.ffn_sizes) > s.intermediate_size:
            raise UserError("the architecture choices exceed the model; keep depth, hidden, heads and FFN "
                            "within the model's own sizes")
        self.formats = tuple(f for f in c.formats if f in self.device.formats) or ("dense",)
        self.bits = tuple(b for b in c.bits if b in self.device.bits)
        self.sparsities = tuple(x for x in c.sparsities if x in self.device.sparsities) or (0.0,)
        if not self.bits:
            raise UserError(f"the device supports none of the searched bit widths {c.bits}; "
                            f"it supports {self.device.bits}")
        # shape genes only matter to TT layers
        self._shape_choices = c.max_tt_shapes + (2 if c.factor_shapes else 0) if "tt" in self.formats else 1
        genes = [Gene("depth", self.depths), Gene("hidden", self.hidden_sizes)]
        for layer in range(max(self.depths)):
            genes += [Gene(f"L{layer}.heads", self.head_counts), Gene(f"L{layer}.ffn", self.ffn_sizes)]
        self._site_names: list[str] = []
        for layer in range(max(self.depths)):
            for suffix, _, _ in LINEAR_SITES:
                self._site_names.append(f"{s.prefix}.{layer}.{suffix}")
        if c.embedding:
            self._site_names.append(f"{s.embedding_prefix}.{EMBEDDING_NAME}")
        for name in self._site_names:
            genes += [Gene(f"{name}.format", self.formats), Gene(f"{name}.rank", c.ranks),
                      Gene(f"{name}.shape", tuple(range(self._shape_choices))), Gene(f"{name}.bits", self.bits),
                      Gene(f"{name}.sparsity", self.sparsities)]
        self.genes: tuple[Gene, ...] = tuple(genes)
        self.cardinalities = np.array([g.cardinality for g in genes], dtype=np.int64)
        self._arch_len = 2 + 2 * max(self.depths)

    def __len__(self) -> int:
        return len(self.genes)

    # ---- sampling and variation (always valid) ----
    def sample(self, rng: np.random.Generator) -> tuple[int, ...]:
        """A uniformly random gene."""
        return self.canonical(rng.integers(0, self.cardinalities))

    def mutate(self, genes: Sequence[int], rng: np.random.Generator, prob: float) -> tuple[int, ...]:
        """Resample each position with probability ``prob`` (HAT's mutation)."""
        g = np.asarray(genes, dtype=np.int64)
        hit = rng.random(len(g)) < prob
        g = np.where(hit, rng.integers(0, self.cardinalities), g)
        return self.canonical(g)

    def crossover(self, a: Sequence[int], b: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
        """Uniform crossover: each position from either parent with equal probability."""
        pick = rng.random(len(a)) < 0.5
        return self.canonical(np.where(pick, np.asarray(a), np.asarray(b)))

    def canonical(self, genes: Sequence[int] | np.ndarray) -> tuple[int, ...]:
        """Zero the positions that do not change the decoded candidate, so equal plans get equal genes."""
        g = [int(x) for x in genes]
        if len(g) != len(self.genes) or any(not 0 <= x < c for x, c in zip(g, self.cardinalities, strict=True)):
            raise UserError(f"gene {g} does not fit this design space ({len(self.genes)} positions)")
        depth = self.depths[g[0]]
        for layer in range(depth, max(self.depths)):
            g[2 + 2 * layer] = g[3 + 2 * layer] = 0
        for k, name in enumerate(self._site_names):
            base = self._arch_len + 5 * k
            if self._site_layer(name) >= depth:
                g[base:base + 5] = [0] * 5
                continue
            fmt = self.formats[g[base]]
            if fmt == "dense":
                g[base + 1] = g[base + 2] = 0
                if self.sparsities[g[base + 4]] > 0 and FLOAT_BITS in self.bits:
                    g[base + 3] = self.bits.index(FLOAT_BITS)  # the quant handler cannot wrap a SparseLinear yet
            else:
                g[base + 4] = 0  # HP sparsity applies to dense weights only
                if fmt == "lowrank":
                    g[base + 2] = 0
                    if FLOAT_BITS in self.bits:  # the quant handler cannot wrap a LowRankLinear yet
                        g[base + 3] = self.bits.index(FLOAT_BITS)
                else:
                    dims = self._site_dims(name, self._arch_of(g))
                    shapes = self._shapes(*dims)
                    if not shapes:  # the dimensions do not factor: fall back to low-rank when allowed
                        g[base + 2] = 0
                    else:
                        g[base + 2] %= len(shapes)
        return tuple(g)

    # ---- decoding ----
    def decode(self, genes: Sequence[int]) -> CandidateSpec:
        """The candidate a gene stands for."""
        g = self.canonical(genes)
        arch = self._arch_of(g)
        layers: list[LayerSpec] = []
        embedding = None
        for k, name in enumerate(self._site_names):
            if self._site_layer(name) >= arch.num_layers:
                continue
            base = self._arch_len + 5 * k
            fmt = self.formats[g[base]]
            in_f, out_f = self._site_dims(name, arch)
            rank = self.config.ranks[g[base + 1]] if fmt != "dense" else 0
            in_modes: tuple[int, ...] = ()
            out_modes: tuple[int, ...] = ()
            if fmt == "tt":
                shapes = self._shapes(in_f, out_f)
                if shapes:
                    in_modes, out_modes = shapes[g[base + 2]]
                    rank = max(tt_ranks(len(in_modes), rank, in_modes, out_modes))
                else:
                    fmt = "lowrank" if "lowrank" in self.formats else "dense"
            if fmt == "lowrank":
                rank = min(rank, in_f, out_f)
            if fmt == "dense":
                rank = 0
            spec = LayerSpec(name, in_f, out_f, fmt, rank, in_modes, out_modes, self.bits[g[base + 3]],
                             self.sparsities[g[base + 4]] if fmt == "dense" else 0.0)
            if name.endswith(EMBEDDING_NAME):
                embedding = spec
            else:
                layers.append(spec)
        return CandidateSpec(arch, tuple(layers), embedding, self.shape.candidate_side_params)

    def most_compressed(self) -> tuple[int, ...]:
        """The full architecture with every searched weight at its fewest bytes (format, shape, lowest rank
        and bits, highest sparsity): the small end of the front, a start that a short size search would
        otherwise not reach from the full models."""
        g = list(self.largest())
        ranks, bits = self.config.ranks, self.bits
        for k, name in enumerate(self._site_names):
            base = self._arch_len + 5 * k
            g[base + 1] = ranks.index(min(ranks))
            g[base + 3] = bits.index(min(bits))
            g[base + 4] = self.sparsities.index(max(self.sparsities))
            trials = []
            for fmt in range(len(self.formats)):
                for shape in range(self._shape_choices):
                    trial = list(g)
                    trial[base], trial[base + 2] = fmt, shape
                    site = next(x for x in self.decode(trial).all_layers() if x.name == name)
                    trials.append((math.ceil(site.params * site.bits / 8), fmt, shape))
            _, g[base], g[base + 2] = min(trials)
        return self.canonical(g)

    def largest(self) -> tuple[int, ...]:
        """The gene of the full, uncompressed model (the reference every candidate is compared with)."""
        g = [0] * len(self.genes)
        g[0] = self.depths.index(max(self.depths))
        g[1] = self.hidden_sizes.index(max(self.hidden_sizes))
        for layer in range(max(self.depths)):
            g[2 + 2 * layer] = self.head_counts.index(max(self.head_counts))
            g[3 + 2 * layer] = self.ffn_sizes.index(max(self.ffn_sizes))
        for k in range(len(self._site_names)):
            base = self._arch_len + 5 * k
            g[base] = self.formats.index("dense") if "dense" in self.formats else 0
            g[base + 3] = self.bits.index(max(self.bits))
            g[base + 4] = self.sparsities.index(min(self.sparsities))
        return self.canonical(g)

    def reference(self) -> CandidateSpec:
        """The uncompressed model — full architecture, every weight dense in float — whatever widths and
        formats are searched: what every gain is measured against."""
        spec = self.decode(self.largest())

        def dense(x: LayerSpec) -> LayerSpec:
            return replace(x, format="dense", rank=0, in_modes=(), out_modes=(), bits=FLOAT_BITS, sparsity=0.0)

        return replace(spec, layers=tuple(dense(x) for x in spec.layers),
                       embedding=None if spec.embedding is None else dense(spec.embedding),
                       side_params=self.shape.side_params)

    def full_model(self, bits: int) -> tuple[int, ...]:
        """The full architecture with every searched layer dense at ``bits``: plain quantization of the
        whole model, a strong candidate searches should start from."""
        if bits not in self.bits:
            raise UserError(f"bits {bits}: not among the searched widths {self.bits}")
        g = list(self.largest())
        for k in range(len(self._site_names)):
            g[self._arch_len + 5 * k + 3] = self.bits.index(bits)
        return self.canonical(g)

    def uniform_models(self) -> list[tuple[int, ...]]:
        """The full architecture with every searched weight in one factorised format, shape and rank at the
        lowest bit width, one gene per combination (HEAT's uniform heuristic). They spread over the size range,
        so a short search under a size limit starts near it: for a 50x smaller MiniLM (600 plans) they lowered
        the best proxy under the limit from 0.134 to 0.121."""
        low = self.bits.index(min(self.bits))
        out = []
        for f, fmt in enumerate(self.formats):
            if fmt == "dense":
                continue
            for shape in range(self._shape_choices if fmt == "tt" else 1):
                for rank in range(len(self.config.ranks)):
                    g = list(self.largest())
                    for k in range(len(self._site_names)):
                        base = self._arch_len + 5 * k
                        g[base], g[base + 1], g[base + 2], g[base + 3] = f, rank, shape, low
                    out.append(self.canonical(g))
        return list(dict.fromkeys(out))

    @property
    def site_count(self) -> int:
        """Searched weights (linear sites of the deepest sub-network, then the word embedding if searched)."""
        return len(self._site_names)

    def site_slice(self, site: int) -> slice:
        """The positions of site ``site``'s five genes (format, rank, shape, bits, sparsity)."""
        base = self._arch_len + 5 * site
        return slice(base, base + 5)

    def site_choices(self, genes: Sequence[int], site: int) -> list[tuple[int, ...]]:
        """Every distinct plan that differs from ``genes`` only in how site ``site`` is compressed (format,
        rank, shape, bits, sparsity), ``genes`` itself included; empty when the site is beyond the depth."""
        g, where, name = list(self.canonical(genes)), self.site_slice(site), self._site_names[site]
        if self._site_layer(name) >= self.depths[g[0]]:
            return []
        seen: dict[LayerSpec | None, tuple[int, ...]] = {}
        for choice in itertools.product(*(range(int(c)) for c in self.cardinalities[where])):
            g[where] = choice
            trial = self.canonical(g)
            spec = self.decode(trial)
            seen.setdefault(next((x for x in spec.all_layers() if x.name == name), None), trial)
        return list(seen.values())

    def size(self) -> float:
        """Number of distinct genes (an upper bound on distinct candidates)."""
        return float(np.prod(self.cardinalities.astype(float)))

    # ---- helpers ----
    def _arch_of(self, g: Sequence[int]) -> ArchSpec:
        depth = self.depths[g[0]]
        heads = tuple(self.head_counts[g[2 + 2 * i]] for i in range(depth))
        ffn = tuple(self.ffn_sizes[g[3 + 2 * i]] for i in range(depth))
        return ArchSpec(depth, self.hidden_sizes[g[1]], heads, ffn)

    def _site_layer(self, name: str) -> int:
        if name.endswith(EMBEDDING_NAME):
            return -1
        return int(name[len(self.shape.prefix) + 1:].split(".", 1)[0])

    def _site_dims(self, name: str, arch: ArchSpec) -> tuple[int, int]:
        if name.endswith(EMBEDDING_NAME):
            return self.shape.vocab_size, arch.hidden_size
        layer = self._site_layer(name)
        suffix = name[len(self.shape.prefix) + 1:].split(".", 1)[1]
        roles = {"hidden": arch.hidden_size, "attn": arch.heads[layer] * self.shape.head_dim,
                 "ffn": arch.ffn[layer]}
        for site, role_in, role_out in LINEAR_SITES:
            if site == suffix:
                return roles[role_in], roles[role_out]
        raise KeyError(name)  # pragma: no cover - names come from LINEAR_SITES

    def _shapes(self, in_f: int, out_f: int) -> Sequence[tuple[tuple[int, ...], tuple[int, ...]]]:
        c = self.config
        shapes = tuple(self.tt_shapes(in_f, out_f, c.tt_cores, c.max_tt_shapes))
        if c.factor_shapes:
            shapes += tuple(x for x in factor_tt_shapes(in_f, out_f, c.tt_cores) if x not in shapes)
        return shapes


def with_device(space: DesignSpace, device: DeviceLimits) -> DesignSpace:
    """The same space restricted to another device's supported choices."""
    return replace(space, device=device)
