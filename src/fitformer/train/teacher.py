"""The dense teacher: a classifier fine-tuned once per (model, data, split, hyper-parameters) and cached.

Every later stage (compression, distillation, benchmarks) asks for the teacher here, so the expensive
fine-tuning happens once per machine and a second call is instant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import EncodedDataset, Splits, TextDataset, encode, load_task, split_dataset
from ..errors import UserError
from ..io import cache_root, file_lock, sha256_file, sha256_json
from ..models import load_classifier, resolve_model_dir
from ..utils import seed_everything
from .evaluate import EvalResult, evaluate
from .finetune import FinetuneConfig, FinetuneResult, finetune


@dataclass
class Teacher:
    """A fine-tuned classifier with its tokenizer and the data splits it was trained on."""

    model: torch.nn.Module
    tokenizer: Any
    splits: Splits
    config: FinetuneConfig
    result: FinetuneResult

    @property
    def label_names(self) -> list[str]:
        return self.splits.train.label_names

    @property
    def model_dir(self) -> Path:
        return Path(self.result.best_dir)

    def encoded(self, split: str, max_length: int | None = None) -> EncodedDataset:
        """Tokenised split ('train', 'validation' or 'test'), cached on disk."""
        return encode(self.tokenizer, self.splits[split], max_length or self.config.max_length)

    def evaluate(self, split: str = "test", model: torch.nn.Module | None = None) -> EvalResult:
        """Metrics of the teacher (or of ``model``, e.g. a compressed student) on a split."""
        return evaluate(model if model is not None else self.model, self.encoded(split), self.label_names)


def model_fingerprint(model_dir: Path) -> str:
    """Content hash of a model directory's config and weights."""
    files = [model_dir / "config.json"] + [p for p in (model_dir / "model.safetensors",
                                                       model_dir / "pytorch_model.bin") if p.exists()]
    return sha256_json([sha256_file(p) for p in files])


def teacher_cache_dir(model_dir: Path, data: TextDataset, splits: Splits, config: FinetuneConfig) -> Path:
    """Where the teacher for these inputs is cached."""
    key = sha256_json([model_fingerprint(model_dir), data.content_hash(), splits.manifest["split_hash"],
                       asdict(config)])
    return cache_root() / "teachers" / key[:24]


def get_teacher(
    model: str | Path | None = None,
    task: str | None = None,
    data: TextDataset | None = None,
    config: FinetuneConfig | None = None,
    split_seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool | None = None,
) -> Teacher:
    """Fine-tune (or load the cached) teacher for ``model`` on ``task`` (or on ``data``).

    The defaults are the built-in MiniLM-L6 on rotten-tomatoes. ``out_dir`` overrides the cache location.
    """
    config = config or FinetuneConfig()
    config.validate()
    dataset = data if data is not None else load_task(task)
    splits = split_dataset(dataset, seed=split_seed)
    model_dir = resolve_model_dir(model)
    out = Path(out_dir) if out_dir is not None else teacher_cache_dir(model_dir, dataset, splits, config)
    with file_lock(out.with_name(out.name + ".lock")):  # one process trains, the others wait and reuse
        return _fit_or_load(model_dir, dataset, splits, config, out, progress)


def _fit_or_load(
    model_dir: Path, dataset: TextDataset, splits: Splits, config: FinetuneConfig, out: Path,
    progress: bool | None,
) -> Teacher:
    done = out / "result.json"
    if done.exists():
        result = finetune(None, None, None, None, [], config, out)  # type: ignore[arg-type]  # cache hit
        try:
            net, tokenizer = load_classifier(result.best_dir)
        except UserError as exc:
            raise UserError(f"{exc}; the cached teacher ({Path(result.best_dir) / 'model.safetensors'}) is "
                            f"damaged: delete {out} to train it again") from None
        return Teacher(net, tokenizer, splits, config, result)
    seed_everything(config.seed)  # the new classification head is initialised from the seed
    net, tokenizer = load_classifier(model_dir, num_labels=dataset.num_labels, label_names=dataset.label_names)
    train = encode(tokenizer, splits.train, config.max_length)
    validation = encode(tokenizer, splits.validation, config.max_length)
    meta = {"base_model": str(model_dir), "data": dataset.source, "split": splits.manifest}
    result = finetune(net, tokenizer, train, validation, dataset.label_names, config, out, meta, progress)
    best, tokenizer = load_classifier(result.best_dir)
    return Teacher(best, tokenizer, splits, config, result)
