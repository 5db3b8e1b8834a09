"""Quantized TT layers: 4-bit cores per bond channel, 8-bit intermediates, freezing, packed files, ONNX."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import BertForSequenceClassification

from fitformer.compress import CompressionPlan, apply_plan
from fitformer.compress.quant import QuantPlan, calibrate, freeze, quantize
from fitformer.compress.tt import TTEmbeddingPlan, TTPlan
from fitformer.errors import UserError
from fitformer.export.onnx_quant import _rebuilt_on_integers, compare_with_torch, export_quantized_onnx, ort_session
from fitformer.export.quantized import load_quantized, save_quantized
from fitformer.hardware import LinearCompression, tt_runs_dense
from fitformer.layers.planner import Planner, unfused_chain
from fitformer.layers.quant import (
    QuantLinear,
    QuantTTEmbedding,
    QuantTTLinear,
    core_channel_axis,
    quant_modules,
    round_vectors,
    vector_keys,
)
from fitformer.layers.tt import TTEmbedding, TTLinear
from fitformer.models.tiny import tiny_bert_config

SPEC = {"TTLinear": QuantPlan(4, 8), "TTEmbedding": QuantPlan(4, 8), "Linear": QuantPlan(8, 8)}


@pytest.fixture(scope="module")
def tt_classifier() -> nn.Module:
    torch.manual_seed(0)
    dense = BertForSequenceClassification(tiny_bert_config()).eval()
    plan = CompressionPlan(layers={
        "*.intermediate.dense": [TTPlan((4, 8), (8, 8), max_rank=4, num_cores=2)],
        "*.output.dense": [TTPlan((8, 8), (4, 8), max_rank=4, num_cores=2)],
        "bert.embeddings.word_embeddings": [TTEmbeddingPlan(max_rank=8, num_cores=2)],
    })
    model = apply_plan(dense, plan)
    model.fitformer_plans = [plan.to_dict()]
    return model


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 128, (4, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def _ready(model: nn.Module) -> nn.Module:
    q = quantize(model, SPEC)
    calibrate(q, [_batch(1), _batch(2)])
    return q


def test_tt_layers_get_quantized_cores_and_intermediates(tt_classifier):
    q = _ready(tt_classifier)
    layer = q.bert.encoder.layer[0].intermediate.dense
    emb = q.bert.embeddings.word_embeddings
    assert isinstance(layer, QuantTTLinear) and isinstance(layer, TTLinear)
    assert isinstance(emb, QuantTTEmbedding) and isinstance(emb, TTEmbedding)
    for tt in (layer, emb):
        d = len(tt.cores)
        for k, (core, quantizer) in enumerate(zip(tt.cores, tt.core_quant, strict=True)):
            axis = core_channel_axis(k, d)
            assert axis == (3 if k < d - 1 else 0) and core.shape[axis] > 1  # a bond, never one of size 1
            # one step size per bond channel of the core, shared along the other three axes
            assert quantizer.bits == 4
            assert quantizer.scale.shape == tuple(n if a == axis else 1 for a, n in enumerate(core.shape))
    assert layer.intermediate_quant.bits == 8 and layer.input_quant is not None
    assert emb.input_quant is None and emb.intermediate_quant.bits == 8
    # the cores forward uses are on their 4-bit grids
    for core, quantizer in zip(layer.effective_cores(), layer.core_quant, strict=True):
        codes = core.detach() / quantizer.scale.detach()
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 8
    assert not any(isinstance(m, (TTLinear, TTEmbedding)) and not isinstance(m, (QuantTTLinear, QuantTTEmbedding))
                   for m in q.modules())


def test_intermediates_pass_through_the_quantizer(tt_classifier):
    q = _ready(tt_classifier)
    layer = q.bert.encoder.layer[0].intermediate.dense
    seen = []
    handle = layer.intermediate_quant.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        layer(torch.randn(5, 32))
    handle.remove()
    assert seen
    q8 = layer.intermediate_quant
    for out in seen:
        codes = out / q8.scale + torch.round(q8.zero_point)
        assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_quantized_tt_linear_quantizes_the_same_intermediates_at_every_token_count(tt_classifier):
    """The planner's execution changes with the token count and with training (fusing cores, or rebuilding
    the weight); a quantized layer's must not, or its learned intermediate scale meets other tensors in
    evaluation and in the ONNX export than in training."""
    plain = copy.deepcopy(tt_classifier.bert.encoder.layer[0].intermediate.dense)
    plain.planner = Planner(measure=False)  # the cost model alone: no timing in a test
    layer = _ready(tt_classifier).bert.encoder.layer[0].intermediate.dense
    counts = [(tokens, training) for tokens in (1, 64, 4096) for training in (False, True)]
    assert len({plain.plan(t, tr) for t, tr in counts}) > 1  # what the pinning guards against
    assert {layer.plan(t, tr) for t, tr in counts} == {unfused_chain(layer.spec)}
    assert all(len(group) == 1 for group in unfused_chain(layer.spec).groups)
    # so each row's output does not depend on how many rows share the call
    wide = copy.deepcopy(layer).double()
    x = torch.randn(4096, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = wide(x)[:8]
        alone = torch.cat([wide(x[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(together, alone)


def test_tt_gradients_reach_cores_and_scales(tt_classifier):
    q = _ready(tt_classifier).train()
    q(**_batch(3)).logits.pow(2).sum().backward()
    layer = q.bert.encoder.layer[1].output.dense
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)
    assert all(qz.scale.grad is not None for qz in layer.core_quant)
    assert layer.intermediate_quant.scale.grad is not None
    assert all(c.grad is not None for c in q.bert.embeddings.word_embeddings.cores)


def test_tt_freeze_save_load_bit_identical(tt_classifier, tmp_path):
    q = round_vectors(_ready(tt_classifier))  # on the fp16 grid the file stores vectors on
    frozen = freeze(q)
    batch = _batch(7)
    with torch.no_grad():
        ref, got = q(**batch).logits, frozen(**batch).logits
    assert torch.equal(ref, got)
    path = tmp_path / "tt.safetensors"
    save_quantized(frozen, path)
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        codes, vectors = handle.get_tensor("__codes__"), handle.get_tensor("__vectors__")
    # the codes and the quantized layers' vectors sit in one blob each; float tensors keep their names
    assert not any("core_int" in k or k.endswith(("scale", "zero_point")) for k in keys)
    assert codes.dtype == torch.uint8 and vectors.dtype == torch.float16
    assert codes.numel() == sum(-(-getattr(m, local).numel() * q.bits // 8)  # each packed to whole bytes
                                for _, m in quant_modules(frozen) for local, q in m.int_codes().items())
    assert vectors.numel() == sum(state[k].numel() for state in [frozen.state_dict()] for k in vector_keys(frozen))
    assert "bert.encoder.layer.0.output.LayerNorm.weight" in keys
    assert not any(".cores." in k for k in keys)  # float cores are derived from the codes, not stored
    assert not any(k.endswith(".initialized") for k in keys)  # every quantizer of a frozen model is set
    loaded = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(got, loaded(**batch).logits)


def test_tt_onnx_matches(tt_classifier, tmp_path):
    frozen = freeze(_ready(tt_classifier))
    export_quantized_onnx(frozen, tmp_path / "tt.onnx")
    gap = compare_with_torch(frozen, ort_session(tmp_path / "tt.onnx", threads=1), [_batch(s) for s in range(3)])
    assert gap["max_abs_diff"] <= 1e-2 and gap["prediction_agreement"] == 1.0


def test_tt_type_in_spec_without_tt_layers_is_an_error():
    dense = BertForSequenceClassification(tiny_bert_config()).eval()
    with pytest.raises(UserError, match="no such layer"):
        quantize(dense, {"TTLinear": QuantPlan(4, 8)})


def test_tt_with_float_intermediates_runs_the_planned_execution_and_round_trips(tt_classifier, tmp_path):
    """``intermediates=False``: cores and inputs quantized, the contraction free to take the planner's path
    (what searched plans use); it freezes, saves, loads and exports like the fully quantized layer."""
    spec = {"TTLinear": QuantPlan(4, 8, intermediates=False), "TTEmbedding": QuantPlan(4, 8, intermediates=False),
            "Linear": QuantPlan(8, 8)}
    assert CompressionPlan.from_dict(CompressionPlan(layers={"x": [spec["TTLinear"]]}).to_dict()).layers["x"] == \
        [spec["TTLinear"]]
    q = quantize(tt_classifier, spec)
    calibrate(q, [_batch(1), _batch(2)])
    layer = q.bert.encoder.layer[0].intermediate.dense
    assert layer.intermediate_quant is None and layer.input_quant is not None
    assert q.bert.embeddings.word_embeddings.intermediate_quant is None
    frozen = freeze(round_vectors(q))  # on the fp16 grid the file stores vectors on
    batch = _batch(7)
    with torch.no_grad():
        assert torch.allclose(q(**batch).logits, frozen(**batch).logits, atol=1e-5)
    save_quantized(frozen, tmp_path / "tt.safetensors")
    with torch.no_grad():
        assert torch.allclose(frozen(**batch).logits, load_quantized(tmp_path / "tt.safetensors")(**batch).logits,
                              atol=1e-5)
    export_quantized_onnx(frozen, tmp_path / "tt.onnx")
    gap = compare_with_torch(frozen, ort_session(tmp_path / "tt.onnx", threads=1), [_batch(s) for s in range(3)])
    assert gap["max_abs_diff"] <= 1e-2


LOW_RANK = {"*.intermediate.dense": TTPlan((32, 1), (1, 64), max_rank=4, num_cores=2),
            "bert.encoder.layer.?.output.dense": TTPlan((64, 1), (1, 32), max_rank=4, num_cores=2)}
LOPSIDED = {"*.intermediate.dense": TTPlan((8, 2, 2), (2, 2, 16), max_rank=4, num_cores=3),
            "bert.encoder.layer.?.output.dense": TTPlan((16, 2, 2), (2, 2, 8), max_rank=4, num_cores=3)}
BALANCED = {"*.intermediate.dense": TTPlan((4, 8), (8, 8), max_rank=4, num_cores=2),  # chain > dense GEMM
            "bert.encoder.layer.?.output.dense": TTPlan((8, 8), (4, 8), max_rank=4, num_cores=2)}


@pytest.mark.parametrize("fmt", ["integer", "qdq"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shapes", [LOW_RANK, LOPSIDED, BALANCED], ids=["low_rank", "lopsided", "balanced"])
def test_quantized_tt_layers_export_on_integer_codes(tmp_path, fmt, symmetric, shapes):
    """A quantized low-rank TT ``(in, 1) x (1, out)`` with float intermediates (what the size search picks for
    most linears) exports its first GEMM on the first core's integer codes and the input's, its second in
    float; any other quantized TT (a lopsided 3-core one, whose first core would need the input transposed,
    or one whose chain costs more than the dense GEMM, as the uniform baseline's balanced shapes) exports as
    one integer GEMM on its rebuilt weight. No float quantization arithmetic and no copies are left, and all
    match PyTorch."""
    torch.manual_seed(0)
    plan = CompressionPlan(layers={k: [v] for k, v in shapes.items()})
    model = apply_plan(BertForSequenceClassification(tiny_bert_config()).eval(), plan)
    spec = {"TTLinear": QuantPlan(4, 8, symmetric=symmetric, intermediates=False), "Linear": QuantPlan(8, 8)}
    q = quantize(model, spec)
    calibrate(q, [_batch(1), _batch(2)])
    frozen = freeze(q)
    info = export_quantized_onnx(frozen, tmp_path / "tt.onnx", fmt)
    graph = onnx.load(str(tmp_path / "tt.onnx")).graph
    nodes = [n.op_type for n in graph.node]
    tt = sum(isinstance(m, QuantTTLinear) for m in frozen.modules())
    linears = sum(isinstance(m, QuantLinear) for m in frozen.modules())
    assert tt == 2 * frozen.config.num_hidden_layers
    assert info["layers"] == linears + tt
    assert "Round" not in nodes  # no input quantization in float arithmetic
    if fmt == "integer":
        assert nodes.count("MatMulIntegerToFloat") == info["layers"]
    tt_ops = {n.op_type for n in graph.node if "intermediate" in n.name or "output/dense" in n.name}
    assert "Transpose" not in tt_ops
    for m in frozen.modules():  # the cost model counts each layer as the export runs it
        if isinstance(m, QuantTTLinear):
            comp = LinearCompression(factor="tt", tt_in_modes=tuple(m.in_modes), tt_out_modes=tuple(m.out_modes),
                                     tt_ranks=tuple(m.ranks[1:-1]), bits=4)
            assert tt_runs_dense(comp) == _rebuilt_on_integers(m) == (shapes is not LOW_RANK)
    gap = compare_with_torch(frozen, ort_session(tmp_path / "tt.onnx", threads=1), [_batch(s) for s in range(3)])
    assert gap["max_abs_diff"] <= 1e-2 and gap["prediction_agreement"] == 1.0
