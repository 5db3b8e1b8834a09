"""Data-aware refit of factorized layers, on a tiny random BERT."""

from __future__ import annotations

import pytest
import torch
from transformers import BertForSequenceClassification

from fitformer.compress import CompressionPlan, TTEmbeddingPlan, apply_plan, refit_factorized, tt_plan_for_model
from fitformer.errors import UserError
from fitformer.layers import TTLinear
from fitformer.models import tiny_bert_config


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


def test_refit_stops_at_its_time_budget(teacher):
    plan = tt_plan_for_model(teacher, rank=2, min_features=16, exclude=["classifier"])
    plan.layers["bert.embeddings.word_embeddings"] = [TTEmbeddingPlan(max_rank=2)]
    student = apply_plan(teacher, plan)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    report = refit_factorized(student, teacher, batches(teacher.config.vocab_size), steps=150, lr=1e-2,
                              embedding_steps=150, max_seconds=1e-9)  # spent before the first step
    assert set(report.after) == set(plan.layers) and report.after == report.before
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())
