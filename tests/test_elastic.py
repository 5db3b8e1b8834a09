"""The elastic SuperTransformer: exact equivalences (full model, reordering, extraction), plans, save/load."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, BertForSequenceClassification

from fitformer.compress import CompressionPlan, apply_plan
from fitformer.compress.subnet import SubnetPlan
from fitformer.errors import UserError
from fitformer.models import count_parameters, load_classifier, tiny_bert_config
from fitformer.models.elastic import (
    ElasticBert,
    ElasticSpace,
    SubConfig,
    compute_importance,
    extract,
    kept_layers,
    load_subnet,
    make_elastic,
    save_subnet,
)

ATOL = 1e-5


def _model(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    fields = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64)
    fields.update(overrides)
    return BertForSequenceClassification(tiny_bert_config(**fields)).eval()


def _inputs(seed: int = 0, batch: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0  # one padded row
    types = torch.zeros_like(ids)
    types[:, length // 3:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def reordered() -> tuple[BertForSequenceClassification, ElasticBert]:
    model = _model()
    return model, make_elastic(model, batches=[_inputs(s) for s in range(3)])


def test_largest_subnet_reproduces_the_original_model():
    model = _model(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.2)  # eval mode: dropout off
    elastic = ElasticBert(model)
    assert not elastic.training
    x = _inputs()
    assert elastic.active == elastic.space.largest()
    torch.testing.assert_close(elastic(**x), model(**x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scored_on_data", [True, False])
def test_reordering_leaves_the_full_model_unchanged(scored_on_data):
    model = _model(seed=1)
    x = _inputs(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    elastic = make_elastic(model, batches=[_inputs(2)] if scored_on_data else None)
    torch.testing.assert_close(elastic(**x), model(**x).logits, atol=ATOL, rtol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "input model was modified"
    moved = elastic.model.bert.encoder.layer[0].intermediate.dense.weight
    assert not torch.equal(moved, model.bert.encoder.layer[0].intermediate.dense.weight)


def test_reordered_units_are_sorted_by_importance(reordered):
    _, elastic = reordered
    scores = compute_importance(elastic, [_inputs(s) for s in range(3)])  # same data: permuted scores
    for s in [*scores.heads, *scores.neurons, scores.hidden]:
        assert torch.all(s[:-1] >= s[1:] - 1e-6 * s.max()), s


def test_leading_slices_beat_trailing_slices(reordered):
    """The point of reordering: the smallest sub-network strays less from the full model than without it."""
    model, elastic = reordered
    x = _inputs(5, batch=16)
    full = model(**x).logits
    elastic.set_active(elastic.space.smallest())
    front = (elastic(**x) - full).abs().mean()
    elastic.set_active(elastic.space.largest())
    plain = ElasticBert(model)
    plain.set_active(plain.space.smallest())
    assert front < (plain(**x) - full).abs().mean()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_extract_matches_the_elastic_model(reordered, seed):
    _, elastic = reordered
    sub = elastic.space.sample(random.Random(seed))
    x = _inputs(seed % 7)
    elastic.set_active(sub)
    try:
        expected = elastic(**x)
    finally:
        elastic.set_active(elastic.space.largest())
    small = extract(elastic, sub)
    assert isinstance(small, BertForSequenceClassification)
    torch.testing.assert_close(small(**x).logits, expected, atol=ATOL, rtol=0)
    layers = small.bert.encoder.layer
    assert len(layers) == sub.depth and small.config.hidden_size == sub.hidden
    for layer, heads, ffn in zip(layers, sub.heads, sub.ffn, strict=True):
        assert layer.attention.self.query.weight.shape == (heads * elastic.head_dim, sub.hidden)
        assert layer.intermediate.dense.weight.shape == (ffn, sub.hidden)
    assert count_parameters(small) <= count_parameters(elastic.model)


def test_gradients_of_the_elastic_model_are_those_of_the_extracted_one(reordered):
    _, elastic = reordered
    sub = SubConfig(24, (3, 1), (32, 64))
    x = _inputs(3)
    elastic.zero_grad()
    elastic.set_active(sub)
    elastic(**x).sum().backward()
    elastic.set_active(elastic.space.largest())
    small = extract(elastic, sub)
    small(**x).logits.sum().backward()
    kept = elastic.layer_indices(sub)
    assert kept == (0, 2)  # depth 2 of 3 keeps the first and the last layer
    big, little = elastic.model.bert.encoder.layer[kept[1]], small.bert.encoder.layer[1]
    g = big.intermediate.dense.weight.grad
    torch.testing.assert_close(g[:64, :24], little.intermediate.dense.weight.grad, atol=1e-6, rtol=1e-4)
    assert torch.count_nonzero(g[:, 24:]) == 0
    assert elastic.model.bert.encoder.layer[1].output.dense.weight.grad is None  # a layer the sub-network skips
    q = big.attention.self.query.weight.grad
    assert torch.count_nonzero(q[8:]) == 0  # one head of head_dim 8
    elastic.zero_grad()


def test_save_and_load_a_heterogeneous_subnet(reordered, tmp_path, tiny_model_dir):
    _, elastic = reordered
    _, tokenizer = load_classifier(tiny_model_dir, num_labels=2)
    sub = SubConfig(16, (2, 4), (16, 64))
    small = extract(elastic, sub)
    save_subnet(small, tokenizer, tmp_path / "sub", {"subconfig": sub.to_dict()})
    loaded, _ = load_subnet(tmp_path / "sub")
    x = _inputs(4)
    torch.testing.assert_close(loaded(**x).logits, small(**x).logits, atol=0, rtol=0)
    via_classifier, _ = load_classifier(tmp_path / "sub")  # the generic loader recognises a sub-network
    torch.testing.assert_close(via_classifier(**x).logits, small(**x).logits, atol=0, rtol=0)
    with pytest.raises(UserError, match="model.safetensors"):
        load_subnet(tmp_path)


def test_subnet_plan_round_trips_and_applies(reordered):
    _, elastic = reordered
    sub = SubConfig(24, (4, 2, 1), (48, 16, 64))
    plan = CompressionPlan(model_steps=[SubnetPlan.from_subconfig(sub)])
    again = CompressionPlan.from_dict(plan.to_dict())
    assert again.model_steps[0].subconfig == sub
    dense = elastic.model
    before = dense.bert.encoder.layer[0].attention.self.query.weight.clone()
    small = apply_plan(dense, again)
    x = _inputs(6)
    torch.testing.assert_close(small(**x).logits, extract(elastic, sub)(**x).logits, atol=0, rtol=0)
    assert torch.equal(dense.bert.encoder.layer[0].attention.self.query.weight, before)
    with pytest.raises(UserError, match="larger than the model"):
        apply_plan(dense, CompressionPlan(model_steps=[SubnetPlan(32, (8,), (64,))]))


def test_subconfig_and_space_are_plain_data():
    sub = SubConfig(256, (8, 4), (768, 384))
    assert SubConfig.from_dict(sub.to_dict()) == sub
    with pytest.raises(UserError, match="depth"):
        SubConfig.from_dict({"depth": 3, "hidden": 256, "heads": [8, 4], "ffn": [768, 384]})
    with pytest.raises(UserError, match="one of each per layer"):
        SubConfig(256, (8, 4), (768,))
    with pytest.raises(UserError, match="unknown"):
        SubConfig.from_dict({"hidden": 256, "heads": [8], "ffn": [768], "width": 2})
    minilm = BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6)
    space = ElasticSpace.for_config(minilm)
    assert space == ElasticSpace(depth=(2, 3, 4, 5, 6), hidden=(192, 256, 320, 384), heads=(4, 6, 8, 10, 12),
                                 ffn=(384, 768, 1152, 1536), head_dim=32)
    assert ElasticSpace.from_dict(space.to_dict()) == space
    old = {k: v for k, v in space.to_dict().items() if k != "layers"}  # saved before the depth rule
    assert ElasticSpace.from_dict(old).layers == "first"
    assert space.validate(sub) is sub
    with pytest.raises(UserError, match="heads of layer 1 = 5"):
        space.validate(SubConfig(256, (8, 5), (768, 384)))
    rng = random.Random(0)
    for _ in range(50):
        space.validate(space.sample(rng))


def test_shallow_subnets_keep_spread_layers_including_the_last():
    assert kept_layers(2, 6) == (0, 5) and kept_layers(5, 6) == (0, 1, 2, 4, 5) and kept_layers(6, 6) == tuple(range(6))
    assert kept_layers(3, 6, "first") == (0, 1, 2) and kept_layers(1, 6) == (0,)
    with pytest.raises(UserError, match="depth 7"):
        kept_layers(7, 6)
    model = _model()
    elastic = ElasticBert(model)
    n = elastic.full.depth
    small = extract(elastic, SubConfig(elastic.full.hidden, elastic.full.heads[:2], elastic.full.ffn[:2]))
    last = model.bert.encoder.layer[n - 1].output.dense.weight
    assert torch.equal(small.bert.encoder.layer[1].output.dense.weight, last)


def test_bad_models_and_spaces_are_user_errors():
    model = _model()
    with pytest.raises(UserError, match="head_dim"):
        ElasticBert(model, ElasticSpace((2,), (32,), (4,), (64,), head_dim=4))
    with pytest.raises(UserError, match="depth rule"):
        ElasticSpace((2,), (32,), (4,), (64,), head_dim=8, layers="last")
    with pytest.raises(UserError, match="exceeds"):
        ElasticBert(model, ElasticSpace((2,), (32,), (8,), (64,), head_dim=8))
    with pytest.raises(UserError, match="not a BERT"):
        ElasticBert(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    elastic = ElasticBert(model)
    with pytest.raises(UserError, match="not a BERT|extracted"):
        ElasticBert(extract(elastic, SubConfig(16, (1, 1), (16, 16))))


@pytest.mark.slow
def test_real_minilm_largest_subnet_and_extraction():
    model, tokenizer = load_classifier(None, num_labels=2)
    x = dict(tokenizer(["a moving, beautifully acted film", "dull and far too long"], padding=True,
                       return_tensors="pt"))
    elastic = ElasticBert(model)
    assert elastic.space == ElasticSpace((2, 3, 4, 5, 6), (192, 256, 320, 384), (4, 6, 8, 10, 12),
                                         (384, 768, 1152, 1536), head_dim=32)
    with torch.no_grad():
        torch.testing.assert_close(elastic(**x), model(**x).logits, atol=ATOL, rtol=0)
        sub = SubConfig(256, (12, 8, 4), (1536, 768, 384))
        elastic.set_active(sub)
        small = extract(elastic, sub)
        torch.testing.assert_close(small(**x).logits, elastic(**x), atol=ATOL, rtol=0)
    assert count_parameters(small) < count_parameters(model)
