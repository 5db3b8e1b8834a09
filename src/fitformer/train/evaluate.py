"""Accuracy, macro-F1, per-class counts and the confusion matrix of a classifier on encoded data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..data.tokenize import EncodedDataset


@dataclass
class EvalResult:
    """Classification metrics; ``confusion[i][j]`` counts true class i predicted as j."""

    accuracy: float
    macro_f1: float
    examples: int
    label_names: list[str]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]

    def to_dict(self) -> dict:
        return asdict(self)


def model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a Hugging Face classifier (or any module returning logits) for one batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, data: EncodedDataset, batch_size: int = 128) -> torch.Tensor:
    """Logits for every row of ``data``, in order, with the model in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model_logits(model, b).float() for b in data.batches(batch_size)])
    finally:
        model.train(was_training)


def metrics_from_predictions(
    predictions: torch.Tensor, labels: torch.Tensor, label_names: list[str]
) -> EvalResult:
    """Metrics from predicted and true class indices."""
    k = len(label_names)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((labels.long(), predictions.long()), torch.ones_like(labels.long()), accumulate=True)
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for i, name in enumerate(label_names):
        tp = int(confusion[i, i])
        support = int(confusion[i].sum())
        predicted = int(confusion[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        per_class[name] = {"support": support, "predicted": predicted, "precision": precision,
                           "recall": recall, "f1": f1}
    n = int(labels.numel())
    return EvalResult(
        accuracy=float((predictions == labels).float().mean()) if n else 0.0,
        macro_f1=sum(f1s) / k,
        examples=n,
        label_names=list(label_names),
        per_class=per_class,
        confusion=confusion.tolist(),
    )


def evaluate(
    model: torch.nn.Module, data: EncodedDataset, label_names: list[str], batch_size: int = 128
) -> EvalResult:
    """Evaluate a classifier on encoded data."""
    predictions = predict_logits(model, data, batch_size).argmax(dim=-1)
    return metrics_from_predictions(predictions, data.labels, label_names)
