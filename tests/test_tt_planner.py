"""Planner, plans on real models, torch.compile and ONNX export of TT layers."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from fitformer.compress import CompressionPlan, LowRankPlan, TTEmbeddingPlan, TTPlan, apply_plan, tt_plan_for_model
from fitformer.errors import UserError
from fitformer.layers import LowRankLinear, Planner, RooflineCost, TTEmbedding, TTLinear
from fitformer.layers.planner import TTSpec, execution_ops, token_bucket, unfused_chain
from fitformer.models import load_classifier

SPEC = TTSpec(48, 60, (4, 3, 4), (3, 4, 5), (1, 4, 4, 1))


def test_planner_uses_the_supplied_cost_function_and_caches():
    seen = []

    def fewest_kernels(ops):
        seen.append(len(ops))
        return len([op for op in ops if op["stage"] == "run"])

    planner = Planner(cost=fewest_kernels, measure=False)
    exe = planner.plan(SPEC, 100)
    assert exe.kind == "dense"  # one GEMM per call beats any chain
    n = len(seen)
    assert planner.plan(SPEC, 120) is exe and len(seen) == n  # same bucket: cached
    assert token_bucket(100) == token_bucket(128) == 128 and token_bucket(129) == 256
    flops_only = Planner(cost=lambda ops: sum(op["flops"] for op in ops if op["stage"] == "run"), measure=False)
    best = flops_only.plan(SPEC, 64)
    run_flops = {e: sum(op["flops"] for op in execution_ops(e, SPEC, 64) if op["stage"] == "run")
                 for e in flops_only.candidates(SPEC, 64, False)}
    assert run_flops[best] == min(run_flops.values())


def test_measuring_planner_chooses_a_correct_execution():
    lin = nn.Linear(48, 60)
    planner = Planner(measure=True, max_seconds=0.05, cost=RooflineCost())
    tt = TTLinear.from_linear(lin, (4, 3, 4), (3, 4, 5), planner=planner)
    x = torch.randn(40, 48)
    with torch.no_grad():
        torch.testing.assert_close(tt(x), lin(x), rtol=1e-4, atol=1e-4)
    timings = planner.timings(tt.spec, 40)
    assert "dense" in timings and all(t > 0 for t in timings.values())
    ops = tt.cost_ops(40)
    assert ops and all({"kind", "m", "n", "k", "batch", "flops", "bytes"} <= set(op) for op in ops)
    assert all(op["kind"] in ("gemm", "bmm", "copy") for op in ops)


def test_calibrated_cost_is_positive():
    cost = RooflineCost.calibrate()
    assert cost.peak_flops > 0 and cost.bandwidth > 0 and cost.overhead_s > 0


def test_tt_plan_on_a_bert_model(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), num_labels=2)[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = CompressionPlan(layers={"*.intermediate.dense": [TTPlan((4, 8), (8, 8), None, None, 2)],
                                   "*.output.dense": [LowRankPlan(rank=32)],
                                   "*.word_embeddings": [TTEmbeddingPlan(num_cores=2)]})
    plan = CompressionPlan.from_dict(plan.to_dict())  # plans are data
    out = apply_plan(model, plan)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert isinstance(out.get_submodule("bert.encoder.layer.0.intermediate.dense"), TTLinear)
    assert isinstance(out.get_submodule("bert.encoder.layer.0.output.dense"), LowRankLinear)
    assert isinstance(out.get_submodule("bert.embeddings.word_embeddings"), TTEmbedding)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():  # full ranks everywhere: same logits
        torch.testing.assert_close(out(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_plan_errors_name_the_layer(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), num_labels=2)[0]
    try:
        apply_plan(model, CompressionPlan(layers={"bert.embeddings.word_embeddings": [TTPlan()]}))
    except UserError as exc:
        assert "bert.embeddings.word_embeddings" in str(exc)
    else:
        raise AssertionError("a TT plan on an embedding must fail")


def test_tt_plan_for_model_reaches_the_target(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), num_labels=2)[0]
    plan = tt_plan_for_model(model, target_compression=3.0, num_cores=2, min_features=32)
    assert plan.layers and all(isinstance(s[0], TTPlan) for s in plan.layers.values())
    out = apply_plan(model, plan)
    dense = sum(model.get_submodule(n).weight.numel() for n in plan.layers)
    cores = sum(sum(c.numel() for c in out.get_submodule(n).cores) for n in plan.layers)
    assert dense / cores >= 3.0
    fixed = tt_plan_for_model(model, rank=2, num_cores=2, min_features=32)
    assert {s[0].max_rank for s in fixed.layers.values()} == {2}


class TinyTTNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = TTEmbedding(40, 24, (2, 4, 5), (2, 3, 4), 3)
        self.fc1 = TTLinear(24, 30, (2, 3, 4), (2, 3, 5), 3, planner=Planner(measure=False))
        self.fc2 = TTLinear(30, 8, (5, 6), (2, 4), 2, planner=Planner(measure=False))

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def test_torch_compile_traces_tt_layers_without_graph_breaks():
    net = TinyTTNet().eval()
    ids = torch.randint(0, 40, (2, 7))
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), net(ids))
    compiled(ids).sum().backward()  # training path compiles too
    assert net.fc1.cores[0].grad is not None


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    import onnxruntime as ort

    net = TinyTTNet().eval()
    ids = torch.randint(0, 40, (2, 7))
    path = tmp_path / "tt.onnx"
    torch.onnx.export(net, (ids,), str(path), input_names=["ids"], output_names=["y"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"ids": ids.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), net(ids), rtol=1e-4, atol=1e-5)


class HalvesPlanner(Planner):
    """Always the unfused chain on the halves of the rows (a plan the measuring planner may pick)."""

    def plan(self, spec, tokens, dtype=torch.float32, training=False):
        return replace(unfused_chain(spec), halves=True)


def test_a_plan_on_halves_of_the_rows_runs_eager_and_compiled_at_any_row_count():
    tt = TTLinear(24, 30, (2, 3, 4), (2, 3, 5), 3, planner=HalvesPlanner(measure=False)).eval()
    compiled = torch.compile(tt, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for tokens in (7, 8):  # an odd row count runs as one GEMM
            x = torch.randn(tokens, 24)
            expected = x @ tt.weight.t() + tt.bias
            torch.testing.assert_close(tt(x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tt(x), expected, rtol=1e-5, atol=1e-5)  # the cached runner
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
