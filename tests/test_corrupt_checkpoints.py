"""Damaged checkpoints: never loaded as if sound. Each is either recomputed or reported as a UserError that
names the file and the fix. (Damaged run-directory stages and manifests: ``tests/test_rundir.py``.)"""

from __future__ import annotations

import pytest
import torch
from conftest import crash_at_training_step

from fitformer.data import encode, split_dataset
from fitformer.errors import UserError
from fitformer.models import load_classifier, tiny_bert_config
from fitformer.train import DistillConfig, DistillData, FinetuneConfig, distill, finetune, get_teacher
from fitformer.utils import seed_everything

FINETUNE = FinetuneConfig(epochs=2, batch_size=16, learning_rate=3e-3, max_length=16, checkpoint_every_steps=3)


def damage(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else bytes(b ^ 0x5A for b in data[:64]) + data[64:])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.state_dict().values(), b.state_dict().values(),
                                                                 strict=True))


def _finetune_setup(tiny_model_dir, data):
    seed_everything(0)
    model, tokenizer = load_classifier(tiny_model_dir, num_labels=2, label_names=data.label_names)
    splits = split_dataset(data)
    return model, tokenizer, encode(tokenizer, splits.train, 16), encode(tokenizer, splits.validation, 16)


@pytest.fixture(scope="module")
def finetuned(tiny_model_dir, sentiment_data, tmp_path_factory):
    """The weights of an uninterrupted fine-tuning run."""
    model, tok, train, val = _finetune_setup(tiny_model_dir, sentiment_data)
    out = tmp_path_factory.mktemp("finetune")
    finetune(model, tok, train, val, sentiment_data.label_names, FINETUNE, out)
    return load_classifier(out / "best")[0]


@pytest.mark.parametrize(("name", "how"), [("model.safetensors", "truncate"), ("model.safetensors", "garble"),
                                           ("optim.pt", "garble"), ("state.json", "truncate")])
def test_damaged_finetune_checkpoint_starts_over_to_the_same_weights(tiny_model_dir, sentiment_data, tmp_path,
                                                                     monkeypatch, finetuned, name, how):
    model, tok, train, val = _finetune_setup(tiny_model_dir, sentiment_data)
    crash_at_training_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, tok, train, val, sentiment_data.label_names, FINETUNE, tmp_path / "b")
    monkeypatch.undo()
    damage(tmp_path / "b" / "last" / name, how)

    model, tok, train, val = _finetune_setup(tiny_model_dir, sentiment_data)
    result = finetune(model, tok, train, val, sentiment_data.label_names, FINETUNE, tmp_path / "b")
    assert same_weights(load_classifier(result.best_dir)[0], finetuned)


def test_damaged_cached_teacher_is_a_user_error_naming_the_fix(tiny_model_dir, sentiment_data, tmp_path):
    config = FinetuneConfig(epochs=1, batch_size=16, max_length=16)
    teacher = get_teacher(tiny_model_dir, data=sentiment_data, config=config, out_dir=tmp_path / "t")
    damage(tmp_path / "t" / "best" / "model.safetensors", "truncate")
    with pytest.raises(UserError, match="model.safetensors") as info:
        get_teacher(tiny_model_dir, data=sentiment_data, config=config, out_dir=tmp_path / "t")
    message = str(info.value)
    assert "\n" not in message and f"delete {tmp_path / 't'}" in message
    assert teacher.model_dir == tmp_path / "t" / "best"


@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_damaged_weights_of_a_finished_distillation_are_recomputed(tiny_model_dir, sentiment_data, tmp_path, how):
    from transformers import BertForSequenceClassification

    teacher, tokenizer = load_classifier(tiny_model_dir, num_labels=2)
    splits = split_dataset(sentiment_data, seed=0)
    data = DistillData(encode(tokenizer, splits.train, 16), encode(tokenizer, splits.validation, 16),
                       sentiment_data.label_names)
    config = DistillConfig(schedule="progressive", max_steps=6, batch_size=16, checkpoint_every_steps=2)

    def student():
        torch.manual_seed(1)
        return BertForSequenceClassification(tiny_bert_config(vocab_size=teacher.config.vocab_size,
                                                               num_hidden_layers=1, hidden_size=16,
                                                               num_attention_heads=2, intermediate_size=32))

    first = student()
    result = distill(first, teacher, data, config, tmp_path / "d", progress=False)
    damage(tmp_path / "d" / "best" / "model.safetensors", how)
    again = student()
    rerun = distill(again, teacher, data, config, tmp_path / "d", progress=False)
    assert rerun.steps == result.steps and rerun.validation_accuracy == result.validation_accuracy
    assert same_weights(again, first)
