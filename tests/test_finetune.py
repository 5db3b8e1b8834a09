"""Fine-tuning: learns, caches, and resumes an interrupted run to the same result."""

from __future__ import annotations

import pytest
import torch
from conftest import crash_at_training_step

from fitformer.data import encode, split_dataset
from fitformer.models import load_classifier
from fitformer.train import FinetuneConfig, evaluate, finetune, get_teacher
from fitformer.utils import seed_everything

CONFIG = FinetuneConfig(epochs=2, batch_size=16, learning_rate=3e-3, max_length=16, checkpoint_every_steps=3)


def _setup(tiny_model_dir, data):
    seed_everything(0)
    model, tokenizer = load_classifier(tiny_model_dir, num_labels=2, label_names=data.label_names)
    splits = split_dataset(data)
    return model, tokenizer, encode(tokenizer, splits.train, 16), encode(tokenizer, splits.validation, 16), splits


def test_teacher_learns_and_is_cached(tiny_model_dir, sentiment_data, tmp_path):
    config = FinetuneConfig(epochs=4, batch_size=8, learning_rate=2e-3, max_length=16)
    teacher = get_teacher(tiny_model_dir, data=sentiment_data, config=config, out_dir=tmp_path / "t")
    assert teacher.evaluate("test").accuracy >= 0.8  # the synthetic task is separable by one word
    again = get_teacher(tiny_model_dir, data=sentiment_data, config=config, out_dir=tmp_path / "t")
    assert again.result == teacher.result
    assert not (tmp_path / "t" / "last").exists()


def test_interrupted_run_resumes_to_the_same_weights(tiny_model_dir, sentiment_data, tmp_path, monkeypatch):
    model, tok, train, val, splits = _setup(tiny_model_dir, sentiment_data)
    finetune(model, tok, train, val, sentiment_data.label_names, CONFIG, tmp_path / "a")
    reference, _ = load_classifier(tmp_path / "a" / "best")

    model, tok, train, val, _ = _setup(tiny_model_dir, sentiment_data)
    crash_at_training_step(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, tok, train, val, sentiment_data.label_names, CONFIG, tmp_path / "b")
    monkeypatch.undo()
    assert (tmp_path / "b" / "last" / "state.json").exists()

    model, tok, train, val, _ = _setup(tiny_model_dir, sentiment_data)  # a fresh process would start here
    result = finetune(model, tok, train, val, sentiment_data.label_names, CONFIG, tmp_path / "b")
    resumed, _ = load_classifier(result.best_dir)
    for (name, p), (_, q) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    test = encode(tok, splits.test, 16)
    assert evaluate(resumed, test, sentiment_data.label_names).accuracy == evaluate(
        reference, test, sentiment_data.label_names).accuracy


def test_bad_hyper_parameters_are_user_errors():
    from fitformer.errors import UserError

    for bad in (FinetuneConfig(epochs=0), FinetuneConfig(learning_rate=2.0), FinetuneConfig(max_length=4)):
        with pytest.raises(UserError):
            bad.validate()
