"""Shared fixtures: tiny random BERT models and small labelled datasets, an isolated cache per session."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["FITFORMER_PROGRESS"] = "0"

from fitformer.data import TextDataset  # noqa: E402
from fitformer.models import make_tiny_bert_dir  # noqa: E402

POSITIVE = ["great", "wonderful", "moving", "brilliant", "fun", "charming", "sharp", "beautiful"]
NEGATIVE = ["dull", "boring", "awful", "tedious", "flat", "messy", "weak", "bland"]
FILLER = ["the", "film", "movie", "is", "a", "story", "with", "cast", "and", "plot", "very", "quite"]


def make_sentiment_data(n: int = 200, seed: int = 0) -> TextDataset:
    """A small separable sentiment dataset: each text has a polar word among filler words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return TextDataset(texts=texts, labels=labels, label_names=["negative", "positive"], source="synthetic")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never read or write the user's cache."""
    os.environ["FITFORMER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["FITFORMER_LOG_DIR"] = str(tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="session")
def sentiment_data() -> TextDataset:
    return make_sentiment_data()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sentiment_data):
    """A tiny random BERT encoder directory whose vocabulary covers the synthetic data."""
    return make_tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"), sentiment_data.texts)


def crash_at_training_step(monkeypatch, step: int) -> None:
    """Make the ``step``-th gradient clipping raise KeyboardInterrupt: a crash in the middle of training.
    Undo with ``monkeypatch.undo()``."""
    import torch

    real_clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def clip(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
