"""A non-finite loss stops training with the step, the layer it starts in and the likely cause."""

from __future__ import annotations

import pytest
import torch

from fitformer.data import encode, split_dataset
from fitformer.models import load_classifier
from fitformer.train import DistillConfig, DistillData, FinetuneConfig, distill, finetune
from fitformer.train.finetune import nonfinite_origin

LAYER = "bert.encoder.layer.0.intermediate.dense"


@pytest.fixture()
def poisoned(tiny_model_dir, sentiment_data):
    """A classifier whose first FFN projection has a row of NaN, with its tokenised splits."""
    torch.manual_seed(0)
    model, tokenizer = load_classifier(tiny_model_dir, num_labels=2, label_names=sentiment_data.label_names)
    with torch.no_grad():
        model.get_submodule(LAYER).weight[0] = float("nan")
    splits = split_dataset(sentiment_data)
    return model, tokenizer, encode(tokenizer, splits.train, 16), encode(tokenizer, splits.validation, 16)


def test_finetune_names_the_step_and_the_layer(poisoned, sentiment_data, tmp_path):
    model, tokenizer, train, validation = poisoned
    config = FinetuneConfig(epochs=1, batch_size=16, max_length=16)
    with pytest.raises(RuntimeError, match="at step 0") as info:
        finetune(model, tokenizer, train, validation, sentiment_data.label_names, config, tmp_path / "ft")
    message = str(info.value)
    assert f"weights of {LAYER}.weight" in message and f"first non-finite output in {LAYER}" in message
    assert "lower the learning rate" in message and str(tmp_path / "ft" / "last") in message


def test_distillation_names_the_step_and_the_layer(poisoned, tiny_model_dir, sentiment_data, tmp_path):
    student, _, train, validation = poisoned
    teacher, _ = load_classifier(tiny_model_dir, num_labels=2)
    data = DistillData(train, validation, sentiment_data.label_names)
    with pytest.raises(RuntimeError, match="distillation loss is nan at step 0") as info:
        distill(student, teacher, data, DistillConfig(schedule="logits_kd", max_steps=2, batch_size=16),
                tmp_path / "d", progress=False)
    assert f"first non-finite output in {LAYER}" in str(info.value)


def test_a_quantizer_scale_at_zero_is_named(tiny_model_dir, sentiment_data):
    from fitformer.compress.quant import QuantPlan, quantize

    model, tokenizer = load_classifier(tiny_model_dir, num_labels=2)
    q = quantize(model, QuantPlan(8, 8, True, True).validate())
    name, scale = next((n, p) for n, p in q.named_parameters() if n.endswith("scale"))
    with torch.no_grad():
        scale.zero_()
    batch = encode(tokenizer, split_dataset(sentiment_data).train, 16).batch(torch.arange(4))
    assert f"zero quantizer scale {name}" in nonfinite_origin(q, batch)
    model, _ = load_classifier(tiny_model_dir, num_labels=2)
    assert nonfinite_origin(model, batch) == "weights and outputs are finite (the loss itself overflowed)"
