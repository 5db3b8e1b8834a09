"""Export: a compressed model saved and loaded back predicts exactly as before."""

from __future__ import annotations

import torch

import fitformer
from fitformer.compress import CompressionPlan, Keep
from fitformer.data import encode
from fitformer.export import save_compressed
from fitformer.models import load_classifier
from fitformer.train.evaluate import predict_logits


def test_round_trip_and_predict(tmp_path, tiny_model_dir, sentiment_data):
    model, tokenizer = load_classifier(tiny_model_dir, num_labels=2, label_names=sentiment_data.label_names)
    plan = CompressionPlan(layers={"*.intermediate.dense": [Keep()]})
    out = save_compressed(model, plan, tokenizer, tmp_path / "run" / "model",
                          {"label_names": sentiment_data.label_names, "max_length": 32})
    loaded = fitformer.load(tmp_path / "run")
    data = encode(tokenizer, sentiment_data, 32)
    assert torch.equal(predict_logits(model, data), predict_logits(loaded.model, data))
    labels = loaded.predict(["a fine film", "a dull film"])
    assert len(labels) == 2 and set(labels) <= set(sentiment_data.label_names)
    assert out.exists() and not any(p.name.startswith(".") for p in (tmp_path / "run").iterdir())


def test_quantized_sub_network_is_saved_packed_and_reloads_bit_identical(tmp_path, tiny_model_dir, sentiment_data):
    """A frozen w8a8/w4a8 sub-network with a trimmed 8-bit position table is stored with packed integer
    weights (smaller than its float twin) and loads back with identical logits."""
    from fitformer.compress import apply_plan
    from fitformer.compress.positions import PositionTrimPlan
    from fitformer.compress.quant import QuantPlan, freeze
    from fitformer.compress.subnet import SubnetPlan
    from fitformer.export.model import WEIGHTS_FILE

    model, tokenizer = load_classifier(tiny_model_dir, num_labels=2, label_names=sentiment_data.label_names)
    heads = model.config.num_attention_heads
    layers = model.config.num_hidden_layers
    plan = CompressionPlan(
        layers={"*.intermediate.dense": [QuantPlan(weight_bits=4, act_bits=8)],
                "*.attention.self.query": [QuantPlan(weight_bits=8, act_bits=8)],
                "bert.embeddings.position_embeddings": [QuantPlan(weight_bits=8, act_bits=None)]},
        model_steps=[SubnetPlan(hidden=model.config.hidden_size, heads=(heads,) * (layers - 1),
                                ffn=(model.config.intermediate_size // 2,) * (layers - 1)),
                     PositionTrimPlan(rows=32)])
    student = apply_plan(model, plan)
    data = encode(tokenizer, sentiment_data, 32)
    predict_logits(student, data)  # initialises the activation step sizes
    frozen = freeze(student)
    meta = {"label_names": sentiment_data.label_names, "max_length": 32}
    packed = save_compressed(frozen, plan, tokenizer, tmp_path / "packed", meta, base_config=model.config)
    plain = save_compressed(student, plan, tokenizer, tmp_path / "float", meta, base_config=model.config)
    assert (packed / WEIGHTS_FILE).stat().st_size < (plain / WEIGHTS_FILE).stat().st_size
    assert student.bert.embeddings.position_embeddings.num_embeddings == 32 < model.config.max_position_embeddings
    loaded = fitformer.load(packed)
    assert loaded.meta["weights"] == "packed"
    assert torch.equal(predict_logits(frozen, data), predict_logits(loaded.model, data))
