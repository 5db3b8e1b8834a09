"""SuperTransformer training (sandwich rule, resumable), inherited-weight evaluation, short distillation."""

from __future__ import annotations

import pytest
import torch

import fitformer.train.supernet as supernet_module
from fitformer.data import encode
from fitformer.errors import UserError
from fitformer.models import load_classifier
from fitformer.models.elastic import ElasticBert, ElasticSpace, SubConfig, extract
from fitformer.train import evaluate
from fitformer.train.supernet import (
    ShortDistillConfig,
    SupernetConfig,
    inherited_accuracy,
    load_supernet,
    sandwich,
    short_distill,
    subset,
    teacher_logits,
    train_supernet,
)

CONFIG = SupernetConfig(steps=6, batch_size=16, learning_rate=1e-3, checkpoint_every_steps=3, importance_batches=2)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, sentiment_data):
    torch.manual_seed(0)
    teacher, tokenizer = load_classifier(tiny_model_dir, num_labels=2)
    data = encode(tokenizer, sentiment_data, max_length=16)
    return teacher, tokenizer, data


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    teacher, tokenizer, data = setup
    out = tmp_path_factory.mktemp("supernet")
    elastic, result = train_supernet(teacher, tokenizer, data, CONFIG, out, progress=False)
    return elastic, result, out


def _weights(elastic: ElasticBert) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in elastic.model.state_dict().items()}


def test_sandwich_has_largest_smallest_and_seeded_random():
    space = ElasticSpace((2, 3), (16, 24, 32), (1, 2, 4), (16, 64), head_dim=8)
    subs = sandwich(space, step=5, seed=1, random_subnets=3)
    assert subs[:2] == [space.largest(), space.smallest()] and len(subs) == 5
    assert subs == sandwich(space, step=5, seed=1, random_subnets=3)
    assert subs != sandwich(space, step=6, seed=1, random_subnets=3)


def test_training_changes_weights_and_resumes_exactly(setup, trained, tmp_path, monkeypatch):
    teacher, tokenizer, data = setup
    elastic, result, first = trained
    assert result.steps == CONFIG.steps and result.history
    start = ElasticBert(teacher).model.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in elastic.model.state_dict().items())

    saves = []
    real_save = supernet_module.save_checkpoint

    def interrupt_after_first(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(supernet_module, "save_checkpoint", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(teacher, tokenizer, data, CONFIG, tmp_path / "b", progress=False)
    monkeypatch.setattr(supernet_module, "save_checkpoint", real_save)
    resumed, _ = train_supernet(teacher, tokenizer, data, CONFIG, tmp_path / "b", progress=False)
    expected = _weights(elastic)
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-5)

    again, _ = train_supernet(teacher, tokenizer, data, CONFIG, first, progress=False)  # cache hit
    loaded = load_supernet(first / "supernet")
    assert loaded.space == elastic.space == again.space
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, expected[k])


def test_inherited_accuracy_is_the_extracted_models_accuracy(setup, trained):
    _, _, data = setup
    elastic = trained[0]
    val = subset(data, 64, seed=3)
    assert len(val) == 64
    lengths = val.attention_mask.sum(dim=1)
    assert torch.all(lengths[:-1] <= lengths[1:])
    sub = SubConfig(16, (1, 2), (16, 48))
    acc = inherited_accuracy(elastic, sub, val, ["negative", "positive"])
    assert elastic.active == elastic.space.largest()  # restored
    assert acc == evaluate(extract(elastic, sub), val, ["negative", "positive"]).accuracy


def test_short_distillation_moves_the_student_towards_the_teacher(setup):
    teacher, _, data = setup
    targets = teacher_logits(teacher, data)
    elastic = ElasticBert(teacher)
    student = extract(elastic, elastic.space.smallest())

    def gap() -> float:
        with torch.no_grad():
            out = torch.cat([student(**{k: v for k, v in b.items() if k != "labels"}).logits
                             for b in data.batches(64)])
        return float((out.softmax(-1) - targets.softmax(-1)).abs().mean())

    before = gap()
    config = ShortDistillConfig(steps=30, batch_size=16, learning_rate=1e-3, kd_weight=1.0)
    assert short_distill(student, data, targets, config) is student and not student.training
    assert gap() < before
    with pytest.raises(UserError, match="teacher logits"):
        short_distill(student, data, targets[:3], config)


def test_bad_config_is_a_user_error(setup, tmp_path):
    teacher, tokenizer, data = setup
    with pytest.raises(UserError, match="learning rate"):
        train_supernet(teacher, tokenizer, data, SupernetConfig(learning_rate=2.0), tmp_path, progress=False)
    with pytest.raises(UserError, match="not a SuperTransformer"):
        load_supernet(tmp_path)
