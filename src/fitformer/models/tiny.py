"""Tiny randomly initialised BERT models for tests and examples: real architecture, seconds to run."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert_config(**overrides) -> BertConfig:
    """A BERT config of a few thousand parameters; override any field."""
    fields = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    fields.update(overrides)
    return BertConfig(**fields)


def make_tiny_bert_dir(
    path: str | Path, words: Iterable[str] = (), seed: int = 0, **config_overrides
) -> Path:
    """Write a tiny random BERT (plain encoder directory with a WordPiece vocabulary) to ``path``.

    ``words`` seeds the vocabulary (lower-cased word pieces); the config's vocab size follows it.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab = list(SPECIAL_TOKENS) + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    for word in sorted({w for text in words for w in re.findall(r"[a-z]+", text.lower())}):
        if word not in vocab:
            vocab.append(word)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    config = tiny_bert_config(vocab_size=len(vocab), **config_overrides)
    BertForSequenceClassification(config).bert.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
