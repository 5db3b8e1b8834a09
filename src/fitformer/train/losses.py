"""Knowledge-distillation losses between a student and its teacher, and the map between their layers.

The intermediate losses follow TinyBERT (Jiao et al. 2020, eqs. 7-10): hidden states (and the embedding
output) are matched after a learned projection ``W_h`` where widths differ, student layer ``m`` is matched
to teacher layer ``g(m) = m * N / M``; attention is matched as a KL divergence between attention
probabilities (MiniLM, Wang et al. 2020, eq. 4). The prediction layer is matched with the temperature-scaled
KL of Hinton et al. 2015 (multiplied by ``T**2`` so gradients keep their scale across temperatures).

Every loss is zero when the student is the teacher; all token-level losses ignore padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .augment import IGNORE_LABEL

# fisher: mse measured in the directions the teacher's task loss reads at each hidden state (LayerMap.measure_in)
HIDDEN_LOSSES = ("mse", "cosine", "fisher")


@dataclass
class Outputs:
    """What distillation reads from a forward pass: logits, hidden states (embedding output first) and,
    when asked for, attention probabilities (one ``(batch, heads, query, key)`` tensor per layer)."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] = ()
    attentions: tuple[torch.Tensor, ...] = ()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1 (``mask`` broadcasts to ``values``)."""
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
               metric: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per hidden unit over real tokens (TinyBERT eq. 8). Shapes ``(B, L, D)``, mask ``(B, L)``;
    ``metric`` ``(D, D)`` measures each token's error as ``||(s - t) M||`` instead of the plain norm."""
    error = student - teacher
    if metric is not None:
        error = error @ metric.to(error)  # the error's dtype and device
    return _masked_mean(error.pow(2).mean(dim=-1), mask)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - cos(student, teacher)`` per token, averaged over real tokens; blind to the scale of the states."""
    return _masked_mean(1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8), mask)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``KL(teacher || student)`` of attention probabilities per query row (MiniLM eq. 4), averaged over
    heads and real query tokens. Where the head counts differ, the head-averaged maps are compared."""
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    kl = (torch.xlogy(teacher, teacher) - teacher * torch.log(student.clamp_min(eps))).sum(dim=-1)
    return _masked_mean(kl, mask[:, None, :])


def logits_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft-target loss ``T**2 * KL(softmax(t / T) || softmax(s / T))`` per example (Hinton et al. 2015)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def task_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the true labels; examples labelled ``IGNORE_LABEL`` (augmented ones whose label
    may no longer hold) do not count, and a batch with none left contributes zero."""
    if not bool((labels != IGNORE_LABEL).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL)


def teacher_layer(student_layer: int, student_depth: int, teacher_depth: int) -> int:
    """TinyBERT's uniform map ``g(m) = m * N / M`` rounded, with 0 (embedding output) mapped to 0."""
    if student_layer == 0:
        return 0
    return min(max((student_layer * teacher_depth + student_depth // 2) // student_depth, 1), teacher_depth)


class LayerMap(nn.Module):
    """Which teacher hidden state each student hidden state is matched to, and the learned projections
    ``W_h`` (student width -> teacher width) used where the widths differ. Its parameters train with the
    student and are thrown away afterwards."""

    def __init__(self, student_depth: int, teacher_depth: int, student_width: int, teacher_width: int) -> None:
        super().__init__()
        if student_depth < 1 or teacher_depth < 1:
            raise UserError(f"layer map needs at least one layer on each side (student {student_depth}, "
                            f"teacher {teacher_depth}); check the models' hidden states")
        self.student_depth, self.teacher_depth = student_depth, teacher_depth
        self.student_width, self.teacher_width = student_width, teacher_width
        self.pairs = [(m, teacher_layer(m, student_depth, teacher_depth)) for m in range(student_depth + 1)]
        self.metrics: list[torch.Tensor] | None = None  # per teacher hidden state; set by measure_in
        self.projections = nn.ModuleList()
        if student_width != teacher_width:
            for _ in self.pairs:
                proj = nn.Linear(student_width, teacher_width, bias=False)
                with torch.no_grad():  # start as a (truncated or padded) identity: widths are usually nested
                    proj.weight.copy_(torch.eye(teacher_width, student_width))
                self.projections.append(proj)

    @classmethod
    def infer(cls, student: Outputs, teacher: Outputs) -> LayerMap:
        """A map sized from one forward pass of each model (works for any depth or width)."""
        if not student.hidden_states or not teacher.hidden_states:
            raise UserError("distillation needs hidden states from both models; pass models that accept "
                            "output_hidden_states=True (Hugging Face encoders do)")
        return cls(len(student.hidden_states) - 1, len(teacher.hidden_states) - 1,
                   student.hidden_states[0].shape[-1], teacher.hidden_states[0].shape[-1])

    def teacher_index(self, student_layer: int) -> int:
        return self.pairs[student_layer][1]

    def measure_in(self, metrics: list[torch.Tensor]) -> None:
        """Measure the error at each teacher hidden state (embedding output first) in its ``(width, width)``
        metric, e.g. :func:`fitformer.models.gradients.direction_metric` of the task loss's gradients there
        (``hidden_loss="fisher"``); kept out of the state dict, since the teacher gives it again."""
        if len(metrics) != self.teacher_depth + 1:
            raise UserError(f"{len(metrics)} hidden-state metrics for a teacher with {self.teacher_depth + 1} "
                            "hidden states (embedding output first); give one per hidden state")
        for m in metrics:
            if tuple(m.shape) != (self.teacher_width, self.teacher_width):
                raise UserError(f"a hidden-state metric is {tuple(m.shape)}; the teacher's width needs "
                                f"({self.teacher_width}, {self.teacher_width})")
        self.metrics = [m.detach().float() for m in metrics]

    def metric(self, student_layer: int) -> torch.Tensor | None:
        """The metric of the teacher hidden state that ``student_layer`` is matched to (None: plain norm)."""
        return None if self.metrics is None else self.metrics[self.teacher_index(student_layer)]

    def project(self, student_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The student's hidden state in the teacher's width."""
        return self.projections[student_layer](hidden) if len(self.projections) else hidden


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; a zero weight skips the term (and its cost, e.g. eager attention)."""

    embedding: float = 1.0
    hidden: float = 1.0
    attention: float = 1.0
    logits: float = 1.0
    task: float = 1.0
    temperature: float = 1.0
    hidden_loss: str = "mse"

    def validate(self) -> None:
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise UserError(f"hidden loss '{self.hidden_loss}': use one of {', '.join(HIDDEN_LOSSES)}")
        if self.temperature <= 0:
            raise UserError(f"temperature {self.temperature}: must be positive, e.g. 1.0 or 2.0")
        for name in ("embedding", "hidden", "attention", "logits", "task"):
            if getattr(self, name) < 0:
                raise UserError(f"loss weight {name}={getattr(self, name)}: must be zero or positive")


def intermediate_loss(
    student: Outputs, teacher: Outputs, layer_map: LayerMap, mask: torch.Tensor, layers: tuple[int, ...],
    weights: LossWeights,
) -> dict[str, torch.Tensor]:
    """Embedding-output, hidden-state and attention losses for the student ``layers`` (0 = embedding output);
    each term is averaged over the layers it covers."""
    if weights.hidden_loss == "fisher" and layer_map.metrics is None:
        raise UserError("hidden_loss='fisher' needs the teacher's hidden-state metrics; call "
                        "layer_map.measure_in(...) first (distill does)")

    def hidden_fn(m: int) -> torch.Tensor:
        student_state = layer_map.project(m, student.hidden_states[m])
        teacher_state = teacher.hidden_states[layer_map.teacher_index(m)]
        if weights.hidden_loss == "cosine":
            return hidden_cosine(student_state, teacher_state, mask)
        return hidden_mse(student_state, teacher_state, mask,
                          layer_map.metric(m) if weights.hidden_loss == "fisher" else None)

    parts: dict[str, torch.Tensor] = {}
    if 0 in layers and weights.embedding > 0:
        parts["embedding"] = weights.embedding * hidden_fn(0)
    deep = [m for m in layers if m > 0]
    if deep and weights.hidden > 0:
        parts["hidden"] = weights.hidden * torch.stack([hidden_fn(m) for m in deep]).mean()
    if deep and weights.attention > 0:
        parts["attention"] = weights.attention * torch.stack([
            attention_kl(student.attentions[m - 1], teacher.attentions[layer_map.teacher_index(m) - 1], mask)
            for m in deep]).mean()
    return parts


def prediction_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, weights: LossWeights,
    use_logits: bool, use_task: bool,
) -> dict[str, torch.Tensor]:
    """Soft-target KL (when ``use_logits``) and task cross-entropy (when ``use_task``), weighted."""
    parts: dict[str, torch.Tensor] = {}
    if use_logits and teacher_logits is not None and weights.logits > 0:
        parts["logits"] = weights.logits * logits_kl(student_logits, teacher_logits, weights.temperature)
    if use_task and weights.task > 0:
        parts["task"] = weights.task * task_ce(student_logits, labels)
    return parts
