"""ONNX export of frozen quantized classifiers with integer operators, and onnxruntime sessions to run them.

The frozen model is first exported in float (every quantized weight replaced by its dequantized value);
the graph is then rewritten so each quantized layer runs on its integer codes with the learned step sizes:

- ``fmt="integer"``: ``QuantizeLinear(x) -> MatMulIntegerToFloat(x_q, W_q, s_x, s_w, zero points, bias)``,
  onnxruntime's fused u8 x s8 GEMM (VNNI/AMX where the CPU has it) that scales and adds the bias in its
  epilogue. It is a ``com.microsoft`` operator: the graph runs on onnxruntime (its optimiser does not fuse
  ``MatMulInteger -> Cast -> Mul`` with constant scales itself, and the unfused form spends as long in the
  ``Cast`` and ``Mul`` passes over the output as in the GEMM); ``fmt="qdq"`` is the portable form.
- ``fmt="qdq"``: ``QuantizeLinear -> DequantizeLinear`` on the input and ``DequantizeLinear`` on the int8
  weight around a float ``MatMul`` — standard ONNX, which onnxruntime's graph optimiser may turn into
  integer kernels itself.
- embeddings gather int8 rows and dequantize only those rows.
- a low-rank TT layer (modes ``(in, 1) x (1, out)``, float intermediates) runs its first core's GEMM as a
  quantized linear on that core's codes and its second in float (:class:`_ChainExport`); any other quantized
  TT layer with 8-bit inputs (a lopsided shape such as ``384x2x2-2x2x96``, or a chain that costs more than
  the dense GEMM) runs as an integer GEMM on its rebuilt weight re-quantized to 8 bits; other TT layers
  export through their own forward.

Quantized layers are found in the float graph by the exact bytes of their dequantized weight (as it is or
transposed), so the rewrite does not depend on the exporter's names.

The float graph is exported with eager attention (one additive mask for all layers; ``sdpa`` exports a
boolean-to-additive ``Where`` per layer and a NaN guard after every softmax, a fifth of the int8 graph's time).

Tolerance: the integer path computes ``(sum q_x q_w) * (s_x s_w)`` while PyTorch computes
``sum (q_x s_x)(q_w s_w)`` in float, so logits differ by float rounding, and an activation that lands on
a rounding boundary can move by one step; :func:`compare_with_torch` reports the gap (the tests hold the
tiny model to max |logit difference| <= 1e-2 and identical predictions).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..data.tokenize import EncodedDataset
from ..errors import UserError
from ..io import atomic_path
from ..layers.quant import QuantEmbedding, QuantLinear, QuantModule, QuantTTLinear, _QuantTT
from ..layers.tensorize import runs_rebuilt
from ..models.hf import eager_attention

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
FORMATS = ("integer", "qdq")
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators


class _Logits(nn.Module):
    """Positional (input_ids, attention_mask, token_type_ids) -> logits, for the exporter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.logits if hasattr(out, "logits") else out


def export_onnx(model: nn.Module, path: str | os.PathLike[str], seq_len: int = 16) -> Path:
    """Export a float Hugging Face classifier to ONNX (dynamic batch and sequence axes), atomically."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2))
    ids = torch.randint(0, vocab, (2, seq_len))
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes["logits"] = {0: "batch"}
    was_training = model.training
    model.eval()
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), eager_attention(model):
            warnings.simplefilter("ignore")
            torch.onnx.export(_Logits(model), example, str(tmp), input_names=list(INPUT_NAMES),
                              output_names=["logits"], dynamic_axes=axes, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
    finally:
        model.train(was_training)
    return Path(path)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


@torch.no_grad()
def dequantized_copy(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[str, QuantModule, bool]]]:
    """A float copy of a frozen model, and {digest of a dequantized weight: (name, layer, transposed)}."""
    out = copy.deepcopy(model)
    table: dict[str, tuple[str, QuantModule, bool]] = {}
    for name, m in list(out.named_modules()):
        if not isinstance(m, QuantModule):
            continue
        if not m.frozen:
            raise UserError("ONNX export needs a frozen model; call freeze(model) first")
        if _first_core_on_integers(m):
            plain, m = _chain_export(m)  # the rewrite places the QuantLinear of its first GEMM
            w = plain.first.weight
        elif _rebuilt_on_integers(m):
            plain, m = _rebuilt_export(m)  # the rewrite places the QuantLinear of the rebuilt weight
            w = plain.weight
        elif isinstance(m, _QuantTT):
            continue  # exported by its own forward: dequantized cores, intermediates as float QDQ arithmetic
        else:
            w = m.quantized_weight().detach().float()
            if isinstance(m, QuantLinear):
                plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                if m.bias is not None:
                    plain.bias.copy_(m.bias)
            elif isinstance(m, QuantEmbedding):
                plain = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
            else:
                raise UserError(f"layer '{name}' ({type(m).__name__}) has no ONNX integer export; keep it in float")
            plain.weight.copy_(w)
        if isinstance(m, QuantLinear):
            table[_digest(w.numpy().T)] = (name, m, True)
        table[_digest(w.numpy())] = (name, m, False)
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, plain)
    return out, table


def _integer_input_tt(m: nn.Module) -> bool:
    """A quantized TT-matrix linear with 8-bit inputs and float intermediates, modes matching its shape."""
    return (isinstance(m, QuantTTLinear) and m.intermediate_quant is None and m.input_quant is not None
            and m.input_quant.bits == 8 and math.prod(m.in_modes) == m.in_features
            and math.prod(m.out_modes) == m.out_features)


def _rebuilt_on_integers(m: nn.Module) -> bool:
    """Whether a frozen TT layer exports as an integer GEMM on its rebuilt weight (:func:`_rebuilt_export`):
    a quantized TT-matrix linear with 8-bit inputs and float intermediates that is not exported as the low
    rank's chain (:func:`_first_core_on_integers`): a chain that does at least the dense GEMM's arithmetic,
    such as the balanced ``6x8x8`` shapes of HEAT's uniform baseline at rank ~30, or a lopsided one such as
    ``384x2x2-2x2x96``.

    Why: through its own forward such a layer quantizes its input in float arithmetic and runs its whole
    chain in float on dequantized cores, with a transpose before each core. On the size run's uniform
    baseline at batch 32 that was 37 float GEMMs on rebuilt weights (326 ms) and 110 ms of element-wise
    quantization ops where the cost model counts one integer GEMM per layer; as integer GEMMs the model ran
    3.7x faster. On the size run's chosen model, its five lopsided rank-32 layers as integer GEMMs ran the
    model 1.20-1.34x faster at batch 32, its test accuracy unchanged (``benchmarks/bench_export.py``)."""
    return _integer_input_tt(m) and runs_rebuilt(m.in_modes, m.out_modes, m.ranks, quantized=True)


@torch.no_grad()
def _rebuilt_export(m: QuantTTLinear) -> tuple[nn.Linear, QuantLinear]:
    """The layer's rebuilt dense weight as a float linear, and the ``QuantLinear`` that the rewrite runs in its
    place: that weight re-quantized to 8 bits per output row (step sizes by the same MSE search as any weight),
    the layer's own input quantizer and bias. The 4-bit cores stay what the weights file stores; only the
    ONNX graph holds the 8-bit rebuilt weight."""
    dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    dense.weight.copy_(m.weight)
    if m.bias is not None:
        dense.bias.copy_(m.bias)
    rebuilt = QuantLinear(dense, weight_bits=8, act_bits=None, per_channel=True, symmetric=True)
    rebuilt.input_quant = copy.deepcopy(m.input_quant)
    rebuilt.freeze()
    dense.weight.copy_(rebuilt.quantized_weight())
    return dense, rebuilt


def _first_core_on_integers(m: nn.Module) -> bool:
    """Whether a frozen TT layer exports as :class:`_ChainExport`: a quantized TT-matrix linear with 8-bit
    inputs and float intermediates whose first core meets the input without a copy (every input mode after
    the first is 1, as in the low rank ``(in, 1) x (1, out)`` the size search picks for most linears), and
    whose chain does less arithmetic than the dense GEMM.

    Why not every chain: a lopsided core such as ``384x2x2`` first needs the input transposed so that its
    384-wide mode comes last, a full copy of the activation; on the size run's model, rewriting its five
    such layers as well ran no faster (257 against 248 ms at batch 32) than leaving them to their own forward.
    Such layers run as integer GEMMs on their rebuilt weights instead (:func:`_rebuilt_on_integers`)."""
    return _integer_input_tt(m) and not runs_rebuilt(m.in_modes, m.out_modes, m.ranks, quantized=True)


class _ChainExport(nn.Module):
    """A frozen TT-matrix linear with float intermediates and input modes ``(in, 1, ..)``, as the exporter
    should see it: the first core's contraction as a linear on the input (rewritten to an integer GEMM on the
    first core's codes, like a quantized linear), then one float GEMM per further core on its dequantized
    values, then the bias.

    Why: exported through its own forward, the layer quantizes its input in float arithmetic and runs every
    contraction in float. The first core is the one that meets the 8-bit input; later cores meet float
    intermediates (and the last core's step sizes are per input channel, which an integer GEMM's epilogue
    cannot apply)."""

    def __init__(self, m: QuantTTLinear, first: nn.Linear) -> None:
        super().__init__()
        self.in_modes, self.ranks = tuple(m.in_modes), tuple(m.ranks)
        self.out_features = m.out_features
        self.first = first
        for k in range(1, len(self.in_modes)):  # (r_k, i_k, o_k, r_{k+1}) as (r_k i_k) x (o_k r_{k+1})
            core = m.cores[k].detach()
            self.register_buffer(f"core{k}", core.reshape(core.shape[0] * core.shape[1], -1).clone())
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # every input mode after the first is 1, so each state is (T, o_<k, r_k) in memory: no copies
        t = self.first(x.reshape(-1, self.in_modes[0]))
        for k in range(1, len(self.in_modes)):
            t = t.reshape(-1, self.ranks[k]) @ getattr(self, f"core{k}")
        y = t.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def _chain_export(m: QuantTTLinear) -> tuple[_ChainExport, QuantLinear]:
    """The layer as :class:`_ChainExport`, and the ``QuantLinear`` holding its first core's codes, one step size
    per output column ``(o_1, r_1)`` (per bond channel, repeated over ``o_1``), and its input quantizer."""
    core, codes, quant = m.cores[0], m.core_int_0, m.core_quant[0]
    rows = core.shape[2] * core.shape[3]  # o_1 r_1 outputs of the first GEMM
    first = QuantLinear(nn.Linear(m.in_modes[0], rows, bias=False), act_bits=None)
    wq = copy.deepcopy(quant)
    for attr in ("scale", "zero_point"):
        value = getattr(wq, attr)
        if value is not None:
            full = torch.broadcast_to(value.detach(), core.shape)[0, 0]  # (o_1, r_1)
            setattr(wq, attr, nn.Parameter(full.reshape(rows, 1).clone(), requires_grad=False))
    first.weight_quant, first.input_quant = wq, copy.deepcopy(m.input_quant)
    del first.weight
    first.register_buffer("weight_int", codes.reshape(m.in_modes[0], rows).T.contiguous())
    float_first = nn.Linear(m.in_modes[0], rows, bias=False)
    float_first.weight.copy_(first.quantized_weight())
    return _ChainExport(m, float_first), first


class _Rewriter:
    """Collects the nodes and initializers that replace the float ones."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.new_inits: list[TensorProto] = []
        self.count = 0

    def const(self, base: str, array: np.ndarray) -> str:
        self.count += 1
        name = f"{base}__{self.count}"
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def tmp(self, base: str) -> str:
        self.count += 1
        return f"{base}__t{self.count}"


def _codes(m: QuantModule) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Integer codes, step sizes and integer zero points (or None) of a frozen layer's weight."""
    wq = m.weight_quant
    codes = m.weight_int.numpy()
    scale = wq.scale.detach().float().numpy()
    zero = None if wq.zero_point is None else np.round(wq.zero_point.detach().numpy()).astype(codes.dtype)
    return codes, scale, zero


def _act_params(m: QuantLinear) -> tuple[np.ndarray, np.ndarray]:
    q = m.input_quant
    assert q is not None
    if q.bits != 8:
        raise UserError(f"ONNX integer export runs 8-bit activations, this layer has {q.bits}; use act_bits=8")
    scale = np.asarray(float(q.scale.detach()), dtype=np.float32)
    if q.symmetric:
        return scale, np.asarray(0, dtype=np.int8)
    return scale, np.asarray(int(torch.round(q.zero_point.detach())), dtype=np.uint8)


def _per_channel(array: np.ndarray) -> np.ndarray:
    """A per-column step size or zero point as ONNX takes it: 1-D when it varies, a scalar otherwise."""
    return array if array.size > 1 else array.reshape(())


def _rewrite_linear(rw: _Rewriter, node: onnx.NodeProto, m: QuantLinear, fmt: str, bias: str | None) -> list:
    """Nodes computing ``node``'s output from integer codes (weight laid out K x N)."""
    codes, scale, zero = _codes(m)
    w_kn = codes.T.copy()  # (in, out)
    w_scale = rw.const("w_scale", _per_channel(scale.reshape(-1).astype(np.float32)))  # (out,) or scalar
    w_zero = None if zero is None else rw.const("w_zero", _per_channel(zero.reshape(-1)))
    a_in, out = node.input[0], node.output[0]
    w_name = rw.const(f"{m.__class__.__name__}_w", w_kn)
    if m.input_quant is not None and fmt == "integer":
        a_scale, a_zero = _act_params(m)
        s, z = rw.const("a_scale", a_scale), rw.const("a_zero", a_zero)
        xq = rw.tmp("x_q")
        mm_inputs = [xq, w_name, s, w_scale, z, w_zero or "", bias or ""]
        while not mm_inputs[-1]:  # trailing optional inputs are left out, not named empty
            mm_inputs.pop()
        return [helper.make_node("QuantizeLinear", [a_in, s, z], [xq]),
                helper.make_node("MatMulIntegerToFloat", mm_inputs, [out], domain=MS_DOMAIN)]
    y = rw.tmp(out) if bias else out
    axis_args = {"axis": 1} if scale.size > 1 else {}
    wd = rw.tmp("w_dq")
    nodes = [helper.make_node("DequantizeLinear", [w_name, w_scale] + ([w_zero] if w_zero else []), [wd],
                              **axis_args)]
    x = a_in
    if m.input_quant is not None:
        a_scale, a_zero = _act_params(m)
        s, z = rw.const("a_scale", a_scale), rw.const("a_zero", a_zero)
        xq, x = rw.tmp("x_q"), rw.tmp("x_dq")
        nodes += [helper.make_node("QuantizeLinear", [a_in, s, z], [xq]),
                  helper.make_node("DequantizeLinear", [xq, s, z], [x])]
    nodes.append(helper.make_node("MatMul", [x, wd], [y]))
    if bias:
        nodes.append(helper.make_node("Add", [y, bias], [out]))
    return nodes


def _rewrite_embedding(rw: _Rewriter, node: onnx.NodeProto, m: QuantEmbedding) -> list:
    codes, scale, zero = _codes(m)
    ids, out = node.input[1], node.output[0]
    rows, rows_f = rw.tmp("rows_q"), rw.tmp("rows_f")
    nodes = [helper.make_node("Gather", [rw.const("table_q", codes), ids], [rows]),
             helper.make_node("Cast", [rows], [rows_f], to=TensorProto.FLOAT)]
    per_row = m.weight_quant.per_channel

    def lookup(base: str, array: np.ndarray) -> str:
        if not per_row:
            return rw.const(base, array.reshape(()).astype(np.float32))
        name = rw.tmp(base)
        nodes.append(helper.make_node("Gather", [rw.const(base, array.astype(np.float32)), ids], [name]))
        return name

    value = rows_f
    if zero is not None:
        centred = rw.tmp("rows_c")
        nodes.append(helper.make_node("Sub", [rows_f, lookup("row_zero", zero)], [centred]))
        value = centred
    nodes.append(helper.make_node("Mul", [value, lookup("row_scale", scale)], [out]))
    return nodes


def rewrite_quantized(model_proto: onnx.ModelProto, table: dict[str, tuple[str, QuantModule, bool]],
                      fmt: str) -> tuple[onnx.ModelProto, list[str]]:
    """Replace float MatMul/Gemm/Gather nodes of quantized layers by integer ones; returns the layers done."""
    graph = model_proto.graph
    rw = _Rewriter(graph)
    new_nodes: list[onnx.NodeProto] = []
    done: list[str] = []
    digests: dict[str, str] = {}

    # The exporter shares equal initializers through Identity nodes; follow them.
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in rw.inits}

    def match(name: str) -> tuple[str, QuantModule, bool] | None:
        name = aliases.get(name, name)
        if name not in rw.inits:
            return None
        if name not in digests:
            digests[name] = _digest(numpy_helper.to_array(rw.inits[name]))
        return table.get(digests[name])

    folded: set[int] = set()  # bias Add nodes taken into a fused integer GEMM
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if id(node) in folded:
            continue
        weight = node.input[0] if node.op_type == "Gather" else node.input[1] if len(node.input) > 1 else ""
        hit = match(weight)
        if node.op_type == "MatMul" and hit and isinstance(hit[1], QuantLinear) and hit[2]:
            fusable = fmt == "integer" and hit[1].input_quant is not None
            add = _bias_add(node, readers, outputs, rw.inits) if fusable else None
            if add is None:
                new_nodes += _rewrite_linear(rw, node, hit[1], fmt, None)
            else:  # the GEMM writes the Add's output, bias included
                folded.add(id(add))
                bias = next(i for i in add.input if i != node.output[0])
                fused = onnx.NodeProto()
                fused.CopyFrom(node)
                fused.output[0] = add.output[0]
                new_nodes += _rewrite_linear(rw, fused, hit[1], fmt, bias)
        elif node.op_type == "Gemm" and hit and isinstance(hit[1], QuantLinear) and _plain_gemm(node, hit[2]):
            new_nodes += _rewrite_linear(rw, node, hit[1], fmt, node.input[2] if len(node.input) > 2 else None)
        elif node.op_type == "Gather" and hit and isinstance(hit[1], QuantEmbedding) and not hit[2] \
                and _axis(node) == 0:
            new_nodes += _rewrite_embedding(rw, node, hit[1])
        else:
            new_nodes.append(node)
            continue
        done.append(hit[0])
    used = {i for n in new_nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + rw.new_inits)
    if any(n.domain == MS_DOMAIN for n in new_nodes) and all(o.domain != MS_DOMAIN for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model_proto, done


def _bias_add(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]], outputs: set[str],
              inits: dict[str, TensorProto]) -> onnx.NodeProto | None:
    """The ``Add`` of a constant 1-D bias that is the only reader of ``node``'s output, if there is one."""
    out = node.output[0]
    after = readers.get(out, [])
    if len(after) != 1 or after[0].op_type != "Add" or out in outputs:
        return None
    other = [i for i in after[0].input if i != out]
    if len(other) != 1 or other[0] not in inits or len(inits[other[0]].dims) != 1:
        return None
    return after[0]


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _plain_gemm(node: onnx.NodeProto, transposed_weight: bool) -> bool:
    """A Gemm y = A W^T + C with alpha = beta = 1 and no transposed A (what a Linear exports to)."""
    attrs = {a.name: (a.f if a.type == onnx.AttributeProto.FLOAT else a.i) for a in node.attribute}
    trans_b = attrs.get("transB", 0)
    return (attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
            and trans_b == (0 if transposed_weight else 1))


def export_quantized_onnx(model: nn.Module, path: str | os.PathLike[str], fmt: str = "integer") -> dict[str, Any]:
    """Export a frozen quantized classifier to ONNX with integer operators; returns what was rewritten."""
    if fmt not in FORMATS:
        raise UserError(f"ONNX quantized format '{fmt}': use one of {', '.join(FORMATS)}")
    float_model, table = dequantized_copy(model)
    target = Path(path)
    float_path = target.with_name(target.stem + ".float.onnx")
    export_onnx(float_model, float_path)
    try:
        proto, done = rewrite_quantized(onnx.load(str(float_path)), table, fmt)
    finally:
        float_path.unlink(missing_ok=True)
    expected = {name for name, _, _ in table.values()}
    missing = sorted(expected - set(done))
    if missing:
        raise UserError(f"ONNX export could not place quantized layer(s) {missing[:3]}; keep them in float")
    onnx.checker.check_model(proto)
    with atomic_path(target) as tmp:
        onnx.save(proto, str(tmp))
    return {"path": str(target), "format": fmt, "layers": len(set(done)), "size_bytes": target.stat().st_size}


def ort_session(path: str | os.PathLike[str], threads: int = 2):
    """An onnxruntime CPU session with all graph optimisations and ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(session, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Logits of an onnxruntime session for one batch of model inputs."""
    feeds = {name: batch[name].cpu().numpy().astype(np.int64) for name in INPUT_NAMES}
    return session.run(["logits"], feeds)[0]


def ort_predict(session, data: EncodedDataset, batch_size: int = 64) -> torch.Tensor:
    """Logits for every row of ``data``, in order."""
    return torch.cat([torch.from_numpy(ort_logits(session, b)) for b in data.batches(batch_size)])


@torch.no_grad()
def compare_with_torch(model: nn.Module, session, batches) -> dict[str, float]:
    """Max and mean |logit difference| and the share of equal predictions between PyTorch and onnxruntime."""
    model.eval()
    diffs, agree, total = [], 0, 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        ref = model(**inputs)
        ref = (ref.logits if hasattr(ref, "logits") else ref).float().numpy()
        got = ort_logits(session, inputs)
        diffs.append(np.abs(ref - got).reshape(-1))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += ref.shape[0]
    d = np.concatenate(diffs)
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "prediction_agreement": agree / total}


__all__ = ["FORMATS", "compare_with_torch", "export_onnx", "export_quantized_onnx",
           "ort_logits", "ort_predict", "ort_session", "rewrite_quantized"]
