"""Hugging Face encoder adapters, the built-in model registry and tiny test models."""

from .hf import count_parameters, load_classifier, load_tokenizer, read_meta, save_classifier
from .registry import BUILTIN_MODELS, DEFAULT_MODEL, resolve_model_dir
from .tiny import make_tiny_bert_dir, tiny_bert_config

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "count_parameters",
    "load_classifier",
    "load_tokenizer",
    "make_tiny_bert_dir",
    "read_meta",
    "resolve_model_dir",
    "save_classifier",
    "tiny_bert_config",
]
