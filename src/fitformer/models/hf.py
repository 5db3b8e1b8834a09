"""Loading and saving BERT-family sequence classifiers from local Hugging Face directories."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from ..errors import UserError
from .registry import resolve_model_dir

FITFORMER_META = "fitformer.json"


def load_tokenizer(model_dir: str | Path):
    """The model directory's tokenizer (fast when available), loaded offline."""
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir}: cannot load a tokenizer ({exc}); add vocab.txt or tokenizer.json") from None


def load_classifier(
    model: str | Path | None = None,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
) -> tuple[PreTrainedModel, Any]:
    """A sequence classifier and its tokenizer from a built-in name or local directory.

    A plain encoder gets a freshly initialised classification head with ``num_labels`` outputs; a
    fitformer-saved classifier keeps its head (and its label names).
    """
    model_dir = resolve_model_dir(model)
    if read_meta(model_dir).get("subnet"):  # per-layer sizes differ: from_pretrained cannot rebuild it
        from .elastic import load_subnet

        return load_subnet(model_dir)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if label_names is not None:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "some weights newly initialized" is expected for a new head
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = AutoModelForSequenceClassification.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{model_dir}: cannot load the model ({str(exc).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    net.eval()
    return net, load_tokenizer(model_dir)


def save_classifier(model: PreTrainedModel, tokenizer, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Save model (safetensors), tokenizer and fitformer metadata into ``out_dir`` atomically.

    Everything is written to a temporary sibling directory first, which then replaces ``out_dir``.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / FITFORMER_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """The fitformer metadata saved beside a classifier ({} for a plain Hugging Face directory)."""
    path = Path(model_dir) / FITFORMER_META
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@contextlib.contextmanager
def eager_attention(*models: nn.Module) -> Iterator[None]:
    """Switch Hugging Face models to eager attention, the implementation that returns attention
    probabilities (``sdpa`` does not), and restore their setting afterwards."""
    saved = []
    for model in models:
        config = getattr(model, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if current is not None and current != "eager" and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
            saved.append((model, current))
    try:
        yield
    finally:
        for model, current in saved:
            model.set_attn_implementation(current)
