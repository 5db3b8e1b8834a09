"""Distilling a compressed student from its dense teacher, in stages, within a step and time budget.

Schedules (``DistillConfig.schedule``):

- ``finetune_only`` — task cross-entropy only (the baseline without a teacher).
- ``logits_kd`` — soft-target KL on the logits plus the task loss (Hinton et al. 2015).
- ``two_stage`` — HEAT (Gu et al. 2022, sec. 4.3): stage 1 matches the intermediate layers only (embedding
  output, hidden states, attention), stage 2 the logits plus the task loss.
- ``progressive`` — QAT-TT (Yang et al. 2023): layer-by-layer, first layer 1, then layers 1..2, and so on,
  then the logits with a lower learning rate. While stage k runs, only the first k student layers (and the
  teacher layers they map to) are computed, so early stages are cheap.

The loop reads top to bottom: for each stage, take batches from one seeded data stream, compute the
teacher's outputs (logits cached per example where no augmentation changes the input), the student's
outputs, the stage's losses, step AdamW, call the optional ``hook`` (e.g. a gradual pruning schedule),
checkpoint, and in stages that train the classifier evaluate on validation for early stopping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.tokenize import EncodedDataset
from ..errors import UserError
from ..io import atomic_path, read_json, sha256_json, without_later_defaults, write_json_atomic
from ..models.gradients import direction_metric, hidden_state_fisher
from ..models.hf import eager_attention
from ..progress import console, make_progress
from ..utils import seed_everything
from .augment import NeighbourSwap, word_dropout
from .average import WeightAverage
from .evaluate import evaluate
from .finetune import load_checkpoint, nonfinite_origin, require_same_model, save_checkpoint
from .losses import HIDDEN_LOSSES, LayerMap, LossWeights, Outputs, intermediate_loss, prediction_loss

SCHEDULES = ("finetune_only", "logits_kd", "two_stage", "progressive")

StepHook = Callable[[nn.Module, int, float], None]
"""Called after every optimizer step as ``hook(student, global_step, progress)``, ``progress`` in [0, 1]
over the whole run; a gradual pruning schedule updates its masks here."""


@dataclass
class DistillConfig:
    """Schedule, budget and loss weights of a distillation run (all of them enter the run's identity).

    The budget is ``max_steps`` (or ``epochs`` over the training data when unset) and, when given,
    ``budget_minutes``; each stage gets its share of both and ends at whichever comes first.
    """

    schedule: str = "logits_kd"  # the best measured (benchmarks/bench_distill.py at lr 4e-4, docs/distillation.md)
    budget_minutes: float | None = None
    max_steps: int | None = None
    epochs: float = 3.0
    intermediate_share: float = 0.5
    final_lr_scale: float = 0.5
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 1.0
    embedding_weight: float = 1.0
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    logits_weight: float = 1.0
    task_weight: float = 1.0
    hidden_loss: str = "mse"
    # hidden_loss "fisher": training examples on which the teacher's task-loss gradients give each metric
    fisher_examples: int = 1024
    word_dropout: float = 0.0
    # > 0: this share of training examples has words swapped for embedding-space neighbours (train/augment.py),
    # learnt from the teacher's soft labels alone
    neighbour_swap: float = 0.0
    # > 0: validate, keep and ship the moving average of the weights (train/average.py); 0.99 measured best
    # on the size run's student (docs/distillation.md)
    ema_decay: float = 0.99
    group_by_length: int = 50  # sort each chunk of this many batches by length; 0: random batches
    eval_every_steps: int = 100
    patience: int = 0
    checkpoint_every_steps: int = 100
    seed: int = 0

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule '{self.schedule}': use one of {', '.join(SCHEDULES)}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise UserError(f"budget {self.budget_minutes} minutes: must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"max steps {self.max_steps}: must be at least 1")
        if self.epochs <= 0:
            raise UserError(f"epochs={self.epochs}: must be positive")
        if not 0 < self.intermediate_share < 1:
            raise UserError(f"intermediate share {self.intermediate_share}: must be in (0, 1), e.g. 0.5")
        if not 0 < self.final_lr_scale <= 1:
            raise UserError(f"final learning-rate scale {self.final_lr_scale}: must be in (0, 1]")
        if self.batch_size < 1:
            raise UserError(f"batch size {self.batch_size}: must be at least 1")
        if not 0 < self.learning_rate < 1:
            raise UserError(f"learning rate {self.learning_rate}: must be in (0, 1), e.g. 1e-4")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warm-up ratio {self.warmup_ratio}: must be in [0, 1)")
        if not 0 <= self.word_dropout < 0.5:
            raise UserError(f"word dropout {self.word_dropout}: must be in [0, 0.5)")
        if not 0 <= self.neighbour_swap <= 1:
            raise UserError(f"neighbour_swap {self.neighbour_swap}: must be a share of examples in [0, 1], e.g. 0.5")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"ema_decay {self.ema_decay}: must be 0 (off) or in (0, 1), e.g. 0.99")
        if self.group_by_length < 0:
            raise UserError(f"group_by_length {self.group_by_length}: must be 0 (random batches) or a number of "
                            "batches to sort by length, e.g. 50")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise UserError(f"hidden loss '{self.hidden_loss}': use one of {', '.join(HIDDEN_LOSSES)}")
        if self.fisher_examples < 1:
            raise UserError(f"fisher_examples {self.fisher_examples}: must be at least 1, e.g. 1024")
        if self.eval_every_steps < 1 or self.checkpoint_every_steps < 1:
            raise UserError("eval_every_steps and checkpoint_every_steps must be at least 1")
        if self.patience < 0:
            raise UserError(f"patience {self.patience}: must be 0 (off) or a number of evaluations")
        w = self.weights()
        w.validate()
        if self.schedule in ("two_stage", "progressive") and not (w.embedding or w.hidden or w.attention):
            raise UserError(f"schedule '{self.schedule}' needs a positive embedding, hidden or attention weight")
        if not (w.task or (w.logits and self.schedule != "finetune_only")):
            raise UserError("the prediction stage has no loss; give task_weight (or logits_weight) > 0")

    def weights(self) -> LossWeights:
        return LossWeights(self.embedding_weight, self.hidden_weight, self.attention_weight, self.logits_weight,
                           self.task_weight, self.temperature, self.hidden_loss)


@dataclass(frozen=True)
class Stage:
    """One stage of a schedule: which student hidden states it matches (0 = embedding output), whether it
    trains the prediction (soft targets, task loss), its share of the budget and learning-rate scale."""

    name: str
    layers: tuple[int, ...] = ()
    logits: bool = False
    task: bool = False
    share: float = 1.0
    lr_scale: float = 1.0

    @property
    def trains_head(self) -> bool:
        return self.logits or self.task


def build_stages(schedule: str, student_depth: int, config: DistillConfig) -> list[Stage]:
    """The stages of ``schedule`` for a student with ``student_depth`` layers."""
    inter = config.intermediate_share
    if schedule == "finetune_only":
        return [Stage("task", task=True)]
    if schedule == "logits_kd":
        return [Stage("logits", logits=True, task=True)]
    if schedule == "two_stage":
        return [Stage("intermediate", layers=tuple(range(student_depth + 1)), share=inter),
                Stage("logits", logits=True, task=True, share=1 - inter)]
    if schedule == "progressive":
        return [Stage(f"layers 1..{k}", layers=tuple(range(k + 1)), share=inter / student_depth)
                for k in range(1, student_depth + 1)] + [
            Stage("logits", logits=True, task=True, share=1 - inter, lr_scale=config.final_lr_scale)]
    raise UserError(f"schedule '{schedule}': use one of {', '.join(SCHEDULES)}")


@dataclass
class DistillData:
    """Tokenised training and validation data with the class names."""

    train: EncodedDataset
    validation: EncodedDataset
    label_names: list[str]
    vocab: list[str] | None = None  # token strings by id (what neighbour_swap needs)

    @classmethod
    def from_teacher(cls, teacher: Any, max_train_examples: int | None = None, seed: int = 0) -> DistillData:
        """The splits a :class:`~fitformer.train.Teacher` was trained on (optionally a seeded subset of train)."""
        train = teacher.encoded("train")
        if max_train_examples is not None and max_train_examples < len(train):
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
            train = train.select(pick[:max_train_examples])
        rows = teacher.model.get_input_embeddings().weight.shape[0]
        vocab = [t or "" for t in teacher.tokenizer.convert_ids_to_tokens(list(range(rows)))]
        return cls(train, teacher.encoded("validation"), teacher.label_names, vocab)


@dataclass
class DistillResult:
    """Outcome: best validation accuracy and where its weights are, per-stage steps and seconds."""

    schedule: str
    best_dir: str
    validation_accuracy: float
    best_step: int
    steps: int
    seconds: float
    stopped_early: bool
    stages: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def forward_outputs(model: nn.Module, batch: dict[str, torch.Tensor], hidden: bool, attentions: bool) -> Outputs:
    """Run a Hugging Face-style classifier, asking for hidden states / attention probabilities as needed."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if hidden or attentions:
        inputs.update(output_hidden_states=hidden, output_attentions=attentions)
    out = model(**inputs)
    if not hasattr(out, "logits"):
        return Outputs(logits=out)
    return Outputs(out.logits, tuple(out.hidden_states or ()) if hidden else (),
                   tuple(out.attentions or ()) if attentions else ())


def _encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    encoder = getattr(getattr(model, "base_model", model), "encoder", None)
    layers = getattr(encoder, "layer", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def encoder_depth(model: nn.Module) -> int | None:
    """Number of encoder layers of a BERT-style model (None when the layout is not recognised)."""
    layers = _encoder_layers(model)
    return len(layers) if layers is not None else None


@contextlib.contextmanager
def truncated(model: nn.Module, depth: int | None) -> Iterator[None]:
    """Run only the first ``depth`` encoder layers (a no-op for unrecognised layouts or ``None``): a
    progressive stage that matches layers 1..k needs nothing above layer k."""
    encoder = getattr(getattr(model, "base_model", model), "encoder", None)
    layers = _encoder_layers(model)
    if depth is None or layers is None or depth >= len(layers):
        yield
        return
    encoder.layer = nn.ModuleList(list(layers)[:depth])
    try:
        yield
    finally:
        encoder.layer = layers


class _LogitCache:
    """Teacher logits per training example, filled as batches pass: a second epoch costs no teacher pass."""

    def __init__(self, n: int) -> None:
        self.values: torch.Tensor | None = None
        self.filled = torch.zeros(n, dtype=torch.bool)

    def get(self, index: torch.Tensor) -> torch.Tensor | None:
        if self.values is None or not bool(self.filled[index].all()):
            return None
        return self.values[index]

    def put(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        if self.values is None:
            self.values = torch.zeros(len(self.filled), logits.shape[-1])
        self.values[index] = logits.detach().float()
        self.filled[index] = True


def _neighbour_swap(teacher: nn.Module, data: DistillData) -> NeighbourSwap:
    if data.vocab is None:
        raise UserError("neighbour_swap needs the tokenizer's vocabulary: build DistillData with vocab= "
                        "(DistillData.from_teacher does), or set neighbour_swap to 0")
    used = data.train.token_counts(len(data.vocab)) > 0
    return NeighbourSwap.build(teacher.get_input_embeddings().weight, data.vocab, used)


def _stream(data: EncodedDataset, batch_size: int, seed: int, state: dict[str, Any], group_by_length: int = 0
            ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Endless seeded batches (row indices and batch); epoch ``e``'s order is seeded by ``seed, e``.
    ``state['epoch']`` and ``state['step_in_epoch']`` say where it stands, so a resumed run sees the same
    batches in the same order."""
    while True:
        generator = torch.Generator().manual_seed(seed * 1000 + state["epoch"])
        order = data.epoch_order(batch_size, generator, group_by_length)
        batches = math.ceil(len(data) / batch_size)
        while state["step_in_epoch"] < batches:
            start = state["step_in_epoch"] * batch_size
            index = order[start : start + batch_size]
            yield index, data.batch(index)
        state["epoch"] += 1
        state["step_in_epoch"] = 0


def _lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of a stage, then linear decay to zero."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return max(1.0 - progress, 0.0)


# settings added after runs were made, with the value that leaves results as before
_ADDED_LATER = {"neighbour_swap": 0.0, "fisher_examples": 1024}


def _run_id(config: DistillConfig, stages: list[Stage]) -> str:
    return sha256_json([without_later_defaults(asdict(config), _ADDED_LATER), [asdict(s) for s in stages]])[:16]


def _hidden_metrics(teacher: nn.Module, train: EncodedDataset, config: DistillConfig) -> list[torch.Tensor]:
    """The direction metric of each teacher hidden state, from its task-loss gradients on
    ``config.fisher_examples`` seeded training rows (``hidden_loss="fisher"``)."""
    started = time.perf_counter()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
    moments = hidden_state_fisher(teacher, train.select(order[:config.fisher_examples]).batches(config.batch_size))
    examples = min(config.fisher_examples, len(train))
    console.print(f"hidden-state metrics from the teacher's task-loss gradients on {examples} training examples "
                  f"in {time.perf_counter() - started:.0f} s")
    return [direction_metric(m) for m in moments]


def _state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict safetensors can write: contiguous, and no two entries sharing memory."""
    seen: set[int] = set()
    out = {}
    for k, v in module.state_dict().items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else id(v)
        out[k] = v.detach().contiguous() if ptr not in seen else v.detach().clone().contiguous()
        seen.add(ptr)
    return out


def _save_best(module: nn.Module, out: Path, meta: dict[str, Any]) -> None:
    with atomic_path(out / "best" / "model.safetensors") as tmp:
        save_file(_state_dict(module), str(tmp))
    write_json_atomic(out / "best" / "fitformer.json", meta)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: DistillData,
    config: DistillConfig | None = None,
    out_dir: str | Path = "distill",
    hook: StepHook | None = None,
    progress: bool | None = None,
) -> DistillResult:
    """Distil ``teacher`` into ``student`` (trained in place) following ``config.schedule``.

    The student is any module with the teacher's interface (a Hugging Face classifier, or one produced by
    ``apply_plan``: TT, low-rank, quantized with trainable scales, pruned, a sub-network): all its
    parameters train. Its best validation weights (with ``config.ema_decay``, those of the moving average
    of the weights) end up in the student and in ``out_dir/best``. A finished
    run (``out_dir/result.json``) is returned at once, with those weights loaded; an interrupted one resumes
    from ``out_dir/last`` at the same step with the same data order.
    """
    config = config or DistillConfig()
    config.validate()
    if len(data.train) < 1 or len(data.validation) < 1:
        raise UserError("distillation needs training and validation examples; check the data splits")
    out = Path(out_dir)
    seed_everything(config.seed)
    teacher.eval()
    weights = config.weights()
    layered = config.schedule in ("two_stage", "progressive")
    need_attn = layered and weights.attention > 0
    layer_map = None
    if layered:  # one dry batch sizes the layer map (depth and width of each side) before the optimizer
        probe = data.train.batch(torch.arange(min(2, len(data.train))))
        with torch.no_grad():
            layer_map = LayerMap.infer(forward_outputs(student, probe, True, False),
                                       forward_outputs(teacher, probe, True, False))
    stages = build_stages(config.schedule, layer_map.student_depth if layer_map else 1, config)
    run_id = _run_id(config, stages)
    done = out / "result.json"
    if done.exists():
        result = DistillResult(**read_json(done))
        if read_json(out / "best" / "fitformer.json").get("run_id") != run_id:
            raise UserError(f"{out} holds a finished run with other settings; pass a new output directory")
        require_same_model(out / "best" / "model.safetensors", student, f"{out} holds a finished run")
        try:
            student.load_state_dict(load_file(str(out / "best" / "model.safetensors")))
            return result
        except (SafetensorError, OSError):  # damaged best weights: distil again, never load them
            console.print(f"{out / 'best' / 'model.safetensors'} is damaged; distilling again")
            done.unlink()
            shutil.rmtree(out / "last", ignore_errors=True)
    if layer_map is not None and weights.hidden_loss == "fisher":  # not for a finished run, returned above
        layer_map.measure_in(_hidden_metrics(teacher, data.train, config))

    steps_per_epoch = data.train.num_batches(config.batch_size)
    total_steps = config.max_steps or max(math.ceil(config.epochs * steps_per_epoch), len(stages))
    stage_steps = [max(1, round(s.share * total_steps)) for s in stages]
    budget_s = None if config.budget_minutes is None else config.budget_minutes * 60.0
    average = WeightAverage(student, config.ema_decay) if config.ema_decay > 0 else None
    bundle = nn.ModuleDict({"student": student, **({"layer_map": layer_map} if layer_map else {}),
                            **({"average": average} if average is not None else {})})
    no_decay = ("bias", "LayerNorm.weight", "layernorm", "norm", "scale")
    params = [(n, p) for n, p in bundle.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in params if not any(k in n for k in no_decay)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in params if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ], lr=config.learning_rate)
    state = load_checkpoint(out, bundle, optimizer, None)
    if state is not None and state.get("run_id") != run_id:
        raise UserError(f"{out} holds an unfinished run with other settings; pass a new output directory "
                        "or delete it to start over")
    state = state or {"run_id": run_id, "stage": 0, "stage_step": 0, "stage_seconds": 0.0, "global_step": 0,
                      "epoch": 0, "step_in_epoch": 0, "seconds": 0.0, "best_accuracy": -1.0, "best_step": -1,
                      "bad_evals": 0, "stopped_early": False, "stages": [], "history": []}
    if state["global_step"]:
        console.print(f"resuming distillation at stage {state['stage'] + 1}/{len(stages)}, "
                      f"step {state['global_step']}")
    cache = _LogitCache(len(data.train))
    swap = _neighbour_swap(teacher, data) if config.neighbour_swap > 0 else None
    augmenting = swap is not None or config.word_dropout > 0
    batches = _stream(data.train, config.batch_size, config.seed, state, config.group_by_length)
    meta = {"run_id": run_id, "schedule": config.schedule, "distill": asdict(config)}

    def checkpoint() -> None:
        save_checkpoint(out, bundle, optimizer, None, state)

    def validate_now() -> None:
        with average.applied(student) if average is not None else contextlib.nullcontext():
            result = evaluate(student, data.validation, data.label_names)
            state["history"].append({"step": state["global_step"], "stage": stages[state["stage"]].name,
                                     "validation_accuracy": result.accuracy})
            if result.accuracy > state["best_accuracy"]:
                state["best_accuracy"], state["best_step"] = result.accuracy, state["global_step"]
                state["bad_evals"] = 0
                _save_best(student, out, {**meta, "validation_accuracy": result.accuracy,
                                          "step": state["global_step"]})
            else:
                state["bad_evals"] += 1

    student.train()
    total_for_bar = None if budget_s is not None else sum(stage_steps)
    with make_progress(progress) as bar, eager_attention(student, teacher) if need_attn else contextlib.nullcontext():
        task = bar.add_task(f"distil ({config.schedule})", total=total_for_bar, completed=state["global_step"],
                            rate="")
        while state["stage"] < len(stages) and not state["stopped_early"]:
            index = state["stage"]
            stage = stages[index]
            limit_s = None if budget_s is None else stage.share * budget_s
            depth = max(stage.layers) if stage.layers and not stage.trains_head else None
            teacher_depth = layer_map.teacher_index(depth) if depth and layer_map else None
            attn = need_attn and bool(stage.layers)
            t0 = time.perf_counter() - state["stage_seconds"]
            bar.update(task, description=f"distil ({config.schedule}: {stage.name})")
            while state["stage_step"] < stage_steps[index]:
                elapsed = time.perf_counter() - t0
                if limit_s is not None and elapsed >= limit_s:
                    break
                rows, batch = next(batches)
                if augmenting:
                    gen = torch.Generator().manual_seed(config.seed * 7919 + state["global_step"])
                    if swap is not None:
                        batch = swap(batch, config.neighbour_swap, gen)
                    if config.word_dropout > 0:
                        batch = word_dropout(batch, config.word_dropout, gen)
                mask = batch["attention_mask"]
                teacher_out, teacher_logits = None, None
                if stage.layers:
                    with torch.no_grad(), truncated(teacher, teacher_depth):
                        teacher_out = forward_outputs(teacher, batch, True, attn)
                elif stage.logits:
                    teacher_logits = None if augmenting else cache.get(rows)
                    if teacher_logits is None:
                        with torch.no_grad():
                            teacher_logits = forward_outputs(teacher, batch, False, False).logits.float()
                        if not augmenting:
                            cache.put(rows, teacher_logits)
                with truncated(student, depth):
                    student_out = forward_outputs(student, batch, bool(stage.layers), attn)
                parts = intermediate_loss(student_out, teacher_out, layer_map, mask, stage.layers, weights) \
                    if stage.layers else {}
                parts |= prediction_loss(student_out.logits, teacher_logits, batch["labels"], weights,
                                         stage.logits, stage.task)
                loss = sum(parts.values())
                if not isinstance(loss, torch.Tensor) or not torch.isfinite(loss):
                    value = loss.item() if isinstance(loss, torch.Tensor) else loss
                    raise RuntimeError(
                        f"distillation loss is {value} at step {state['global_step']} (stage '{stage.name}', "
                        f"terms {sorted(parts)}; {nonfinite_origin(student, batch)}); likely cause: learning rate "
                        f"{config.learning_rate} too high "
                        f"or exploding hidden-state MSE (try hidden_loss='cosine'); the last good checkpoint "
                        f"is in {out / 'last'}")
                progress_frac = state["stage_step"] / stage_steps[index]
                if limit_s is not None:
                    progress_frac = max(progress_frac, elapsed / limit_s)
                lr = config.learning_rate * stage.lr_scale * _lr_factor(progress_frac, config.warmup_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss.backward()
                torch.nn.utils.clip_grad_norm_(bundle.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state["step_in_epoch"] += 1
                state["stage_step"] += 1
                state["global_step"] += 1
                if hook is not None:
                    done_s = sum(s["seconds"] for s in state["stages"]) + elapsed
                    overall = (state["global_step"] / sum(stage_steps)) if budget_s is None else done_s / budget_s
                    hook(student, state["global_step"], min(overall, 1.0))
                if average is not None:  # after the hook: the average sees the weights as they will run
                    average.update(student)
                bar.update(task, advance=1, rate=" ".join(f"{k} {v.item():.3f}" for k, v in parts.items()))
                if stage.trains_head and state["stage_step"] % config.eval_every_steps == 0:
                    validate_now()
                    student.train()
                    if config.patience and state["bad_evals"] >= config.patience:
                        state["stopped_early"] = True
                        break
                if state["global_step"] % config.checkpoint_every_steps == 0:
                    state["stage_seconds"] = time.perf_counter() - t0
                    checkpoint()
            seconds = time.perf_counter() - t0
            if stage.trains_head and (not state["history"] or state["history"][-1]["step"] != state["global_step"]):
                validate_now()
                student.train()
            state["stages"].append({"name": stage.name, "steps": state["stage_step"], "seconds": seconds})
            state["stage"], state["stage_step"], state["stage_seconds"] = index + 1, 0, 0.0
            checkpoint()
    state["seconds"] = sum(s["seconds"] for s in state["stages"])
    student.eval()
    student.load_state_dict(load_file(str(out / "best" / "model.safetensors")))
    result = DistillResult(
        schedule=config.schedule, best_dir=str(out / "best"), validation_accuracy=state["best_accuracy"],
        best_step=state["best_step"], steps=state["global_step"], seconds=state["seconds"],
        stopped_early=state["stopped_early"], stages=state["stages"], history=state["history"],
    )
    write_json_atomic(done, result.to_dict())
    return result


def config_from_dict(data: dict[str, Any]) -> DistillConfig:
    """A :class:`DistillConfig` from a mapping (YAML/JSON); unknown keys are user errors."""
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = set(data) - names
    if unknown:
        raise UserError(f"distillation settings have unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    config = DistillConfig(**data)
    config.validate()
    return config
