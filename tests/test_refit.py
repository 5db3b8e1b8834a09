"""Data-aware refit of factorized layers, on a tiny random BERT."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertForSequenceClassification

from fitformer.compress import (
    CompressionPlan,
    EmbeddingFisher,
    TTEmbeddingPlan,
    apply_plan,
    embedding_fisher,
    refit_factorized,
    tt_plan_for_model,
)
from fitformer.errors import UserError
from fitformer.layers import TTLinear
from fitformer.models import tiny_bert_config
from fitformer.models.activations import record_layer_inputs


def batches(vocab: int, n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (8, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[:4, 10:] = 0  # padded rows: their tokens must not be recorded
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.zeros(8, dtype=torch.long)})
    return out


@pytest.fixture(scope="module")
def teacher() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(hidden_size=32, intermediate_size=64)).eval()


def logits_error(student, teacher, data) -> float:
    with torch.no_grad():
        student.eval()
        return sum(float((student(**{k: v for k, v in b.items() if k != "labels"}).logits
                          - teacher(**{k: v for k, v in b.items() if k != "labels"}).logits).pow(2).sum())
                   for b in data)


def test_refit_lowers_every_layer_error_and_the_model_error(teacher):
    plan = tt_plan_for_model(teacher, rank=2, min_features=16, exclude=["classifier"])
    plan.layers["bert.embeddings.word_embeddings"] = [TTEmbeddingPlan(max_rank=2)]
    student = apply_plan(teacher, plan)
    data = batches(teacher.config.vocab_size)
    before = logits_error(student, teacher, data)
    report = refit_factorized(student, teacher, data, steps=150, lr=1e-2, embedding_steps=150)
    assert set(report.after) == set(plan.layers)
    assert report.tokens == 4 * (8 * 16 - 4 * 6)  # unmasked tokens only
    assert all(report.after[n] < report.before[n] for n in report.after), report
    assert logits_error(student, teacher, data) < before
    assert "->" in report.summary()


def test_refit_of_a_full_rank_student_stays_exact_and_dense_models_are_left_alone(teacher):
    student = apply_plan(teacher, tt_plan_for_model(teacher, rank=64, min_features=16, exclude=["classifier"]))
    report = refit_factorized(student, teacher, batches(teacher.config.vocab_size, 1), steps=0)
    assert max(report.before.values()) < 1e-5 and report.before == report.after
    assert refit_factorized(apply_plan(teacher, CompressionPlan()), teacher, []).after == {}
    narrower = apply_plan(teacher, CompressionPlan())  # e.g. a pruned FFN: not the teacher layer's function
    narrower.bert.encoder.layer[0].intermediate.dense = TTLinear.from_linear(torch.nn.Linear(32, 16), max_rank=2)
    assert refit_factorized(narrower, teacher, batches(teacher.config.vocab_size, 1)).after == {}
    with pytest.raises(UserError, match="no calibration batches"):
        refit_factorized(student, teacher, [])
    with pytest.raises(UserError, match="steps"):
        refit_factorized(student, teacher, batches(teacher.config.vocab_size, 1), steps=-1)
    with pytest.raises(UserError, match="max_seconds"):
        refit_factorized(student, teacher, batches(teacher.config.vocab_size, 1), max_seconds=0)


def test_refit_in_order_fits_each_layer_on_the_students_inputs_to_the_teachers_outputs(teacher):
    data = batches(teacher.config.vocab_size)
    plan = tt_plan_for_model(teacher, rank=2, min_features=16, exclude=["classifier"])
    plan.layers["bert.embeddings.word_embeddings"] = [TTEmbeddingPlan(max_rank=2)]
    in_order, independent = apply_plan(teacher, plan), apply_plan(teacher, plan)
    report = refit_factorized(in_order, teacher, data, steps=100, lr=1e-2, embedding_steps=100)
    refit_factorized(independent, teacher, data, steps=100, lr=1e-2, embedding_steps=100, inputs="teacher")
    # each layer also corrects the error of the layers before it, so the model ends closer to the teacher
    assert logits_error(in_order, teacher, data) < logits_error(independent, teacher, data)
    last = list(report.after)[-1]  # what the last layer was fitted on: the refit student's own inputs
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    for who, model in (("student", in_order), ("teacher", teacher)):
        record_layer_inputs(model, [last], data, lambda _name, rows, who=who: seen[who].append(rows))
    layer, dense = dict(in_order.named_modules())[last], dict(teacher.named_modules())[last]
    with torch.no_grad():
        target = dense(torch.cat(seen["teacher"]))
        error = (layer(torch.cat(seen["student"])) - target).pow(2).sum() / target.pow(2).sum()
    assert float(error.sqrt()) == pytest.approx(report.after[last], rel=1e-4)
    with pytest.raises(UserError, match="inputs='dense'"):
        refit_factorized(in_order, teacher, data, inputs="dense")


def test_a_layer_with_nothing_compressed_before_it_refits_the_same_on_either_inputs(teacher):
    data = batches(teacher.config.vocab_size)
    full = tt_plan_for_model(teacher, rank=2, min_features=16, exclude=["classifier"])
    first = "bert.encoder.layer.0.attention.self.query"
    plan = CompressionPlan({first: full.layers[first]})
    a, b = apply_plan(teacher, plan), apply_plan(teacher, plan)
    assert refit_factorized(a, teacher, data, steps=50, lr=1e-2).after == \
        refit_factorized(b, teacher, data, steps=50, lr=1e-2, inputs="teacher").after
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_refit_stops_at_its_time_budget(teacher):
    plan = tt_plan_for_model(teacher, rank=2, min_features=16, exclude=["classifier"])
    plan.layers["bert.embeddings.word_embeddings"] = [TTEmbeddingPlan(max_rank=2)]
    student = apply_plan(teacher, plan)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    report = refit_factorized(student, teacher, batches(teacher.config.vocab_size), steps=150, lr=1e-2,
                              embedding_steps=150, max_seconds=1e-9)  # spent before the first step
    assert set(report.after) == set(plan.layers) and report.after == report.before
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())


def test_embedding_fisher_is_the_squared_loss_gradient_per_row_and_direction_and_leaves_the_model_alone(teacher):
    data = batches(teacher.config.vocab_size, 2)
    fisher = embedding_fisher(teacher, data)
    hidden = teacher.config.hidden_size
    expected = torch.zeros(teacher.config.vocab_size, dtype=torch.float64)
    directions = torch.zeros(hidden, hidden, dtype=torch.float64)
    for b in data:  # the same gradient through inputs_embeds, the rows looked up by hand
        rows = teacher.get_input_embeddings()(b["input_ids"]).detach().requires_grad_()
        logits = teacher(inputs_embeds=rows, attention_mask=b["attention_mask"],
                         token_type_ids=b["token_type_ids"]).logits
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"), rows)
        mask = b["attention_mask"].bool()
        expected.index_add_(0, b["input_ids"][mask], grad.pow(2).sum(-1)[mask].double())
        directions += grad[mask].double().T @ grad[mask].double()
    torch.testing.assert_close(fisher.rows, expected, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(fisher.directions, directions, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(torch.trace(fisher.directions), fisher.rows.sum())  # the same squares, summed
    counts = sum(torch.bincount(b["input_ids"][b["attention_mask"].bool()], minlength=len(expected)) for b in data)
    assert torch.equal(fisher.occurrences, counts.double()) and float(fisher.rows.sum()) > 0
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    with pytest.raises(UserError, match="labels"):
        embedding_fisher(teacher, [{k: v for k, v in data[0].items() if k != "labels"}])


def test_fisher_row_weights_scale_counts_and_fall_back_to_the_mean():
    fisher = EmbeddingFisher(rows=torch.tensor([0.0, 8.0, 0.5, 0.0], dtype=torch.float64),
                             occurrences=torch.tensor([0.0, 2.0, 1.0, 0.0], dtype=torch.float64),
                             directions=torch.eye(2, dtype=torch.float64))  # id 3: in the text, not the sample
    weights = fisher.row_weights(torch.tensor([0, 4, 2, 3]))
    mean = 8.5 / 3
    torch.testing.assert_close(weights, torch.tensor([0.0, 4 * (8 + mean) / 3, 2 * (0.5 + mean) / 2, 3 * mean],
                                                     dtype=torch.float64))
    with pytest.raises(UserError, match="one entry per id"):
        fisher.row_weights(torch.tensor([0, 4, 2]))


@settings(max_examples=25, deadline=None)
@given(hidden=st.integers(1, 8), samples=st.integers(1, 12), damping=st.floats(1e-3, 10.0), seed=st.integers(0, 99))
def test_fisher_metric_squares_to_the_damped_normalised_directions(hidden, samples, damping, seed):
    grads = torch.randn(samples, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    directions = grads.T @ grads
    fisher = EmbeddingFisher(torch.zeros(3), torch.zeros(3), directions)
    metric = fisher.metric(damping)
    torch.testing.assert_close(metric, metric.T)
    expected = directions / (torch.trace(directions) / hidden) + damping * torch.eye(hidden, dtype=torch.float64)
    torch.testing.assert_close(metric @ metric, expected)
    with pytest.raises(UserError, match="damping"):
        fisher.metric(0.0)


def test_row_weights_steer_the_embedding_refit_and_are_checked(teacher):
    vocab = teacher.config.vocab_size
    data = batches(vocab)
    counts = sum(torch.bincount(b["input_ids"][b["attention_mask"].bool()], minlength=vocab) for b in data)
    favoured = counts.nonzero().squeeze(1)[:5]
    weights = counts.double().clone()
    weights[favoured] *= 1000  # the rows a task depends on most

    def favoured_error(row_weights):
        plan = CompressionPlan(layers={"bert.embeddings.word_embeddings": [TTEmbeddingPlan(max_rank=2)]})
        student = apply_plan(teacher, plan)
        refit_factorized(student, teacher, data, steps=0, embedding_steps=200, token_counts=counts,
                         row_weights=row_weights)
        table, target = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
        with torch.no_grad():
            return float((table[favoured] - target[favoured]).norm() / target[favoured].norm())

    assert favoured_error(weights) < favoured_error(None)
    student = apply_plan(teacher, CompressionPlan(layers={"bert.embeddings.word_embeddings":
                                                          [TTEmbeddingPlan(max_rank=2)]}))
    with pytest.raises(UserError, match="row_weights has"):
        refit_factorized(student, teacher, data, row_weights=weights[:-1])
    with pytest.raises(UserError, match="non-negative"):
        refit_factorized(student, teacher, data, row_weights=-weights)


def test_a_direction_metric_steers_the_embedding_refit_and_is_checked(teacher):
    """Fitted in a metric that reads two of the hidden directions, the table keeps those two directions better
    than when fitted in the plain metric (where the rank is spent on all of them)."""
    vocab, hidden = teacher.config.vocab_size, teacher.config.hidden_size
    data = batches(vocab)
    read = torch.zeros(hidden, hidden, dtype=torch.float64)
    read[0, 0] = read[1, 1] = 1.0  # the task reads hidden directions 0 and 1 only
    metric = EmbeddingFisher(torch.zeros(vocab), torch.zeros(vocab), read).metric(damping=1e-3)

    def read_error(embedding_metric):
        plan = CompressionPlan(layers={"bert.embeddings.word_embeddings": [TTEmbeddingPlan(max_rank=4)]})
        student = apply_plan(teacher, plan)
        refit_factorized(student, teacher, data, steps=0, embedding_steps=500, embedding_metric=embedding_metric)
        table, target = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
        with torch.no_grad():
            return float((table[used, :2] - target[used, :2]).norm() / target[used, :2].norm())

    used = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in data]).unique()
    assert read_error(metric) < 0.85 * read_error(None)
    student = apply_plan(teacher, CompressionPlan(layers={"bert.embeddings.word_embeddings":
                                                          [TTEmbeddingPlan(max_rank=2)]}))
    with pytest.raises(UserError, match="metric is"):
        refit_factorized(student, teacher, data, embedding_metric=metric[:-1])
