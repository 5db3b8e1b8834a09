"""Fine-tuning, evaluation and the cached dense teacher."""

from .evaluate import EvalResult, evaluate, metrics_from_predictions, model_logits, predict_logits
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .teacher import Teacher, get_teacher

__all__ = [
    "EvalResult",
    "FinetuneConfig",
    "FinetuneResult",
    "Teacher",
    "evaluate",
    "finetune",
    "get_teacher",
    "metrics_from_predictions",
    "model_logits",
    "predict_logits",
]
