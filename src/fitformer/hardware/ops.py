"""The neutral operator IR that every cost model reads, and its front ends.

A model (or a compression candidate) is lowered to a flat list of :class:`Op` — GEMMs, batched GEMMs,
softmax, layer norm, element-wise work, embedding gathers — each carrying its shape, operand precision,
weight sparsity and the bytes of parameters it reads. Cost models never see ``nn.Module`` s or plans.

Front ends:

* :func:`ops_from_config` — from plain numbers (an :class:`EncoderArch` plus per-layer
  :class:`LinearCompression`); microseconds per candidate, used by the search and the predictor.
* :func:`ops_from_module` — from a real ``nn.Module`` (one forward pass with hooks records shapes);
  ``nn.Linear`` becomes a GEMM, a module that defines ``cost_ops(tokens) -> list[Op]`` contributes its
  own ops, unknown parameterised leaves are counted approximately as element-wise work.
* :func:`compression_from_plan` — the one place a :class:`~fitformer.compress.CompressionPlan` is turned
  into (architecture, per-layer compression) for a given base architecture.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..layers.tensorize import runs_rebuilt

OP_KINDS = ("gemm", "bmm", "softmax", "layernorm", "elementwise", "embedding", "dispatch")
SPARSE_FORMATS = ("", "unstructured", "2:4", "block", "hp")
FEATURE_VERSION = 2
# Work per element of the vector ops, relative to one FLOP (exp-heavy softmax costs most; measured ratios on x86)
SOFTMAX_FLOPS, LAYERNORM_FLOPS, GELU_FLOPS = 10.0, 5.0, 8.0
# Container-module calls of an eager BERT classifier: per encoder layer (layer, attention, self-attention,
# self-output, intermediate, output) and per model (classifier, model, embeddings, encoder, pooler).
DISPATCH_PER_LAYER, DISPATCH_PER_MODEL = 6, 5  # bump when Op or the front ends change meaning; predictors record it


@dataclass(frozen=True)
class Op:
    """One unit of work.

    ``gemm``: ``batch`` x (``m`` x ``k``) @ (``k`` x ``n``) with a weight operand of ``k`` x ``n``.
    ``bmm``: the same with two activation operands (attention scores, context).
    ``softmax`` / ``layernorm`` / ``elementwise`` / ``embedding``: ``batch`` x ``m`` x ``n`` elements,
    ``elem_flops`` each (``k`` is unused).
    ``bits`` is the weight/operand precision the kernel computes in (32 fp32, 16 fp16/bf16, 8 int8,
    4 int4); ``sparsity`` the fraction of weights that are zero and stored in ``sparse_format``.
    ``launches`` counts the kernels (dispatches) the op stands for. ``dispatch`` ops carry no work: they
    count container-module calls of an eager runtime (``launches`` of them), costed by the calibrated
    framework overhead.
    """

    kind: str
    m: int
    n: int
    k: int = 1
    batch: int = 1
    bits: int = 32
    act_bits: int = 32
    sparsity: float = 0.0
    sparse_format: str = ""
    weight_bytes: float = 0.0
    elem_flops: float = 1.0
    launches: int = 1
    name: str = ""
    tag: str = ""  # free-form origin label: "attention", "ffn", "tt", "lowrank", ...

    @property
    def flops(self) -> float:
        """Dense floating-point (or integer) operations, a multiply-add counting two."""
        if self.kind in ("gemm", "bmm"):
            return 2.0 * self.batch * self.m * self.n * self.k
        if self.kind == "dispatch":
            return 0.0
        return float(self.elem_flops) * self.batch * self.m * self.n

    @property
    def act_bytes(self) -> float:
        """Activation bytes read and written (weights excluded)."""
        b = self.act_bits / 8
        if self.kind == "dispatch":
            return 0.0
        if self.kind == "gemm":
            return self.batch * (self.m * self.k + self.m * self.n) * b
        if self.kind == "bmm":
            return self.batch * (self.m * self.k + self.k * self.n + self.m * self.n) * b
        return 2.0 * self.batch * self.m * self.n * b

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def weight_bytes(rows: int, cols: int, bits: int = 32, sparsity: float = 0.0, sparse_format: str = "") -> float:
    """Bytes to store a ``rows`` x ``cols`` weight: dense, or nonzeros plus index overhead per format.

    Unstructured: CSR with 32-bit column indices (+ row pointers); 2:4: 2 bits of metadata per kept value
    (NVIDIA Ampere sparse tensor cores); block / hp: one 16-bit index per 4 kept values (amortised).
    """
    dense = rows * cols * bits / 8
    if sparsity <= 0 or not sparse_format:
        return dense
    nnz = rows * cols * (1.0 - sparsity)
    if sparse_format == "unstructured":
        return nnz * (bits / 8 + 4) + (rows + 1) * 4
    if sparse_format == "2:4":
        return nnz * (bits + 2) / 8
    return nnz * bits / 8 + nnz / 4 * 2


@dataclass(frozen=True)
class LinearCompression:
    """How one linear layer is executed: factorisation, precision and weight sparsity.

    ``factor``: ``dense``; ``lowrank`` (``rank``: x @ U (in x r) @ V (r x out)); or ``tt``, a TT-matrix
    with ``tt_in_modes`` (product = in features), ``tt_out_modes`` (product = out features) and the d-1
    internal ``tt_ranks`` (Oseledets 2011; Novikov et al. 2015, eq. 5).
    """

    factor: str = "dense"
    rank: int = 0
    tt_in_modes: tuple[int, ...] = ()
    tt_out_modes: tuple[int, ...] = ()
    tt_ranks: tuple[int, ...] = ()
    bits: int = 32
    sparsity: float = 0.0
    sparse_format: str = ""

    def __post_init__(self) -> None:
        if self.factor not in ("dense", "lowrank", "tt"):
            raise UserError(f"linear factor '{self.factor}' is unknown; use dense, lowrank or tt")
        if self.factor == "lowrank" and self.rank < 1:
            raise UserError("a lowrank linear needs rank >= 1")
        if self.factor == "tt":
            d = len(self.tt_in_modes)
            if d < 2 or len(self.tt_out_modes) != d or len(self.tt_ranks) != d - 1:
                raise UserError("a tt linear needs d >= 2 input and output modes and d-1 internal ranks; "
                                f"got modes {self.tt_in_modes} / {self.tt_out_modes}, ranks {self.tt_ranks}")
        if not (2 <= self.bits <= 8 or self.bits in (16, 32)):
            raise UserError(f"bits must be 2 to 8 (integer), 16 or 32 (float), got {self.bits}")
        if not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.sparse_format not in SPARSE_FORMATS:
            raise UserError(f"sparse format '{self.sparse_format}' is unknown; use one of {SPARSE_FORMATS[1:]}")


DENSE = LinearCompression()


@dataclass(frozen=True)
class EncoderArch:
    """A BERT-style encoder in plain numbers; ``layer_heads`` / ``layer_ffn`` override per layer
    (elastic sub-networks), ``head_dim`` defaults to ``hidden // heads``."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    head_dim: int = 0
    vocab: int = 30522
    num_labels: int = 2
    layer_heads: tuple[int, ...] = ()
    layer_ffn: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "ffn"):
            if getattr(self, name) < 1:
                raise UserError(f"architecture field '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("layer_heads", "layer_ffn"):
            values = getattr(self, name)
            if values and len(values) != self.layers:
                raise UserError(f"architecture field '{name}' has {len(values)} entries for {self.layers} layers")

    @property
    def dim_head(self) -> int:
        return self.head_dim or max(1, self.hidden // self.heads)

    def heads_of(self, i: int) -> int:
        return self.layer_heads[i] if self.layer_heads else self.heads

    def ffn_of(self, i: int) -> int:
        return self.layer_ffn[i] if self.layer_ffn else self.ffn

    @classmethod
    def from_hf_config(cls, config: Any) -> EncoderArch:
        """From a Hugging Face ``BertConfig`` (or any config with the same field names)."""
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
                   ffn=config.intermediate_size, vocab=config.vocab_size,
                   num_labels=getattr(config, "num_labels", 2))


# ----------------------------------------------------------------------------------------------- linears


def tt_linear_ops(tokens: int, comp: LinearCompression, name: str = "") -> list[Op]:
    """The GEMM steps of a TT-matrix times ``tokens`` input rows, contracting cores left to right.

    Step i multiplies the running tensor, viewed as (tokens * prod(n_<i) * prod(m_>i)) x (r_{i-1} m_i),
    by core i viewed as (r_{i-1} m_i) x (n_i r_i): M = tokens * prod(n_<i) * prod(m_>i),
    K = r_{i-1} m_i, N = n_i r_i. Each step is preceded by a permutation copy that brings (m_i, r_{i-1})
    to the last axis.

    The cores are stored at ``comp.bits`` but multiplied in float: a TT layer keeps float intermediates, so
    its chain runs on dequantized cores. The exception is a chain whose first core meets the input as it is
    (input modes ``(in, 1, ..)``, the low rank): at 8 bits or fewer the ONNX export runs that first GEMM on
    integers, 8-bit input times the core's codes (``fitformer.export.onnx_quant``). A quantized layer of any
    other shape runs as the dense GEMM instead (:func:`tt_runs_dense`).
    """
    ins, outs = comp.tt_in_modes, comp.tt_out_modes
    ranks = (1, *comp.tt_ranks, 1)
    integer_first = comp.bits <= 8 and all(m == 1 for m in ins[1:])
    ops: list[Op] = []
    for i in range(len(ins)):
        m_rows = tokens * math.prod(outs[:i]) * math.prod(ins[i + 1:])
        k, n = ranks[i] * ins[i], outs[i] * ranks[i + 1]
        ops.append(Op("elementwise", m=m_rows, n=k, elem_flops=0.0, name=f"{name}.permute{i}", tag="tt"))
        ops.append(Op("gemm", m=m_rows, n=n, k=k, bits=8 if i == 0 and integer_first else 32,
                      weight_bytes=weight_bytes(k, n, comp.bits), name=f"{name}.core{i}", tag="tt"))
    return ops


def tt_runs_dense(comp: LinearCompression) -> bool:
    """Whether a TT layer runs as the dense GEMM it replaces (the weight rebuilt once) rather than as its chain:
    a chain that does more arithmetic than the dense GEMM (:class:`fitformer.layers.Planner` never picks it;
    both grow with the token count, so the answer does not depend on it), or a quantized chain (8 bits or
    fewer) other than the low rank ``(in, 1, ..) x (.., out)``, which the ONNX export runs as one integer GEMM
    on its rebuilt weight (:func:`fitformer.layers.tensorize.runs_rebuilt`, the rule both share)."""
    return runs_rebuilt(comp.tt_in_modes, comp.tt_out_modes, (1, *comp.tt_ranks, 1), quantized=comp.bits <= 8)


def linear_ops(tokens: int, in_features: int, out_features: int, comp: LinearCompression = DENSE,
               name: str = "", tag: str = "") -> list[Op]:
    """The ops of one linear layer applied to ``tokens`` rows under ``comp`` (bias add folded in).

    Integer layers first quantize their input activations (one element-wise pass over it).
    """
    ops = _linear_ops(tokens, in_features, out_features, comp, name, tag)
    if comp.bits <= 8:
        ops.insert(0, Op("elementwise", m=tokens, n=in_features, elem_flops=2.0, name=f"{name}.quantize", tag=tag))
    return ops


def _linear_ops(tokens: int, in_features: int, out_features: int, comp: LinearCompression, name: str,
                tag: str) -> list[Op]:
    if comp.factor == "tt":
        if math.prod(comp.tt_in_modes) != in_features or math.prod(comp.tt_out_modes) != out_features:
            raise UserError(f"layer '{name}': TT modes {comp.tt_in_modes} x {comp.tt_out_modes} do not multiply "
                            f"to its shape {in_features} x {out_features}")
        if tt_runs_dense(comp):
            return [Op("gemm", m=tokens, n=out_features, k=in_features, bits=comp.bits,
                       weight_bytes=weight_bytes(in_features, out_features, comp.bits), name=f"{name}.dense", tag=tag)]
        return tt_linear_ops(tokens, comp, name)
    if comp.factor == "lowrank":
        r = comp.rank
        return [Op("gemm", m=tokens, n=r, k=in_features, bits=comp.bits, weight_bytes=weight_bytes(in_features, r,
                   comp.bits), name=f"{name}.u", tag="lowrank"),
                Op("gemm", m=tokens, n=out_features, k=r, bits=comp.bits,
                   weight_bytes=weight_bytes(r, out_features, comp.bits), name=f"{name}.v", tag="lowrank")]
    fmt = comp.sparse_format or ("unstructured" if comp.sparsity > 0 else "")
    return [Op("gemm", m=tokens, n=out_features, k=in_features, bits=comp.bits, sparsity=comp.sparsity,
               sparse_format=fmt, weight_bytes=weight_bytes(in_features, out_features, comp.bits, comp.sparsity, fmt),
               name=name, tag=tag)]


# ----------------------------------------------------------------------------------------------- config path


def _lookup(compression: Mapping[str, LinearCompression], name: str) -> LinearCompression:
    """First key equal to ``name`` or matching it as an fnmatch pattern (the rule of ``resolve_layers``)."""
    hit = compression.get(name)
    if hit is not None:
        return hit
    for key, comp in compression.items():
        if fnmatch.fnmatchcase(name, key):
            return comp
    return DENSE


def ops_from_config(arch: EncoderArch, compression: Mapping[str, LinearCompression] | None = None,
                    batch: int = 1, seq_len: int = 128, prefix: str = "bert.", head: bool = True) -> list[Op]:
    """Ops of a BERT-style classifier's forward pass (embeddings, encoder layers, pooler, classifier).

    Linear ops carry the module names of Hugging Face ``BertForSequenceClassification``
    (``bert.encoder.layer.3.intermediate.dense``), so ``compression`` keys are the same names or fnmatch
    patterns a ``CompressionPlan`` uses.
    """
    comp = compression or {}
    t = batch * seq_len
    h = arch.hidden
    ops: list[Op] = [
        Op("embedding", m=t, n=h, elem_flops=0.0, weight_bytes=0.0, name=f"{prefix}embeddings", launches=3),
        Op("elementwise", m=t, n=h, elem_flops=2.0, name=f"{prefix}embeddings.add", launches=2),
        Op("layernorm", m=t, n=h, elem_flops=LAYERNORM_FLOPS, weight_bytes=2 * h * 4,
           name=f"{prefix}embeddings.LayerNorm"),
        Op("dispatch", m=1, n=1, elem_flops=0.0, launches=DISPATCH_PER_MODEL if head else DISPATCH_PER_MODEL - 2,
           name=f"{prefix}dispatch"),
    ]
    for i in range(arch.layers):
        base = f"{prefix}encoder.layer.{i}"
        heads, ffn, dh = arch.heads_of(i), arch.ffn_of(i), arch.dim_head
        attn = heads * dh

        def lin(suffix: str, fin: int, fout: int, tag: str, base: str = base) -> list[Op]:
            name = f"{base}.{suffix}"
            return linear_ops(t, fin, fout, _lookup(comp, name), name=name, tag=tag)

        for proj in ("query", "key", "value"):
            ops += lin(f"attention.self.{proj}", h, attn, "attention")
        ops += [
            Op("dispatch", m=1, n=1, elem_flops=0.0, launches=DISPATCH_PER_LAYER, name=f"{base}.dispatch"),
            Op("bmm", m=seq_len, n=seq_len, k=dh, batch=batch * heads, name=f"{base}.attention.scores",
               tag="attention"),
            Op("softmax", m=batch * heads * seq_len, n=seq_len, elem_flops=SOFTMAX_FLOPS,
               name=f"{base}.attention.softmax",
               tag="attention"),
            Op("bmm", m=seq_len, n=dh, k=seq_len, batch=batch * heads, name=f"{base}.attention.context",
               tag="attention"),
        ]
        ops += lin("attention.output.dense", attn, h, "attention")
        ops += [Op("elementwise", m=t, n=h, name=f"{base}.attention.output.add", tag="attention"),
                Op("layernorm", m=t, n=h, elem_flops=LAYERNORM_FLOPS, weight_bytes=2 * h * 4,
                   name=f"{base}.attention.output.LayerNorm", tag="attention")]
        ops += lin("intermediate.dense", h, ffn, "ffn")
        ops.append(Op("elementwise", m=t, n=ffn, elem_flops=GELU_FLOPS, name=f"{base}.intermediate.gelu", tag="ffn"))
        ops += lin("output.dense", ffn, h, "ffn")
        ops += [Op("elementwise", m=t, n=h, name=f"{base}.output.add", tag="ffn"),
                Op("layernorm", m=t, n=h, elem_flops=LAYERNORM_FLOPS, weight_bytes=2 * h * 4,
                   name=f"{base}.output.LayerNorm", tag="ffn")]
    if head:
        ops += linear_ops(batch, h, h, _lookup(comp, f"{prefix}pooler.dense"), name=f"{prefix}pooler.dense")
        ops.append(Op("elementwise", m=batch, n=h, elem_flops=GELU_FLOPS, name=f"{prefix}pooler.tanh"))
        ops += linear_ops(batch, h, arch.num_labels, _lookup(comp, "classifier"), name="classifier")
    return ops


# ----------------------------------------------------------------------------------------------- module path


def _linear_comp(module: nn.Module) -> tuple[int, float]:
    """(bits, sparsity) of a linear-like module: 8 for dynamically quantized ones, zeros counted."""
    bits = 8 if "quantized" in type(module).__module__ or "Quantized" in type(module).__name__ else 32
    sparsity = 0.0
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and not callable(weight) and weight.layout == torch.strided:
        sparsity = float((weight == 0).float().mean()) if weight.numel() else 0.0
    return bits, sparsity


def ops_from_module(model: nn.Module, batch: int = 1, seq_len: int = 128,
                    example_input: Any | None = None, vocab_size: int | None = None) -> list[Op]:
    """Ops of ``model`` recorded from one forward pass on ``example_input`` (default: token ids of shape
    ``(batch, seq_len)``). Modules with ``cost_ops(tokens)`` report their own ops (children skipped)."""
    records: list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    owners: list[str] = []
    for name, module in model.named_modules():
        if hasattr(module, "cost_ops"):
            owners.append(name)

    def owned(name: str) -> bool:
        return any(name != o and (o == "" or name.startswith(o + ".")) for o in owners)

    hooks = []
    for name, module in model.named_modules():
        leaf = not any(True for _ in module.children())
        attention = hasattr(module, "attention_head_size") and hasattr(module, "num_attention_heads")
        if not owned(name) and not leaf and not hasattr(module, "cost_ops") and \
                not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
            hooks.append(module.register_forward_hook(
                lambda mod, args, out, name=name: records.append((name, None, (), ()))))
        if (leaf or attention or hasattr(module, "cost_ops")) and not owned(name):
            def hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                x = next((a for a in args if isinstance(a, torch.Tensor)), None)
                y = out[0] if isinstance(out, tuple) else out
                records.append((name, mod, tuple(x.shape) if x is not None else (),
                                tuple(y.shape) if isinstance(y, torch.Tensor) else ()))
            hooks.append(module.register_forward_hook(hook))
    if example_input is None:
        vocab = vocab_size or getattr(getattr(model, "config", None), "vocab_size", 2)
        example_input = {"input_ids": torch.randint(0, vocab, (batch, seq_len))}
    try:
        with torch.no_grad():
            model(**example_input) if isinstance(example_input, dict) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
    ops: list[Op] = []
    for name, module, in_shape, out_shape in records:
        ops += _module_ops(name, module, in_shape, out_shape)
    return ops


def as_op(op: Op | Mapping[str, Any], owner: str = "") -> Op:
    """An :class:`Op`, or one from the plain-dict steps of ``fitformer.layers`` (kind gemm / bmm / copy, batch,
    m, n, k, label): a GEMM's weight is its k x n operand, a copy is a materialising permute."""
    if isinstance(op, Op):
        return op
    kind = str(op.get("kind", "gemm"))
    b, m, n, k = (int(op.get(f, 1)) for f in ("batch", "m", "n", "k"))
    name = f"{owner}.{op['label']}" if op.get("label") else owner
    if kind == "copy":
        return Op("elementwise", m=m * n, n=1, elem_flops=0.0, name=name, tag="tt")
    if kind not in ("gemm", "bmm"):
        return Op("elementwise", m=b * m, n=n, name=name, tag="approx")
    return Op(kind, m=m, n=n, k=k, batch=b, weight_bytes=float(k * n * 4) if kind == "gemm" else 0.0, name=name,
              tag="tt")


def _module_ops(name: str, module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[Op]:
    if module is None:  # a container module's call
        return [Op("dispatch", m=1, n=1, elem_flops=0.0, name=f"{name}.dispatch")]
    rows = math.prod(in_shape[:-1]) if in_shape else 1
    if hasattr(module, "cost_ops"):
        return [as_op(op, name) for op in module.cost_ops(rows)]
    if hasattr(module, "attention_head_size") and hasattr(module, "num_attention_heads"):
        b, s = in_shape[0], in_shape[1]
        heads, dh = module.num_attention_heads, module.attention_head_size
        return [Op("bmm", m=s, n=s, k=dh, batch=b * heads, name=f"{name}.scores", tag="attention"),
                Op("softmax", m=b * heads * s, n=s, elem_flops=SOFTMAX_FLOPS, name=f"{name}.softmax",
                   tag="attention"),
                Op("bmm", m=s, n=dh, k=s, batch=b * heads, name=f"{name}.context", tag="attention")]
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        bits, sparsity = _linear_comp(module)
        fmt = "unstructured" if sparsity > 0.5 else ""
        return [Op("gemm", m=rows, n=out_f, k=in_f, bits=bits, sparsity=sparsity if fmt else 0.0, sparse_format=fmt,
                   weight_bytes=weight_bytes(in_f, out_f, bits, sparsity if fmt else 0.0, fmt), name=name)]
    elements = math.prod(out_shape[:-1]) if out_shape else rows
    width = out_shape[-1] if out_shape else (in_shape[-1] if in_shape else 1)
    if isinstance(module, nn.Embedding):
        return [Op("embedding", m=elements, n=width, elem_flops=0.0, name=name)]
    if isinstance(module, nn.LayerNorm):
        return [Op("layernorm", m=elements, n=width, elem_flops=LAYERNORM_FLOPS, weight_bytes=2 * width * 4,
                   name=name)]
    if isinstance(module, nn.Dropout) and not module.training:
        return []
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return [Op("elementwise", m=elements, n=width, weight_bytes=float(param_bytes), name=name, tag="approx")]


# ----------------------------------------------------------------------------------------------- plan path

PlanTranslator = Callable[[Any, "PlanState", str], None]
_TRANSLATORS: dict[str, PlanTranslator] = {}


@dataclass
class PlanState:
    """What a plan has said so far: the architecture and, per layer pattern, its linear compression."""

    arch: EncoderArch
    layers: dict[str, LinearCompression] = field(default_factory=dict)

    def update_layer(self, pattern: str, **changes: Any) -> None:
        self.layers[pattern] = dataclasses.replace(self.layers.get(pattern, DENSE), **changes)


def register_plan_cost(kind: str) -> Callable[[PlanTranslator], PlanTranslator]:
    """Decorator: ``fn(step, state, pattern)`` updates ``state`` for plan steps of ``kind`` (``pattern`` is
    the layer key for per-layer steps, ``""`` for model steps). Overrides the field-name default."""

    def decorate(fn: PlanTranslator) -> PlanTranslator:
        _TRANSLATORS[kind] = fn
        return fn

    return decorate


@register_plan_cost("positions")
def _positions_cost(step: Any, state: PlanState, pattern: str) -> None:
    """Dropping position rows the model never reads (``PositionTrimPlan``) changes no op: the lookup reads
    ``seq_len`` rows either way."""


_ARCH_FIELDS = {"layers": ("layers", "num_layers", "depth"), "hidden": ("hidden", "hidden_size"),
                "heads": ("heads", "num_heads"), "ffn": ("ffn", "intermediate_size", "ffn_dim"),
                "layer_heads": ("layer_heads",), "layer_ffn": ("layer_ffn",)}


def _first(step: Any, names: Iterable[str]) -> Any:
    for n in names:
        value = getattr(step, n, None)
        if value is not None:
            return value
    return None


def _default_translate(step: Any, state: PlanState, pattern: str) -> None:
    """Read the common field names of plan steps: TT (in/out modes + ranks), low rank (rank), precision
    (bits), sparsity; for model steps, architecture fields (possibly nested under ``config``/``sub``)."""
    kind = getattr(step, "kind", type(step).__name__)
    if kind == "keep":
        return
    if not pattern:
        source = _first(step, ("config", "sub", "subconfig")) or step
        changes = {}
        for fld, names in _ARCH_FIELDS.items():
            value = _first(source, names)
            if value is not None:
                changes[fld] = tuple(value) if isinstance(value, (list, tuple)) else int(value)
        if not changes:
            raise UserError(f"plan step '{kind}' has no known cost translation; "
                            "register one with fitformer.hardware.ops.register_plan_cost")
        state.arch = dataclasses.replace(state.arch, **changes)
        return
    changes: dict[str, Any] = {}
    in_modes = _first(step, ("in_modes", "input_modes", "tt_in_modes", "in_shape"))
    out_modes = _first(step, ("out_modes", "output_modes", "tt_out_modes", "out_shape"))
    ranks = _first(step, ("ranks", "tt_ranks"))
    if in_modes is not None and out_modes is not None and ranks is not None:
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) == len(in_modes) + 1:  # boundary ranks included
            ranks = ranks[1:-1]
        elif len(ranks) == 1 and len(in_modes) > 2:
            ranks = ranks * (len(in_modes) - 1)
        changes.update(factor="tt", tt_in_modes=tuple(in_modes), tt_out_modes=tuple(out_modes), tt_ranks=ranks)
    elif isinstance(getattr(step, "rank", None), int):
        changes.update(factor="lowrank", rank=step.rank)
    bits = _first(step, ("bits", "weight_bits", "w_bits"))
    if bits is not None:
        changes["bits"] = int(bits)
    sparsity = _first(step, ("sparsity", "amount"))
    if sparsity is not None:
        changes["sparsity"] = float(sparsity)
        fmt = _first(step, ("sparse_format", "format", "pattern"))
        changes["sparse_format"] = fmt if fmt in SPARSE_FORMATS and fmt else "unstructured"
    if not changes:
        raise UserError(f"plan step '{kind}' (layer '{pattern}') has no known cost translation; "
                        "register one with fitformer.hardware.ops.register_plan_cost")
    state.update_layer(pattern, **changes)


def compression_from_plan(arch: EncoderArch, plan: Any) -> tuple[EncoderArch, dict[str, LinearCompression]]:
    """(architecture, layer pattern -> compression) of ``plan`` applied to a model of architecture ``arch``."""
    state = PlanState(arch=arch)
    if plan is None:
        return arch, {}
    for step in getattr(plan, "model_steps", []):
        _TRANSLATORS.get(step.kind, _default_translate)(step, state, "")
    for pattern, steps in getattr(plan, "layers", {}).items():
        for step in steps:
            _TRANSLATORS.get(step.kind, _default_translate)(step, state, pattern)
    return state.arch, state.layers


def ops_from_plan(arch: EncoderArch, plan: Any, batch: int, seq_len: int) -> list[Op]:
    """Ops of ``plan`` applied to a BERT-style classifier of architecture ``arch``."""
    new_arch, layers = compression_from_plan(arch, plan)
    return ops_from_config(new_arch, layers, batch=batch, seq_len=seq_len)


def summarize(ops: Iterable[Op]) -> dict[str, float]:
    """Totals used as features and in reports: flops, weight and activation bytes, op and launch counts."""
    out = {"flops": 0.0, "weight_bytes": 0.0, "act_bytes": 0.0, "ops": 0, "launches": 0}
    for op in ops:
        eff = op.flops * (1.0 - op.sparsity) if op.sparse_format else op.flops
        out["flops"] += eff
        out["weight_bytes"] += op.weight_bytes
        out["act_bytes"] += op.act_bytes
        out["ops"] += 1
        out["launches"] += op.launches
    return out
