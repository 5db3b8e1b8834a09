"""Device catalog, spec validation, operator IR, analytic energy/EDP, cost models, predictor files, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fitformer.cli import main
from fitformer.compress import CompressionPlan, Keep, LayerPlan, ModelPlan
from fitformer.errors import UserError
from fitformer.hardware import (
    AnalyticCostModel,
    AnalyticModel,
    Efficiency,
    EncoderArch,
    LinearCompression,
    Op,
    compression_from_plan,
    get_device,
    linear_ops,
    load_catalog,
    load_spec,
    ops_from_config,
    ops_from_module,
    tt_linear_ops,
    tt_runs_dense,
)
from fitformer.hardware.analytic import OP_CLASSES, op_class
from fitformer.hardware.calibrate import refine_calibration, with_efficiency
from fitformer.hardware.predictor import LatencyPredictor, fit_predictor, metrics
from fitformer.hardware.spec import CATALOG_DIR, spec_from_dict
from fitformer.models import load_classifier, tiny_bert_config

# ----------------------------------------------------------------------------------------- catalog and specs


def test_catalog_has_real_devices_from_low_to_high_end():
    catalog = load_catalog()
    assert len(catalog) >= 8
    assert {s.kind for s in catalog.values()} == {"cpu", "gpu", "edge", "fpga"}
    for spec in catalog.values():
        for _name, value in spec:
            figures = value.values() if isinstance(value, dict) else [value]
            for fig in figures:
                if hasattr(fig, "source"):
                    assert fig.source.split(":")[0] in {"datasheet", "paper", "derived", "estimate", "measured"}
    pi, h100 = catalog["raspberry-pi-4"], catalog["nvidia-h100-sxm5"]
    assert h100.peak("fp32") > 1000 * pi.peak("fp32")


def _catalog_dict(name: str = "nvidia-t4") -> dict:
    return yaml.safe_load((CATALOG_DIR / f"{name}.yaml").read_text())


def _write(tmp_path, data) -> str:
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_user_device_file_loads(tmp_path):
    data = _catalog_dict()
    data["name"] = "my-t4"
    spec = get_device(_write(tmp_path, data))
    assert spec.name == "my-t4" and spec.peak("int8") == 130e12


def test_missing_figure_names_field_and_file(tmp_path):
    data = _catalog_dict()
    del data["dram_bandwidth"]
    path = _write(tmp_path, data)
    with pytest.raises(UserError, match=r"dev\.yaml: field 'dram_bandwidth': missing"):
        load_spec(path)


def test_negative_figure_names_field(tmp_path):
    data = _catalog_dict()
    data["peak_flops"]["fp16"]["value"] = -1.0
    with pytest.raises(UserError, match=r"dev\.yaml: field 'peak_flops\.fp16\.value'.*greater than or equal to 0"):
        load_spec(_write(tmp_path, data))


def test_figure_without_source_is_rejected(tmp_path):
    data = _catalog_dict()
    data["onchip_bytes"] = {"value": 1024}
    with pytest.raises(UserError, match=r"field 'onchip_bytes\.source'"):
        load_spec(_write(tmp_path, data))


def test_unknown_dtype_names_field_and_type(tmp_path):
    data = _catalog_dict()
    data["peak_flops"]["fp12"] = {"value": 1.0, "source": "datasheet: made up"}
    with pytest.raises(UserError, match=r"field 'peak_flops'.*unknown data type.*fp12"):
        load_spec(_write(tmp_path, data))


def test_unknown_device_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="not in the catalog"):
        get_device("nvidia-z9000")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_spec(bad)


# ----------------------------------------------------------------------------------------- analytic arithmetic


def _toy_spec():
    fig = lambda v: {"value": v, "source": "estimate: test"}  # noqa: E731
    return spec_from_dict({
        "name": "toy", "kind": "cpu", "peak_flops": {"fp32": fig(1e9)}, "dram_bandwidth": fig(1e9),
        "onchip_bandwidth": fig(1e10), "onchip_bytes": fig(1e3), "dram_bytes": fig(1e9),
        "launch_overhead_s": fig(1e-6), "static_power_w": fig(2.0), "max_power_w": fig(10.0),
        "energy_pj_per_flop": {"fp32": fig(10.0)}, "energy_pj_per_dram_byte": fig(100.0),
        "energy_pj_per_onchip_byte": fig(1.0), "relative_cost": fig(1.0)})


def test_energy_and_edp_match_hand_computation():
    model = AnalyticModel(_toy_spec(), Efficiency(gemm_frac=1.0, m_half=0.0, n_half=0.0, k_half=0.0, mem_frac=1.0))
    op = Op("gemm", m=10, n=20, k=30, weight_bytes=30 * 20 * 4)
    cost = model.estimate_ops([op])
    # compute 2*10*20*30 = 12,000 FLOP at 1 GFLOP/s = 12 us; memory: 2,400 B weights + 2,000 B activations,
    # both larger than the 1,000 B on chip -> DRAM at 1 GB/s = 4.4 us; latency = max + 1 us launch = 13 us
    assert cost.latency_s == pytest.approx(13e-6)
    # dynamic: 12,000 * 10 pJ + 4,400 B * 100 pJ = 0.56 uJ; static: 2 W * 13 us = 26 uJ
    assert cost.energy_j == pytest.approx(0.56e-6 + 26e-6)
    assert cost.edp == pytest.approx((0.56e-6 + 26e-6) * 13e-6)
    assert not cost.weights_fit_on_chip and cost.supported
    assert model.breakdown([op])[0].bound == "compute"


def test_on_chip_weights_use_on_chip_bandwidth_and_energy():
    model = AnalyticModel(_toy_spec(), Efficiency(gemm_frac=1.0, m_half=0, n_half=0, k_half=0, mem_frac=1.0))
    op = Op("gemm", m=1, n=10, k=10, weight_bytes=400)  # 200 FLOP; 400 B weights + 80 B activations, all on chip
    cost = model.estimate_ops([op])
    assert cost.weights_fit_on_chip
    assert cost.latency_s == pytest.approx(200 / 1e9 + 1e-6)
    assert cost.energy_j == pytest.approx(200 * 10e-12 + 480 * 1e-12 + 2.0 * cost.latency_s)


def test_unsupported_precision_is_flagged_and_emulated():
    u200 = AnalyticModel(get_device("alveo-u200"))
    fp32 = u200.estimate_ops(linear_ops(4096, 1024, 1024))
    int8 = u200.estimate_ops(linear_ops(4096, 1024, 1024, LinearCompression(bits=8)))
    assert not fp32.supported and int8.supported
    assert fp32.latency_s > int8.latency_s


# ----------------------------------------------------------------------------------------- operator IR


def test_config_and_module_front_ends_agree_on_dense_bert():
    config = tiny_bert_config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(config).eval()
    arch = EncoderArch.from_hf_config(config)
    a = ops_from_config(arch, batch=2, seq_len=16)
    b = ops_from_module(model, batch=2, seq_len=16)
    gemm = lambda ops, kind: sum(o.flops for o in ops if o.kind == kind)  # noqa: E731
    assert gemm(a, "gemm") == gemm(b, "gemm")
    assert gemm(a, "bmm") == gemm(b, "bmm")
    assert sum(o.weight_bytes for o in a if o.kind == "gemm") == sum(o.weight_bytes for o in b if o.kind == "gemm")
    dispatch = lambda ops: sum(o.launches for o in ops if o.kind == "dispatch")  # noqa: E731
    assert dispatch(a) == dispatch(b) == 5 + 6 * 2


def test_module_front_end_uses_cost_ops():
    class Custom(torch.nn.Module):
        def forward(self, x):
            return x * 2

        def cost_ops(self, tokens):
            return [Op("gemm", m=tokens, n=7, k=3, name="custom", tag="tt")]

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Custom())
    ops = ops_from_module(model, example_input=torch.randn(5, 4))
    work = [o for o in ops if o.kind != "dispatch"]
    assert [o.name for o in work] == ["0", "custom"] and work[1].m == 5
    assert [o.name for o in ops if o.kind == "dispatch"] == [".dispatch"]  # the Sequential's own call


@settings(max_examples=40, deadline=None)
@given(modes=st.lists(st.tuples(st.integers(2, 6), st.integers(2, 6)), min_size=2, max_size=4),
       rank=st.integers(1, 8), tokens=st.integers(1, 64))
def test_tt_ops_shapes(modes, rank, tokens):
    ins, outs = tuple(m for m, _ in modes), tuple(n for _, n in modes)
    comp = LinearCompression(factor="tt", tt_in_modes=ins, tt_out_modes=outs, tt_ranks=(rank,) * (len(ins) - 1))
    gemms = [o for o in tt_linear_ops(tokens, comp, name="tt") if o.kind == "gemm"]
    assert len(gemms) == len(ins)
    assert gemms[0].m * gemms[0].k == tokens * math.prod(ins)  # the input, viewed for core 0
    assert gemms[-1].m * gemms[-1].n == tokens * math.prod(outs)  # the output of the last core
    ranks = (1, *comp.tt_ranks, 1)
    params = sum(r0 * m * n * r1 for m, n, r0, r1 in zip(ins, outs, ranks, ranks[1:], strict=False))
    assert sum(o.weight_bytes for o in gemms) == params * 4


@pytest.mark.parametrize("bits", [3, 4, 8, 32])
def test_quantized_tt_cores_are_stored_at_their_bits_and_multiplied_in_float(bits):
    """TT layers keep float intermediates, so their chain runs on dequantized cores; only the low rank's
    first GEMM, which meets the input as it is, runs on integers in the ONNX export."""
    lopsided = LinearCompression(factor="tt", tt_in_modes=(96, 2, 2), tt_out_modes=(2, 2, 96), tt_ranks=(8, 8),
                                 bits=bits)
    low_rank = LinearCompression(factor="tt", tt_in_modes=(384, 1), tt_out_modes=(1, 384), tt_ranks=(32,),
                                 bits=bits)
    for comp, first in ((lopsided, 32), (low_rank, 8 if bits <= 8 else 32)):
        gemms = [o for o in tt_linear_ops(16, comp) if o.kind == "gemm"]
        assert [o.bits for o in gemms] == [first] + [32] * (len(gemms) - 1)
        float_bytes = sum(o.weight_bytes for o in tt_linear_ops(16, dataclasses.replace(comp, bits=32))
                          if o.kind == "gemm")
        assert sum(o.weight_bytes for o in gemms) == float_bytes * bits / 32


@pytest.mark.parametrize("bits", [3, 4, 8, 32])
def test_a_quantized_tt_layer_other_than_the_low_rank_is_modelled_as_one_integer_gemm(bits):
    """The ONNX export runs a quantized TT layer as its chain only in the low rank ``(in, 1) x (1, out)``;
    any other shape runs as one integer GEMM on its rebuilt weight, and is modelled so. In float (32 bits) a
    cheaper chain stays a chain."""
    lopsided = LinearCompression(factor="tt", tt_in_modes=(384, 2, 2), tt_out_modes=(2, 2, 96), tt_ranks=(32, 32),
                                 bits=bits)
    low_rank = LinearCompression(factor="tt", tt_in_modes=(384, 1), tt_out_modes=(1, 384), tt_ranks=(32,), bits=bits)
    gemms = [o for o in linear_ops(16, 1536, 384, lopsided, name="lopsided") if o.kind == "gemm"]
    if bits <= 8:
        assert [(o.m, o.k, o.n, o.bits) for o in gemms] == [(16, 1536, 384, bits)]
    else:
        assert len(gemms) == 3 and all(o.bits == 32 for o in gemms)
    assert len([o for o in linear_ops(16, 384, 384, low_rank) if o.kind == "gemm"]) == 2
    assert tt_runs_dense(lopsided) == (bits <= 8) and not tt_runs_dense(low_rank)


@settings(max_examples=40, deadline=None)
@given(modes=st.lists(st.tuples(st.integers(2, 6), st.integers(2, 6)), min_size=2, max_size=4),
       rank=st.integers(1, 40), tokens=st.integers(1, 64))
def test_a_tt_chain_costlier_than_dense_is_modelled_as_the_dense_gemm(modes, rank, tokens):
    """The planner never runs a chain with more FLOPs than the dense GEMM, so the model must not either:
    a layer is never modelled as costing more arithmetic than its dense twin."""
    ins, outs = tuple(m for m, _ in modes), tuple(n for _, n in modes)
    fin, fout = math.prod(ins), math.prod(outs)
    comp = LinearCompression(factor="tt", tt_in_modes=ins, tt_out_modes=outs, tt_ranks=(rank,) * (len(ins) - 1))
    chain = sum(o.flops for o in tt_linear_ops(tokens, comp) if o.kind == "gemm")
    gemms = [o for o in linear_ops(tokens, fin, fout, comp, name="tt") if o.kind == "gemm"]
    assert sum(o.flops for o in gemms) == min(chain, 2 * tokens * fin * fout)
    if tt_runs_dense(comp):
        assert [(o.m, o.k, o.n, o.weight_bytes) for o in gemms] == [(tokens, fin, fout, fin * fout * 4)]
    else:
        assert len(gemms) == len(ins)


def test_bad_compression_is_a_user_error():
    with pytest.raises(UserError, match="do not multiply"):
        linear_ops(4, 64, 64, LinearCompression(factor="tt", tt_in_modes=(4, 4), tt_out_modes=(8, 8), tt_ranks=(2,)))
    with pytest.raises(UserError, match="sparsity"):
        LinearCompression(sparsity=1.5)
    for bits in (1, 9, 12):
        with pytest.raises(UserError, match="bits must be 2 to 8"):
            LinearCompression(bits=bits)


@dataclass(frozen=True)
class _TT(LayerPlan):
    kind: ClassVar[str] = "test-tt"
    in_modes: tuple = (4, 8)
    out_modes: tuple = (8, 8)
    ranks: tuple = (1, 4, 1)


@dataclass(frozen=True)
class _Quant(LayerPlan):
    kind: ClassVar[str] = "test-quant"
    bits: int = 8


@dataclass(frozen=True)
class _Sub(ModelPlan):
    kind: ClassVar[str] = "test-sub"
    num_layers: int = 2
    intermediate_size: int = 64


def test_plan_translation_reads_plan_fields():
    arch = EncoderArch(layers=4, hidden=32, heads=4, ffn=128)
    plan = CompressionPlan(layers={"*.intermediate.dense": [_TT(), _Quant()], "classifier": [Keep()]},
                           model_steps=[_Sub()])
    new_arch, layers = compression_from_plan(arch, plan)
    assert (new_arch.layers, new_arch.ffn) == (2, 64)
    comp = layers["*.intermediate.dense"]
    assert comp.factor == "tt" and comp.tt_ranks == (4,) and comp.bits == 8
    model = AnalyticCostModel(AnalyticModel(get_device("nvidia-t4")), arch)
    plain = model.estimate(None, (1, 16))
    small = model.estimate(plan, (1, 16))
    assert small.flops < plain.flops and small.weight_bytes < plain.weight_bytes
    with pytest.raises(UserError, match="batch, seq_len"):
        model.estimate(plan, (1,))


def test_catalog_orders_devices_sensibly_on_minilm():
    ops = ops_from_config(EncoderArch(layers=6, hidden=384, heads=12, ffn=1536), batch=1, seq_len=128)
    lat = {n: AnalyticModel(s).estimate_ops(ops).latency_s for n, s in load_catalog().items()}
    assert lat["nvidia-h100-sxm5"] < lat["nvidia-t4"] < lat["laptop-i7-1185g7"] < lat["raspberry-pi-4"]


# ----------------------------------------------------------------------------------------- predictor


def _synthetic(n: int, analytic: AnalyticModel, seed: int = 0):
    rng = np.random.default_rng(seed)
    samples, latencies = [], []
    for _ in range(n):
        hidden = int(rng.choice([32, 64, 96]))
        arch = EncoderArch(layers=int(rng.integers(1, 4)), hidden=hidden, heads=4, ffn=hidden * int(rng.integers(1, 4)))
        comp = {"*.intermediate.dense": LinearCompression(bits=int(rng.choice([8, 32])))}
        batch, seq = int(rng.choice([1, 4])), int(rng.choice([16, 32]))
        ops = ops_from_config(arch, comp, batch=batch, seq_len=seq)
        samples.append((ops, batch, seq))
        latencies.append(analytic.latency_s(ops) * (1.3 + 0.1 * arch.layers))  # a smooth, learnable residual
    return samples, latencies


def test_predictor_fits_saves_and_checks_feature_version(tmp_path):
    analytic = AnalyticModel(get_device("laptop-i7-1185g7"))
    samples, latencies = _synthetic(60, analytic)
    predictor = fit_predictor(samples[:45], latencies[:45], analytic, mlp_steps=200)
    pred = predictor.predict(samples[45:])
    assert metrics(pred, latencies[45:])["mape"] < 0.05
    path = predictor.save(tmp_path / "pred.safetensors")
    again = LatencyPredictor.load(path)
    np.testing.assert_allclose(again.predict(samples[45:]), pred, rtol=1e-6)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**meta, "feature_version": "ops0-pred0"})
    with pytest.raises(UserError, match=r"old\.safetensors: field 'feature_version' is 'ops0-pred0'"):
        LatencyPredictor.load(tmp_path / "old.safetensors")
    with pytest.raises(UserError, match="no predictor file"):
        LatencyPredictor.load(tmp_path / "missing.safetensors")


def test_metrics_on_hand_example():
    m = metrics([1.1, 2.0, 2.7], [1.0, 2.0, 3.0])
    assert m["mape"] == pytest.approx((0.1 + 0 + 0.1) / 3)
    assert m["kendall_tau"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- profiler and CLI


def test_profiler_measures_layers_and_caches(tiny_model_dir):
    from fitformer.hardware.profiler import profile_model

    model, _ = load_classifier(tiny_model_dir, num_labels=2)
    first = profile_model(model, batch=1, seq_len=8, threads=1, repeats=3)
    names = [row["name"] for row in first.layers]
    assert "bert.embeddings" in names and "bert.encoder.layer.1" in names and "classifier" in names
    assert first.total["mean_ms"] > 0 and not first.cached
    second = profile_model(model, batch=1, seq_len=8, threads=1, repeats=3)
    assert second.cached and second.total == first.total
    with pytest.raises(UserError, match="backend"):
        profile_model(model, backend="tvm")


def test_cli_devices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["devices", "show", "nvidia-a100-sxm4-80gb", "--json"])
    assert exit_info.value.code == 0
    assert json.loads(capsys.readouterr().out)["peak_flops"]["fp16"]["value"] == 312e12
    with pytest.raises(SystemExit) as exit_info:
        main(["devices", "show", "nope"])
    assert exit_info.value.code == 2
    assert "not in the catalog" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["devices", "list", "--json"])
    assert exit_info.value.code == 0 and len(json.loads(capsys.readouterr().out)) >= 8


def test_plain_dict_steps_from_layers_become_ops():
    class DictSteps(torch.nn.Module):
        def forward(self, x):
            return x

        def cost_ops(self, tokens):
            return [{"kind": "gemm", "batch": 1, "m": tokens, "n": 16, "k": 8, "label": "core 0"},
                    {"kind": "copy", "batch": 1, "m": tokens * 16, "n": 1, "k": 1, "label": "permute"}]

    ops = [o for o in ops_from_module(DictSteps(), example_input=torch.randn(3, 8)) if o.kind != "dispatch"]
    assert [(o.kind, o.m, o.n, o.k) for o in ops] == [("gemm", 3, 16, 8), ("elementwise", 48, 1, 1)]
    assert ops[0].weight_bytes == 8 * 16 * 4 and ops[1].flops == 0 and ops[0].name == ".core 0"


def test_measured_sparse_crossover_sets_what_sparsity_buys():
    from fitformer.hardware import get_device
    from fitformer.hardware.analytic import AnalyticModel
    from fitformer.hardware.ops import Op

    spec = get_device("laptop-i7-1185g7")  # no native sparse format
    dense = Op(kind="gemm", m=128, n=1536, k=384)
    sparse = Op(kind="gemm", m=128, n=1536, k=384, sparsity=0.9, sparse_format="unstructured")
    row = {"out_features": 1536, "in_features": 384, "sparsity": 0.9, "tokens": 128}
    faster = AnalyticModel(spec, sparse_crossover=[{**row, "speedup": 2.0}])
    slower = AnalyticModel(spec, sparse_crossover=[{**row, "speedup": 0.4}])
    base = faster.latency_s([dense])
    assert faster.latency_s([sparse]) < base  # the measured kernel beat dense
    assert slower.latency_s([sparse]) == pytest.approx(base)  # dense was faster, so execution stays dense


# ----------------------------------------------------------------------------------------- per-class figures


def test_op_class_names_the_kernel_kind():
    tt = LinearCompression(factor="tt", tt_in_modes=(4, 8), tt_out_modes=(4, 8), tt_ranks=(2,))
    classes = lambda comp: [op_class(o) for o in linear_ops(16, 32, 32, comp, name="l")]  # noqa: E731
    assert classes(LinearCompression()) == ["gemm"]
    assert classes(LinearCompression(bits=8)) == ["quantize", "int8"]
    assert classes(LinearCompression(sparsity=0.5, sparse_format="unstructured")) == ["sparse"]
    assert classes(LinearCompression(factor="lowrank", rank=4)) == ["lowrank", "lowrank"]
    assert classes(tt) == ["tt_permute", "tt", "tt_permute", "tt"]
    assert classes(dataclasses.replace(tt, tt_ranks=(4,))) == ["gemm"]  # more FLOPs than dense: runs dense
    ops = ops_from_config(EncoderArch(layers=1, hidden=32, heads=2, ffn=64))
    assert {op_class(o) for o in ops if o.kind != "dispatch"} <= set(OP_CLASSES)


def test_class_figures_match_hand_computation():
    base = Efficiency(gemm_frac=1.0, m_half=0.0, n_half=0.0, k_half=0.0, mem_frac=1.0)
    op = Op("gemm", m=10, n=20, k=30, weight_bytes=30 * 20 * 4, tag="lowrank")
    # 12,000 FLOP at 1 GFLOP/s = 12 us; 4.4 us of memory; 1 us launch (see the test above)
    model = AnalyticModel(_toy_spec(), dataclasses.replace(base, class_frac={"lowrank": 0.5},
                                                          class_overhead_s={"lowrank": 5e-6, "gemm": 1.0}))
    assert model.estimate_ops([op]).latency_s == pytest.approx(24e-6 + 1e-6 + 5e-6)
    # size trend: 12,000 FLOP = 0.012 MFLOP, so the rate is scaled by 0.012 ** 0.5 and memory time alike
    model = AnalyticModel(_toy_spec(), dataclasses.replace(base, class_size_exp={"lowrank": 0.5}))
    assert model.estimate_ops([op]).latency_s == pytest.approx(12e-6 / 0.012**0.5 + 1e-6)
    # a knee in the thin side of the GEMM: min(n, k) = 20, so the rate halves with a knee at 20
    model = AnalyticModel(_toy_spec(), dataclasses.replace(base, class_narrow_half={"lowrank": 20.0}))
    assert model.estimate_ops([op]).latency_s == pytest.approx(24e-6 + 1e-6)
    # other classes are untouched
    dense = Op("gemm", m=10, n=20, k=30, weight_bytes=30 * 20 * 4)
    assert model.estimate_ops([dense]).latency_s == pytest.approx(13e-6)


def test_efficiency_rejects_unknown_op_class():
    with pytest.raises(UserError, match="'class_overhead_s' has unknown op class"):
        Efficiency.from_dict({"class_overhead_s": {"conv": 1e-6}})
    eff = Efficiency(class_frac={"tt": 0.5}, class_size_exp={"sparse": -0.1}, class_narrow_half={"tt": 8.0})
    assert Efficiency.from_dict(json.loads(json.dumps(eff.to_dict()))) == eff


def _small_encoders(n: int, seed: int = 0) -> list[list[Op]]:
    rng = np.random.default_rng(seed)
    kinds = [LinearCompression(), LinearCompression(bits=8), LinearCompression(factor="lowrank", rank=8),
             LinearCompression(sparsity=0.8, sparse_format="unstructured"),
             LinearCompression(factor="tt", tt_in_modes=(8, 8), tt_out_modes=(8, 8), tt_ranks=(4,))]
    out = []
    for _ in range(n):
        arch = EncoderArch(layers=int(rng.integers(1, 4)), hidden=64, heads=int(rng.choice([2, 4])),
                           ffn=int(rng.choice([64, 128, 256])))
        comp = {"*.attention.*": kinds[int(rng.integers(len(kinds)))]}
        out.append(ops_from_config(arch, comp, batch=int(rng.choice([1, 4])), seq_len=int(rng.choice([16, 64]))))
    return out


def test_refine_calibration_recovers_per_class_costs():
    """Latencies from a model with framework costs the micro-benchmark model lacks (a TT and a sparse
    overhead per call, slow int8 kernels): refining on them must predict new models of the same kind."""
    micro = AnalyticModel(get_device("laptop-i7-1185g7"), Efficiency(framework_s=5e-6))
    truth = with_efficiency(micro, class_overhead_s={"tt": 30e-6, "sparse": 20e-6}, class_frac={"int8": 0.3},
                            framework_s=12e-6)
    rng = np.random.default_rng(1)
    train, test = _small_encoders(50, seed=2), _small_encoders(20, seed=3)
    measured = [truth.latency_s(ops) * float(np.exp(rng.normal(0, 0.02))) for ops in train]
    measured[0] *= 3.0  # one run disturbed by another process: the robust fit must shrug it off
    refined = refine_calibration(micro, train, measured)
    ape = lambda m: np.mean([abs(m.latency_s(o) / truth.latency_s(o) - 1) for o in test])  # noqa: E731
    assert ape(micro) > 0.15
    assert ape(refined) < 0.03
    assert refined.spec == micro.spec  # only the efficiency figures move


def test_refine_calibration_rejects_bad_measurements():
    micro = AnalyticModel(get_device("laptop-i7-1185g7"))
    ops = _small_encoders(10)
    with pytest.raises(UserError, match="at least 8 measured models"):
        refine_calibration(micro, ops[:3], [1e-3] * 3)
    with pytest.raises(UserError, match="positive, finite"):
        refine_calibration(micro, ops, [1e-3] * 9 + [float("nan")])


def test_predictor_is_robust_to_slow_outliers_and_can_choose_no_correction():
    analytic = AnalyticModel(get_device("laptop-i7-1185g7"))
    samples, latencies = _synthetic(80, analytic, seed=4)
    disturbed = list(latencies)
    for i in range(0, 60, 10):  # every tenth training run slowed by another process
        disturbed[i] *= 2.0
    predictor = fit_predictor(samples[:60], disturbed[:60], analytic, mlp_steps=200,
                              groups=[i // 2 for i in range(60)])
    assert metrics(predictor.predict(samples[60:]), latencies[60:])["mape"] < 0.05
    assert predictor.report["chosen"] != "none"
    exact = fit_predictor(samples[:60], [analytic.latency_s(s[0]) for s in samples[:60]], analytic, mlp_steps=50)
    np.testing.assert_allclose(exact.predict(samples[60:]), [analytic.latency_s(s[0]) for s in samples[60:]],
                               rtol=0.02)
    with pytest.raises(UserError, match="positive, finite"):
        fit_predictor(samples[:10], [0.0] * 10, analytic)


def test_interleaved_timing_settles_each_side_before_timing_it():
    from fitformer.hardware.timing import measure_interleaved, settle

    calls = {"a": 0, "b": 0}

    def fn(name):
        def call():
            calls[name] += 1
        return call

    assert settle(fn("a"), 0.0) == 0 and calls["a"] == 0
    assert settle(fn("a"), 1e-9) == 1  # at least once when asked to settle
    assert settle(fn("a"), 0.005) > 10 and calls["a"] > 11
    calls.update(a=0, b=0)
    measure_interleaved([fn("a"), fn("b")], rounds=2, repeats=3)
    plain = dict(calls)
    assert plain == {"a": 2 + 2 * 3, "b": 2 + 2 * 3}  # first-round warm-up, then the timed calls only
    calls.update(a=0, b=0)
    ms = measure_interleaved([fn("a"), fn("b")], rounds=2, repeats=3, settle_seconds=0.002)
    assert all(calls[k] > plain[k] + 2 for k in calls) and all(t >= 0 for t in ms)


def test_settling_stops_at_its_call_cap_and_shuffled_rounds_keep_each_result_with_its_function():
    from fitformer.hardware.timing import measure_interleaved, settle

    log: list[int] = []

    def fn(i: int, seconds: float = 0.0):
        def call():
            log.append(i)
            if seconds:
                time.sleep(seconds)
        return call

    assert settle(fn(0), 10.0, max_calls=3) == 3  # the cap ends it long before the seconds run out
    log.clear()
    rounds, n = 6, 4
    ms = measure_interleaved([fn(i, 0.002 * (i == 2)) for i in range(n)], rounds=rounds, repeats=1, warmup=0,
                             shuffle=True)
    orders = [tuple(log[r * n:(r + 1) * n]) for r in range(rounds)]
    assert orders[0] == tuple(range(n)) and len(set(orders)) > 1  # the first round in order, then reshuffled
    assert all(sorted(o) == list(range(n)) for o in orders)  # every function once per round
    assert max(range(n), key=ms.__getitem__) == 2  # the sleeping function's median stays its own
