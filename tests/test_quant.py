"""LSQ fake quantization, quantize/freeze, packed files and ONNX integer export."""

from __future__ import annotations

import copy
import json
import math

import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import BertForSequenceClassification

from fitformer.compress import CompressionPlan, apply_plan
from fitformer.compress.quant import (
    QuantPlan,
    calibrate,
    freeze,
    quant_parameters,
    quantize,
    spec_from_dict,
    spec_to_dict,
    spec_to_layers,
)
from fitformer.errors import UserError
from fitformer.export.onnx_quant import compare_with_torch, export_quantized_onnx, ort_session
from fitformer.export.quantized import load_quantized, pack_bits, save_quantized, size_bytes, unpack_bits
from fitformer.layers.quant import (
    LSQQuantizer,
    QuantEmbedding,
    QuantLinear,
    lsq_fake_quant,
    lsq_fake_quant_reference,
    qrange,
    quant_modules,
    round_vectors,
    vector_keys,
)
from fitformer.models.tiny import tiny_bert_config


@pytest.fixture(scope="module")
def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


def _batch(n: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _ready(model: nn.Module, plan: QuantPlan) -> nn.Module:
    q = quantize(model, plan)
    calibrate(q, [_batch(seed=1), _batch(seed=2)])
    return q


# --- the quantizer --------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), seed=st.integers(0, 10_000),
       step=st.floats(1e-3, 1.0), zero=st.integers(0, 3))
def test_fake_quant_is_idempotent_on_the_grid(bits, symmetric, seed, step, zero):
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 3
    qmin, qmax = qrange(bits, symmetric)
    scale = torch.tensor(step)
    z = None if symmetric else torch.tensor(float(min(zero, qmax)))
    once = lsq_fake_quant(x, scale, z, qmin, qmax, 1.0)
    twice = lsq_fake_quant(once, scale, z, qmin, qmax, 1.0)
    assert torch.equal(once, twice)
    codes = once / scale + (0 if z is None else z)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= qmin - 1e-4 and codes.max() <= qmax + 1e-4


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_gradient_matches_finite_difference(symmetric):
    """LSQ's step-size gradient is the derivative of s * (clip(x/s) + r) with the rounding residual
    r = round(x/s) - x/s held fixed (LSQ eq. 3); check it against central differences, times g."""
    torch.manual_seed(0)
    bits = 4
    qmin, qmax = qrange(bits, symmetric)
    x = (torch.randn(200, dtype=torch.float64) * 2)
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    z = None if symmetric else torch.tensor(7.0, dtype=torch.float64)
    g = 1.0 / math.sqrt(x.numel() * qmax)
    w = torch.randn(200, dtype=torch.float64)  # a linear loss sum(w * x_hat)
    (lsq_fake_quant(x, s, z, qmin, qmax, g) * w).sum().backward()

    zr = 0.0 if z is None else float(z)
    v = x / s.detach() + zr
    residual = (v.round() - v)
    inside = (v.round() >= qmin) & (v.round() <= qmax)

    def surrogate(step: float) -> torch.Tensor:
        u = x / step + zr
        clipped = torch.where(inside, u + residual, u.round().clamp(qmin, qmax))
        return ((clipped - zr) * step * w).sum()

    eps = 1e-6
    s0 = float(s.detach())
    fd = (surrogate(s0 + eps) - surrogate(s0 - eps)) / (2 * eps)
    assert s.grad is not None
    assert torch.allclose(s.grad, fd * g, rtol=1e-5, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([((50,), ()), ((6, 40), (6, 1)), ((3, 5, 7), (1, 5, 1))]), symmetric=st.booleans(),
       bits=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_fused_fake_quant_matches_the_op_by_op_graph(shape, symmetric, bits, seed):
    """The one-node LSQ gives the values and the x, step and zero-point gradients of the composed ops,
    per tensor and per channel."""
    gen = torch.Generator().manual_seed(seed)
    x_shape, s_shape = shape
    qmin, qmax = qrange(bits, symmetric)
    x = torch.randn(x_shape, dtype=torch.float64, generator=gen) * 3
    s = torch.rand(s_shape, dtype=torch.float64, generator=gen) * 0.3 + 0.05
    z = None if symmetric else torch.randint(qmin, qmax + 1, s_shape, generator=gen).double() + 0.3
    w = torch.randn(x_shape, dtype=torch.float64, generator=gen)
    results = []
    for fake_quant in (lsq_fake_quant_reference, lsq_fake_quant):
        inputs = [t.clone().requires_grad_() for t in (x, s) + (() if z is None else (z,))]
        y = fake_quant(inputs[0], inputs[1], inputs[2] if z is not None else None, qmin, qmax, 0.37)
        (y * w).sum().backward()
        results.append([y.detach()] + [t.grad for t in inputs])
    for reference, fused in zip(*results, strict=True):
        assert fused.shape == reference.shape
        assert torch.allclose(fused, reference)


def test_straight_through_gradient_of_inputs():
    x = torch.tensor([-10.0, -0.26, 0.0, 0.74, 10.0], requires_grad=True)
    lsq_fake_quant(x, torch.tensor(0.5), None, -4, 3, 1.0).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # identity inside the range, zero when clipped


def test_per_channel_scales_and_init():
    torch.manual_seed(0)
    w = torch.randn(1, 10).repeat(6, 1) * torch.arange(1, 7).float()[:, None]
    q = LSQQuantizer(8, per_channel=True, shape=w.shape)
    q.init_from(w)
    assert q.scale.shape == (6, 1)
    assert torch.all(q.scale[1:, 0] > q.scale[:-1, 0])  # larger rows get larger steps
    assert (q(w) - w).abs().max() < 0.02 * w.abs().max()


def test_activation_quantizer_calibrates_from_batches():
    q = LSQQuantizer(8, symmetric=False, activation=True)
    q.calibrating = True
    for seed in range(3):
        q(torch.rand(4, 16, generator=torch.Generator().manual_seed(seed)) * 5 + 1)
    q.calibrating = False
    q.init_from_observed()
    assert bool(q.initialized) and 0 < float(q.scale.detach()) < 6 / 255 * 1.01
    assert int(torch.round(q.zero_point)) == 0  # all-positive data uses the whole unsigned range


def test_bad_bits_and_shapes_are_user_errors():
    with pytest.raises(UserError, match="2 to 8"):
        LSQQuantizer(9)
    with pytest.raises(UserError, match="weight_bits"):
        QuantPlan(weight_bits=1).validate()
    with pytest.raises(UserError, match="act_bits"):
        QuantPlan(act_bits=12).validate()
    with pytest.raises(UserError, match="channel axis"):
        LSQQuantizer(8, per_channel=True, shape=(16,))
    with pytest.raises(UserError, match="channel axis 3"):
        LSQQuantizer(8, per_channel=True, channel_axis=3, shape=(4, 4))


# --- quantize / freeze ----------------------------------------------------------------------------------

def test_quantize_wraps_layers_and_leaves_input_alone(tiny_classifier):
    before = {k: v.clone() for k, v in tiny_classifier.state_dict().items()}
    q = quantize(tiny_classifier, QuantPlan(4, 8))
    assert all(torch.equal(before[k], v) for k, v in tiny_classifier.state_dict().items())
    kinds = {type(m) for m in q.modules()}
    assert QuantLinear in kinds and QuantEmbedding in kinds and nn.Linear not in kinds
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in tiny_classifier.modules())


def test_spec_by_type_and_name(tiny_classifier):
    spec = {"Linear": QuantPlan(4, 8), "bert.encoder.layer.0.attention.self.query": QuantPlan(8, None),
            "classifier": None}
    layers = spec_to_layers(tiny_classifier, spec)
    assert layers["bert.encoder.layer.0.attention.self.query"].weight_bits == 8
    assert layers["bert.encoder.layer.1.output.dense"].weight_bits == 4
    assert "classifier" not in layers and "bert.embeddings.word_embeddings" not in layers
    q = quantize(tiny_classifier, spec)
    assert isinstance(q.classifier, nn.Linear) and isinstance(q.bert.embeddings.word_embeddings, nn.Embedding)
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert spec_from_dict(spec_to_dict(QuantPlan(3, 8))) == QuantPlan(3, 8)
    plan = CompressionPlan.from_dict({"layers": {"*.intermediate.dense": [{"kind": "quant", "weight_bits": 4}]}})
    assert isinstance(apply_plan(tiny_classifier, plan).bert.encoder.layer[1].intermediate.dense, QuantLinear)


def test_bad_specs_are_user_errors(tiny_classifier):
    with pytest.raises(UserError, match="matches no module"):
        quantize(tiny_classifier, {"bert.no_such_layer": QuantPlan()})
    with pytest.raises(UserError, match="cannot be quantized"):
        quantize(tiny_classifier, {"bert.embeddings.LayerNorm": QuantPlan()})
    with pytest.raises(UserError, match="already quantized"):
        quantize(quantize(tiny_classifier, QuantPlan()), QuantPlan())
    with pytest.raises(UserError, match="from 2 to 8"):
        quantize(tiny_classifier, {"Linear": {"weight_bits": 16}})
    with pytest.raises(UserError, match="no field"):
        quantize(tiny_classifier, {"Linear": {"bitz": 4}})
    with pytest.raises(UserError, match="never initialised"):
        freeze(quantize(tiny_classifier, QuantPlan()))


def test_qat_step_trains_weights_and_scales(tiny_classifier):
    q = _ready(tiny_classifier, QuantPlan(4, 8)).train()
    scales = quant_parameters(q)
    assert scales and all(p.requires_grad for p in scales)
    before = [p.detach().clone() for p in scales]
    batch = _batch(8)
    loss = nn.functional.cross_entropy(q(**batch).logits, torch.arange(8) % 2)
    loss.backward()
    assert all(p.grad is not None for p in scales)
    assert q.classifier.weight.grad is not None and q.bert.embeddings.word_embeddings.weight.grad is not None
    torch.optim.SGD(q.parameters(), lr=1e-3).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, scales, strict=True))


@pytest.mark.parametrize("plan", [QuantPlan(8, 8), QuantPlan(4, 8), QuantPlan(3, None, symmetric=False),
                                  QuantPlan(2, 8, per_channel=False)])
def test_freeze_save_load_bit_identical(tiny_classifier, plan, tmp_path):
    q = _ready(tiny_classifier, plan)
    batch = _batch(seed=5)
    rounded = freeze(q)  # its vectors (biases, norms, step sizes) rounded to fp16, as the file stores them
    assert torch.allclose(_logits(q, batch), _logits(rounded, batch), atol=1e-2)
    assert all(torch.equal(v, v.half().float()) for k, v in rounded.state_dict().items() if k in vector_keys(q))
    frozen = freeze(round_vectors(q))  # on the fp16 grid already: freezing changes nothing
    assert torch.equal(_logits(q, batch), _logits(frozen, batch))
    assert frozen.bert.encoder.layer[0].output.dense.weight_int.dtype in (torch.int8, torch.uint8)
    with pytest.raises(UserError, match="frozen"):
        save_quantized(q, tmp_path / "q.safetensors")
    off_grid = freeze(round_vectors(q))
    with torch.no_grad():
        off_grid.classifier.bias.add_(1e-7)
    with pytest.raises(UserError, match="classifier.bias is not on the fp16 grid"):
        save_quantized(off_grid, tmp_path / "off.safetensors")
    assert not (tmp_path / "off.safetensors").exists()
    n = save_quantized(frozen, tmp_path / "q.safetensors")
    assert n == size_bytes(tmp_path / "q.safetensors")
    loaded = load_quantized(tmp_path / "q.safetensors")
    assert torch.equal(_logits(frozen, batch), _logits(loaded, batch))
    with pytest.raises(UserError, match="already quantized"):
        quantize(loaded, QuantPlan())


def test_packed_blobs_are_split_by_the_structure_and_first_format_files_still_load(tiny_classifier, tmp_path):
    """The codes and vectors blobs carry no names: a blob that does not fit the rebuilt structure is refused;
    a ``fitformer-quant/1`` file (every tensor by name, a packing layout) loads to the same model."""
    import json

    from safetensors.torch import save_file

    from fitformer.export.quantized import FORMAT_V1, freeze_structure, load_into, read_quantized

    frozen = freeze(_ready(tiny_classifier, QuantPlan(4, 8)))
    save_quantized(frozen, tmp_path / "q.safetensors")
    state, _ = read_quantized(tmp_path / "q.safetensors")
    structure = freeze_structure(quantize(BertForSequenceClassification(tiny_classifier.config), QuantPlan(4, 8)))
    for blob in ("__codes__", "__vectors__"):
        with pytest.raises(UserError, match="blob sizes differ"):
            load_into(copy.deepcopy(structure), {**state, blob: state[blob][:-1]})
    batch = _batch(seed=2)
    assert torch.equal(_logits(frozen, batch), _logits(load_into(structure, state).eval(), batch))
    tensors, layout = {}, {}  # the first format, written as its writer did
    codes = {f"{n}.{local}": q for n, m in quant_modules(frozen) for local, q in m.int_codes().items()}
    for key, value in frozen.state_dict().items():
        if key in codes:
            tensors[f"{key}.packed"] = pack_bits(value, codes[key].bits, codes[key].symmetric)
            layout[key] = {"bits": codes[key].bits, "signed": codes[key].symmetric, "shape": list(value.shape)}
        elif not key.endswith("initialized"):
            tensors[key] = value.contiguous()
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={
        "format": FORMAT_V1, "layout": json.dumps(layout), "plans": json.dumps(frozen.fitformer_plans),
        "meta": "{}", "hf_config": frozen.config.to_json_string()})
    assert torch.equal(_logits(frozen, batch), _logits(load_quantized(tmp_path / "v1.safetensors"), batch))


def test_low_bit_file_is_smaller(tiny_classifier, tmp_path):
    sizes = {}
    for bits in (8, 4, 2):
        sizes[bits] = save_quantized(freeze(_ready(tiny_classifier, QuantPlan(bits, 8))), tmp_path / f"{bits}.st")
    dense = sum(p.numel() for p in tiny_classifier.parameters()) * 4
    assert sizes[2] < sizes[4] < sizes[8] < dense


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), n=st.integers(0, 97), seed=st.integers(0, 1000))
def test_pack_roundtrip(bits, signed, n, seed):
    qmin, qmax = qrange(bits, signed)
    codes = torch.randint(qmin, qmax + 1, (n,), generator=torch.Generator().manual_seed(seed))
    codes = codes.to(torch.int8 if signed else torch.uint8)
    packed = pack_bits(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, signed, (n,)), codes)


def test_int4_is_two_codes_per_byte():
    codes = torch.tensor([-8, 7, 0, -1], dtype=torch.int8)
    assert pack_bits(codes, 4, True).tolist() == [0x0F, 0x87]


# --- ONNX -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["integer", "qdq"])
@pytest.mark.parametrize("plan", [QuantPlan(8, 8), QuantPlan(4, 8, symmetric=False)])
def test_onnx_matches_fake_quant(tiny_classifier, tmp_path, fmt, plan):
    frozen = freeze(_ready(tiny_classifier, plan))
    info = export_quantized_onnx(frozen, tmp_path / "q.onnx", fmt)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert ("MatMulIntegerToFloat" in ops) == (fmt == "integer") and "QuantizeLinear" in ops
    assert "IsNaN" not in ops  # exported with eager attention: one additive mask, no NaN guard per softmax
    assert info["layers"] == sum(isinstance(m, (QuantLinear, QuantEmbedding)) for m in frozen.modules())
    session = ort_session(tmp_path / "q.onnx", threads=1)
    gap = compare_with_torch(frozen, session, [_batch(seed=s, length=10 + s) for s in range(3)])
    # a random tiny model has near-tied logits: integer kernels without VNNI (AVX2) flip one of 12 within 5e-3
    assert gap["max_abs_diff"] <= 1e-2 and gap["prediction_agreement"] >= 0.9


def test_onnx_export_rejects_unfrozen_and_low_bit_activations(tiny_classifier, tmp_path):
    with pytest.raises(UserError, match="frozen"):
        export_quantized_onnx(_ready(tiny_classifier, QuantPlan(8, 8)), tmp_path / "q.onnx")
    with pytest.raises(UserError, match="8-bit activations"):
        export_quantized_onnx(freeze(_ready(tiny_classifier, QuantPlan(8, 4))), tmp_path / "q.onnx")
    with pytest.raises(UserError, match="format"):
        export_quantized_onnx(freeze(_ready(tiny_classifier, QuantPlan(8, 8))), tmp_path / "q.onnx", "fp8")


# --- CLI ------------------------------------------------------------------------------------------------

def _cli(args, capsys):
    from fitformer.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr()


def test_cli_quantize_writes_a_packed_file(tiny_model_dir, sentiment_data, tmp_path, capsys):
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in
                                                zip(sentiment_data.texts, sentiment_data.labels, strict=True)))
    out = tmp_path / "m.safetensors"
    code, captured = _cli(["quantize", "-m", str(tiny_model_dir), "--data", str(data), "--weight-bits", "4",
                           "--calibration-batches", "1", "-o", str(out), "--json"], capsys)
    assert code == 0, captured.err
    assert json.loads(captured.out)["size_bytes"] == out.stat().st_size
    codes = load_quantized(out).bert.embeddings.word_embeddings.weight_int
    assert codes.dtype == torch.int8 and codes.min() >= -8 and codes.max() <= 7
    code, captured = _cli(["quantize", "-m", str(tiny_model_dir), "--data", str(data), "--weight-bits", "12",
                           "-o", str(out)], capsys)
    assert code == 2 and "weight_bits=12" in captured.err and "Traceback" not in captured.err
