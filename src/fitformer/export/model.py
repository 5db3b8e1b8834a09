"""Saving and loading compressed classifiers: base config + plan + weights, reloaded by re-applying the plan.

A compressed model is stored as the Hugging Face config of its dense base (``config.json``), the
``CompressionPlan`` that turns the base into it (``plan.json``), its state dict (``model.safetensors``),
the tokenizer, and ``fitformer.json`` (label names, max length, metrics). Loading rebuilds the base
architecture without pretrained weights, applies the plan to get the same module structure, and loads the
saved weights strictly, so the reloaded model is the saved one.

A frozen quantized model (:func:`fitformer.compress.quant.freeze`) is saved with its integer weights packed
(int4: two per byte, see :mod:`fitformer.export.quantized`), so the file on disk is as small as the plan
says; ``fitformer.json`` records ``"weights": "packed"`` and loading unpacks them into a frozen model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from transformers import AutoConfig, AutoModelForSequenceClassification

from ..compress import CompressionPlan, apply_plan
from ..data import TextDataset, encode
from ..errors import UserError
from ..models.hf import FITFORMER_META, load_tokenizer
from .quantized import freeze_structure, is_frozen_quantized, load_into, read_quantized, save_quantized

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
PACKED = "packed"  # fitformer.json "weights": integer codes packed by save_quantized


def save_compressed(
    model: torch.nn.Module, plan: CompressionPlan, tokenizer, out_dir: str | Path, meta: dict[str, Any],
    base_config: Any = None,
) -> Path:
    """Write a compressed classifier to ``out_dir`` atomically (a temporary directory renamed into place).

    ``base_config`` is the config of the dense model the plan was applied to (default: ``model.config``,
    right unless the plan has model steps such as sub-network extraction, which change the model's config).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (base_config if base_config is not None else model.config).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2) + "\n", encoding="utf-8")
        if is_frozen_quantized(model):
            save_quantized(model, tmp / WEIGHTS_FILE)
            meta = {**meta, "weights": PACKED}
        else:
            save_model(model, str(tmp / WEIGHTS_FILE))
        (tmp / FITFORMER_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_compressed(model_dir: str | Path) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_compressed`; returns (model in eval mode, tokenizer, metadata)."""
    path = Path(model_dir)
    for required in ("config.json", PLAN_FILE, WEIGHTS_FILE, FITFORMER_META):
        if not (path / required).exists():
            raise UserError(f"{path}: no {required}; pass a directory written by fitformer export or compress")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    base = AutoModelForSequenceClassification.from_config(config)  # structure; weights overwritten below
    plan = CompressionPlan.from_dict(json.loads((path / PLAN_FILE).read_text(encoding="utf-8")))
    model = apply_plan(base, plan)
    meta = json.loads((path / FITFORMER_META).read_text(encoding="utf-8"))
    if meta.get("weights") == PACKED:
        state, _ = read_quantized(path / WEIGHTS_FILE)
        return load_into(freeze_structure(model), state).eval(), load_tokenizer(path), meta
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the plan (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); the directory is damaged, export it again")
    model.eval()
    return model, load_tokenizer(path), meta


@dataclass
class CompressedClassifier:
    """A loaded classifier that predicts labels for raw texts."""

    model: torch.nn.Module
    tokenizer: Any
    meta: dict[str, Any]

    @property
    def label_names(self) -> list[str]:
        return list(self.meta["label_names"])

    @torch.inference_mode()
    def predict_proba(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> torch.Tensor:
        """Class probabilities, one row per text."""
        if isinstance(texts, str):
            raise UserError("predict takes a list of texts, e.g. predict(['a fine film'])")
        data = TextDataset(texts=list(texts), labels=[0] * len(texts), label_names=self.label_names, pair_texts=pairs)
        encoded = encode(self.tokenizer, data, self.meta.get("max_length", 128), use_cache=False)
        from ..train.evaluate import predict_logits

        return predict_logits(self.model, encoded, batch_size).softmax(dim=-1)

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[str]:
        """The predicted label name of each text."""
        return [self.label_names[i] for i in self.predict_proba(texts, pairs).argmax(dim=-1).tolist()]


def load(path: str | Path) -> CompressedClassifier:
    """Load a compressed model from its directory or from a run directory (which holds ``model/``)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such directory; pass a run directory or an exported model directory")
    if (path / "model" / PLAN_FILE).exists():
        path = path / "model"
    return CompressedClassifier(*load_compressed(path))
