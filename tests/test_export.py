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
