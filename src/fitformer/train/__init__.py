"""Fine-tuning, evaluation, the cached dense teacher, and distillation."""

from .distill import (
    SCHEDULES,
    DistillConfig,
    DistillData,
    DistillResult,
    Stage,
    StepHook,
    build_stages,
    distill,
)
from .evaluate import EvalResult, evaluate, metrics_from_predictions, model_logits, predict_logits
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .losses import LayerMap, LossWeights, Outputs
from .teacher import Teacher, get_teacher

__all__ = [
    "SCHEDULES",
    "DistillConfig",
    "DistillData",
    "DistillResult",
    "EvalResult",
    "FinetuneConfig",
    "FinetuneResult",
    "LayerMap",
    "LossWeights",
    "Outputs",
    "Stage",
    "StepHook",
    "Teacher",
    "build_stages",
    "distill",
    "evaluate",
    "finetune",
    "get_teacher",
    "metrics_from_predictions",
    "model_logits",
    "predict_logits",
]
