"""Model resolution and loading: built-in names, local directories, clear errors offline."""

from __future__ import annotations

import json

import pytest
import torch

from fitformer.errors import UserError
from fitformer.models import load_classifier, read_meta, resolve_model_dir, save_classifier


def test_hub_id_is_rejected_with_advice():
    with pytest.raises(UserError, match="not a local directory .*hub ID.*offline"):
        resolve_model_dir("bert-base-uncased/does-not-exist")


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        resolve_model_dir(tmp_path)


def test_save_and_reload_keep_outputs_and_labels(tmp_path, tiny_model_dir):
    model, tokenizer = load_classifier(tiny_model_dir, num_labels=3, label_names=["a", "b", "c"])
    out = save_classifier(model, tokenizer, tmp_path / "clf", {"label_names": ["a", "b", "c"]})
    again, _ = load_classifier(out)
    ids = torch.randint(5, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert read_meta(out)["label_names"] == ["a", "b", "c"]
    assert not any(p.name.startswith(".clf") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_builtin_minilm_loads_offline():
    model, tokenizer = load_classifier("minilm-l6", num_labels=2)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert tokenizer("a fine film")["input_ids"][0] == tokenizer.cls_token_id
