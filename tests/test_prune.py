"""Structured pruning: gates (masked twin), physical compaction, importance, schedule, save/reload, ONNX."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import BertForSequenceClassification

from fitformer.compress import CompressionPlan, apply_plan
from fitformer.compress.prune import (
    Gates,
    GradualPruner,
    StructuredPrunePlan,
    cubic_schedule,
    importance,
    importance_magnitude,
    layer_shapes,
    load_pruned_classifier,
    masked_twin,
    select_structure,
)
from fitformer.errors import UserError
from fitformer.models import load_classifier, save_classifier
from fitformer.models.tiny import tiny_bert_config


def tiny(layers: int = 3, dtype=torch.float64, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=layers)).to(dtype).eval()
    with torch.no_grad():  # non-trivial biases so that a wrong slice shows up
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(seed: int = 1, batch: int = 3, length: int = 12, vocab: int = 120) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 4 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def compact(model, plan):
    return apply_plan(model, CompressionPlan(model_steps=[plan]))


@st.composite
def plans(draw, layers: int = 3, heads: int = 4, ffn: int = 64):
    keep_heads = tuple(tuple(sorted(draw(st.sets(st.integers(0, heads - 1), min_size=1)))) for _ in range(layers))
    keep_ffn = tuple(tuple(sorted(draw(st.sets(st.integers(0, ffn - 1), max_size=ffn)))) for _ in range(layers))
    drop = tuple(sorted(draw(st.sets(st.integers(0, layers - 1), max_size=layers - 1))))
    return StructuredPrunePlan(keep_heads, keep_ffn, drop)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plans())
def test_compacted_model_equals_masked_twin(plan):
    model = tiny()
    small = compact(model, plan)
    twin, _ = masked_twin(model, plan)
    x = inputs()
    with torch.no_grad():
        diff = (small(**x).logits - twin(**x).logits).abs().max().item()
    assert diff < 1e-12
    kept = [i for i in range(3) if i not in plan.drop_layers]
    assert layer_shapes(small) == [{"heads": len(plan.keep_heads[i]), "intermediate": len(plan.keep_neurons[i])}
                                   for i in kept]
    assert layer_shapes(model) == [{"heads": 4, "intermediate": 64}] * 3  # the input is untouched


def test_fraction_plan_removes_the_asked_share_and_differs_per_layer():
    model = tiny(layers=3, dtype=torch.float32)
    plan = StructuredPrunePlan(prune_heads=0.25, prune_ffn=0.5).resolve(model)
    assert sum(len(h) for h in plan.keep_heads) == 9
    assert all(len(f) == 32 for f in plan.keep_neurons)
    small = compact(model, StructuredPrunePlan(prune_heads=0.25, prune_ffn=0.5))
    assert sum(s["heads"] for s in layer_shapes(small)) == 9


def test_pruned_classifier_saves_and_reloads_with_its_shapes(tiny_model_dir, tmp_path):
    model, tokenizer = load_classifier(tiny_model_dir, num_labels=2)
    plan = StructuredPrunePlan(((0, 2), (1, 2, 3)), (tuple(range(0, 64, 3)), tuple(range(40))))
    small = compact(model, plan)
    save_classifier(small, tokenizer, tmp_path / "pruned", {"plan": CompressionPlan(model_steps=[plan]).to_dict()})
    again, _ = load_pruned_classifier(tmp_path / "pruned")
    assert layer_shapes(again) == [{"heads": 2, "intermediate": 22}, {"heads": 3, "intermediate": 40}]
    x = inputs(length=10, vocab=small.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, small(**x).logits, rtol=0, atol=0)
    plain, _ = load_pruned_classifier(tiny_model_dir)  # an unpruned directory loads as usual
    assert layer_shapes(plain) == [{"heads": 4, "intermediate": 64}] * 2


def test_plan_round_trips_through_dict():
    plan = StructuredPrunePlan(((0, 1), (2,)), ((1, 2, 3), ()), (1,))
    data = CompressionPlan(model_steps=[plan]).to_dict()
    assert CompressionPlan.from_dict(data).model_steps == [plan]


@pytest.mark.parametrize("bad", [
    StructuredPrunePlan(((),) * 3, ((0,),) * 3),  # a layer without heads
    StructuredPrunePlan(((0,),) * 2, ((0,),) * 2),  # wrong number of layers
    StructuredPrunePlan(((9,),) * 3, ((0,),) * 3),  # head index out of range
    StructuredPrunePlan(((0,),) * 3, ((0,),) * 3, (0, 1, 2)),  # every layer dropped
    StructuredPrunePlan(prune_heads=1.0),
])
def test_bad_plans_are_user_errors(bad):
    with pytest.raises(UserError):
        compact(tiny(), bad)


def test_gate_gradient_matches_finite_difference():
    """Taylor and movement scores are built on dL/dg; check it against central differences."""
    model = tiny(layers=2)
    gates = Gates(model)
    x = inputs()
    labels = torch.tensor([0, 1, 1])

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(**x).logits, labels)

    loss().backward()
    eps = 1e-6
    for gate, j in ((gates.heads[1], 2), (gates.neurons[0], 5), (gates.layers, 1)):
        with torch.no_grad():
            gate[j] += eps
            up = loss().item()
            gate[j] -= 2 * eps
            down = loss().item()
            gate[j] += eps
        assert gate.grad[j].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_movement_score_is_weight_times_gradient_of_output_columns():
    """dL/dg of a head equals sum W * dL/dW over the head's columns of the output projection (Sanh et al.)."""
    model = tiny(layers=2)
    batches = [dict(inputs(seed=s), labels=torch.tensor([0, 1, 0])) for s in range(2)]

    def loss_fn(m, b):
        return m(**b).loss

    moved = importance(model, "movement", batches, loss_fn)
    expected = torch.zeros(4, dtype=torch.float64)
    for b in batches:
        model.zero_grad()
        loss_fn(model, b).backward()
        w = model.bert.encoder.layer[1].attention.output.dense.weight
        expected -= (w * w.grad).sum(0).view(4, 8).sum(1).detach()
    torch.testing.assert_close(moved.heads[1].double(), expected, rtol=1e-4, atol=1e-7)
    taylor = importance(model, "taylor", batches, loss_fn)
    assert all((h >= 0).all() for h in taylor.heads)


def test_magnitude_importance_prefers_larger_heads():
    model = tiny(layers=1, dtype=torch.float32)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[8:16] *= 10  # head 1
        model.bert.encoder.layer[0].intermediate.dense.weight[3] *= 10
    scores = importance_magnitude(model)
    assert int(scores.heads[0].argmax()) == 1 and int(scores.neurons[0].argmax()) == 3
    plan = select_structure(scores, prune_heads=0.75, prune_ffn=0.9)
    assert plan.keep_heads == ((1,),) and 3 in plan.keep_neurons[0]


def test_cubic_schedule():
    values = [cubic_schedule(t, 100, 0.5) for t in range(101)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.5)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[10] - values[0] > values[100] - values[90]  # prunes fast early, slowly at the end
    assert cubic_schedule(50, 100, 0.5, start=60) == 0.0 and cubic_schedule(80, 100, 0.5, end=70) == 0.5


@pytest.mark.parametrize("method", ["taylor", "movement", "magnitude"])
def test_gradual_pruner_reaches_targets_and_compacts(method):
    model = tiny(layers=2, dtype=torch.float32)
    model.train()
    pruner = GradualPruner(model, prune_heads=0.25, prune_ffn=0.5, total_steps=20, method=method,
                           drop_layers=1, update_every=5)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen_heads = []
    for step in range(20):
        batch = dict(inputs(seed=step), labels=torch.tensor([step % 2, 1, 0]))
        model(**batch).loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        pruner.update(step)
        seen_heads.append(sum(len(h) for h in pruner.plan().keep_heads))
    assert all(b <= a for a, b in zip(seen_heads, seen_heads[1:], strict=False))  # only ever removes more
    plan = pruner.plan()
    assert sum(len(h) for h in plan.keep_heads) == 6 and all(len(f) == 32 for f in plan.keep_neurons)
    assert len(plan.drop_layers) == 1
    model.eval()
    x = inputs()
    with torch.no_grad():
        gated = model(**x).logits
    small = pruner.compact()
    with torch.no_grad():
        torch.testing.assert_close(small(**x).logits, gated, rtol=1e-5, atol=1e-6)
    assert len(layer_shapes(small)) == 1


@pytest.mark.parametrize("which", ["twin", "compact"])
def test_masks_and_compaction_export_to_onnx(tmp_path, which):
    ort = pytest.importorskip("onnxruntime")
    model = tiny(layers=2, dtype=torch.float32)
    plan = StructuredPrunePlan(((0, 3), (1, 2, 3)), (tuple(range(20)), tuple(range(10, 50))), ())
    net = masked_twin(model, plan)[0] if which == "twin" else compact(model, plan)
    x = inputs()
    path = tmp_path / f"{which}.onnx"

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    wrapped = Logits(copy.deepcopy(net)).eval()
    torch.onnx.export(wrapped, (x["input_ids"], x["attention_mask"]), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        want = wrapped(**x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_prune_command_saves_a_smaller_reloadable_classifier(tiny_model_dir, tmp_path, capsys):
    import json

    from fitformer.cli import main

    model, tokenizer = load_classifier(tiny_model_dir, num_labels=2)
    save_classifier(model, tokenizer, tmp_path / "clf", {})
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "-m", str(tmp_path / "clf"), "--heads", "0.25", "--ffn", "0.5", "--nm", "2:4",
              "-o", str(tmp_path / "out"), "--json"])
    assert exit_info.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert sum(s["heads"] for s in result["layer_shapes"]) == 6
    assert result["encoder_weight_bytes"]["hp"] < result["encoder_weight_bytes"]["csr"]
    again, _ = load_pruned_classifier(tmp_path / "out")
    assert layer_shapes(again) == result["layer_shapes"]
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "-m", str(tmp_path / "clf"), "--nm", "2of4", "-o", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
