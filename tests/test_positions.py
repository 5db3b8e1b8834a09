"""Plan kind ``positions``: dropping the position rows beyond the longest input changes no output."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertForSequenceClassification

from fitformer.compress import CompressionPlan, apply_plan
from fitformer.compress.positions import PositionTrimPlan
from fitformer.errors import UserError
from fitformer.models import tiny_bert_config


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_trimmed_model_matches_the_full_one_up_to_its_rows(rows, seed):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config()).eval()
    plan = CompressionPlan(model_steps=[PositionTrimPlan(rows=rows)])
    trimmed = apply_plan(model, plan).eval()
    assert trimmed.bert.embeddings.position_embeddings.num_embeddings == rows == trimmed.config.max_position_embeddings
    assert model.bert.embeddings.position_embeddings.num_embeddings == 64  # the input model is left untouched
    ids = torch.randint(0, model.config.vocab_size, (3, rows))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, trimmed(input_ids=ids).logits)
    assert CompressionPlan.from_dict(plan.to_dict()).model_steps == [PositionTrimPlan(rows=rows)]


def test_trimmed_position_table_gets_gradients():
    model = apply_plan(BertForSequenceClassification(tiny_bert_config()), CompressionPlan(
        model_steps=[PositionTrimPlan(rows=8)]))
    model(input_ids=torch.randint(0, 100, (2, 8))).logits.sum().backward()
    assert model.bert.embeddings.position_embeddings.weight.grad is not None


@pytest.mark.parametrize("rows", [0, 65])
def test_rows_outside_the_table_are_a_user_error(rows):
    model = BertForSequenceClassification(tiny_bert_config())
    with pytest.raises(UserError, match="choose 1..64"):
        apply_plan(model, CompressionPlan(model_steps=[PositionTrimPlan(rows=rows)]))


def test_model_without_position_table_is_a_user_error():
    with pytest.raises(UserError, match="no BERT-style position table"):
        apply_plan(torch.nn.Sequential(torch.nn.Linear(2, 2)), CompressionPlan(model_steps=[PositionTrimPlan(rows=4)]))


def test_cost_model_reads_the_step_as_no_change_in_compute():
    from fitformer.hardware.ops import EncoderArch, compression_from_plan

    arch = EncoderArch(layers=2, hidden=32, heads=4, ffn=64, vocab=128)
    assert compression_from_plan(arch, CompressionPlan(model_steps=[PositionTrimPlan(rows=8)])) == (arch, {})
