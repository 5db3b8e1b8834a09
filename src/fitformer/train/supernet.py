"""Training the elastic SuperTransformer with the sandwich rule, inherited-weight evaluation, short distillation.

Each step draws a batch and trains, on it, the largest sub-network, the smallest, and ``random_subnets``
random ones (the sandwich rule of Yu & Huang 2019, "Universally Slimmable Networks", §3.1; used by BigNAS
and OFA), each distilled from the dense teacher's logits (Hinton et al. 2015). The gradients of all of them
are accumulated into the shared weights, then one optimizer step is taken. Sub-network sampling depends only
on (seed, step), and the data order only on (seed, epoch), so a run resumed from its checkpoint sees the same
batches and sub-networks as the uninterrupted one (only dropout masks differ).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import get_linear_schedule_with_warmup

from ..data.tokenize import EncodedDataset
from ..errors import UserError
from ..io import atomic_path, read_json, write_json_atomic
from ..models.elastic import ElasticBert, ElasticSpace, SubConfig, compute_importance, reorder_
from ..progress import console, make_progress
from ..utils import seed_everything
from .evaluate import evaluate, model_logits, predict_logits
from .finetune import load_checkpoint, save_checkpoint
from .losses import logits_kl


@dataclass
class SupernetConfig:
    """Hyper-parameters of SuperTransformer training."""

    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    random_subnets: int = 2  # per step, besides the largest and the smallest
    temperature: float = 2.0
    kd_weight: float = 0.9  # weight of the distillation term; the rest goes to cross-entropy with labels
    importance_batches: int = 8  # batches used to score heads, neurons and channels before training
    seed: int = 0
    checkpoint_every_steps: int = 50

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UserError(f"steps={self.steps}, batch size={self.batch_size}: both must be at least 1")
        if not 0 < self.learning_rate < 1:
            raise UserError(f"learning rate {self.learning_rate}: must be in (0, 1), e.g. 1e-4")
        if self.random_subnets < 0:
            raise UserError(f"random_subnets={self.random_subnets}: must be 0 or more")
        if self.temperature <= 0 or not 0 <= self.kd_weight <= 1:
            raise UserError(f"temperature {self.temperature} must be > 0 and kd_weight {self.kd_weight} in [0, 1]")
        if self.checkpoint_every_steps < 1:
            raise UserError(f"checkpoint_every_steps={self.checkpoint_every_steps}: must be at least 1")


@dataclass
class SupernetResult:
    """Where the trained SuperTransformer is and how its training went."""

    supernet_dir: str
    steps: int
    seconds: float
    space: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
            kd_weight: float) -> torch.Tensor:
    """``w T^2 KL(p_T(teacher) || p_T(student)) + (1 - w) CE(student, labels)`` (Hinton et al. 2015, §2)."""
    kd = logits_kl(student, teacher, temperature)
    if kd_weight >= 1:
        return kd
    return kd_weight * kd + (1 - kd_weight) * F.cross_entropy(student, labels)


def sandwich(space: ElasticSpace, step: int, seed: int, random_subnets: int) -> list[SubConfig]:
    """The sub-networks trained at ``step``: largest, smallest and seeded random ones."""
    rng = random.Random(seed * 1_000_003 + step)
    return [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(random_subnets))]


def teacher_logits(teacher: torch.nn.Module, data: EncodedDataset, cache: Path | None = None) -> torch.Tensor:
    """The teacher's logits on every row of ``data`` (computed once; cached at ``cache`` if given)."""
    if cache is not None and cache.exists():
        logits = load_file(str(cache))["logits"]
        if logits.shape[0] == len(data):
            return logits
    logits = predict_logits(teacher, data)
    if cache is not None:
        with atomic_path(cache) as tmp:
            save_file({"logits": logits.contiguous()}, str(tmp))
    return logits


def kd_batches(data: EncodedDataset, logits: torch.Tensor, batch_size: int, seed: int, epoch: int,
               skip: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Shuffled batches (order fixed by seed and epoch) with the teacher's logits for their rows."""
    order = data.epoch_order(batch_size, torch.Generator().manual_seed(seed * 1000 + epoch))
    for start in range(skip * batch_size, len(data), batch_size):
        idx = order[start : start + batch_size]
        yield data.batch(idx), logits[idx]


def subset(data: EncodedDataset, max_examples: int | None, seed: int = 0) -> EncodedDataset:
    """A seeded random subset of at most ``max_examples`` rows, sorted by length so batches pad little."""
    idx = torch.arange(len(data))
    if max_examples is not None and max_examples < len(data):
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:max_examples]
    lengths = data.attention_mask[idx].sum(dim=1)
    return data.select(idx[torch.argsort(lengths, stable=True)])


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup_ratio: float, total: int):
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    return optimizer, get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total), total)


def train_supernet(
    teacher: torch.nn.Module,
    tokenizer,
    train: EncodedDataset,
    config: SupernetConfig,
    out_dir: str | Path,
    space: ElasticSpace | None = None,
    progress: bool | None = None,
) -> tuple[ElasticBert, SupernetResult]:
    """Train a SuperTransformer initialised from ``teacher`` (copied, importance-reordered) on ``train``.

    The trained full-size weights are saved as a plain classifier in ``out_dir/supernet`` (with the design
    space in its ``fitformer.json``); a finished run is loaded, not retrained; an interrupted one resumes
    from ``out_dir/last``.
    """
    from ..models.hf import save_classifier

    config.validate()
    out = Path(out_dir)
    if (out / "result.json").exists():
        result = SupernetResult(**read_json(out / "result.json"))
        return load_supernet(result.supernet_dir), result
    seed_everything(config.seed)
    elastic = ElasticBert(copy.deepcopy(teacher), space)
    teacher.eval()
    data = subset(train, config.steps * config.batch_size, config.seed)
    targets = teacher_logits(teacher, data, out / "teacher_logits.safetensors")
    steps_per_epoch = data.num_batches(config.batch_size)
    optimizer, scheduler = _optimizer(elastic.model, config.learning_rate, config.weight_decay,
                                      config.warmup_ratio, config.steps)
    state = load_checkpoint(out, elastic.model, optimizer, scheduler)
    if state is None:
        # Score and reorder before training: leading slices become the most important units.
        batches = (b for b, _ in kd_batches(data, targets, config.batch_size, config.seed, 0))
        first = [next(batches) for _ in range(min(config.importance_batches, steps_per_epoch))]
        reorder_(elastic, compute_importance(elastic, first))
        state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "seconds": 0.0}
    else:
        console.print(f"resuming SuperTransformer training at step {state['global_step']}")
    started = time.perf_counter() - state["seconds"]
    elastic.train()
    with make_progress(progress) as bar:
        task = bar.add_task("supernet", total=config.steps, completed=state["global_step"], rate="")
        while state["global_step"] < config.steps:
            for batch, target in kd_batches(data, targets, config.batch_size, config.seed, state["epoch"],
                                            state["step_in_epoch"]):
                subs = sandwich(elastic.space, state["global_step"], config.seed, config.random_subnets)
                losses = []
                for sub in subs:
                    elastic.active = sub
                    loss = kd_loss(model_logits(elastic, batch), target, batch["labels"], config.temperature,
                                   config.kd_weight) / len(subs)
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"loss is {loss.item()} at step {state['global_step']} for "
                                           f"{sub.describe()}; lower the learning rate ({config.learning_rate})")
                    loss.backward()
                    losses.append(loss.item() * len(subs))
                torch.nn.utils.clip_grad_norm_(elastic.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step_in_epoch"] += 1
                state["global_step"] += 1
                bar.update(task, advance=1, rate=f"loss max {losses[0]:.3f} min {losses[1]:.3f}")
                state["history"].append({"step": state["global_step"], "loss_largest": round(losses[0], 5),
                                         "loss_smallest": round(losses[1], 5)})
                if state["global_step"] % config.checkpoint_every_steps == 0 or state["global_step"] == config.steps:
                    state["seconds"] = time.perf_counter() - started
                    save_checkpoint(out, elastic.model, optimizer, scheduler, state)
                if state["global_step"] >= config.steps:
                    break
            else:
                state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
    elastic.eval()
    elastic.active = elastic.space.largest()
    meta = {"supernet": {"space": elastic.space.to_dict(), "config": asdict(config)}}
    save_classifier(elastic.model, tokenizer, out / "supernet", meta)
    result = SupernetResult(supernet_dir=str(out / "supernet"), steps=state["global_step"],
                            seconds=time.perf_counter() - started, space=elastic.space.to_dict(),
                            history=state["history"])
    write_json_atomic(out / "result.json", result.to_dict())
    return elastic, result


def load_supernet(supernet_dir: str | Path) -> ElasticBert:
    """A trained SuperTransformer saved by :func:`train_supernet` (``out_dir/supernet``)."""
    from ..models.hf import load_classifier, read_meta

    meta = read_meta(supernet_dir).get("supernet")
    if meta is None:
        raise UserError(f"{supernet_dir}: not a SuperTransformer directory (no 'supernet' in fitformer.json); "
                        "train one with train_supernet")
    model, _ = load_classifier(supernet_dir)
    return ElasticBert(model, ElasticSpace.from_dict(meta["space"])).eval()


def inherited_accuracy(elastic: ElasticBert, sub: SubConfig, data: EncodedDataset, label_names: list[str],
                       batch_size: int = 128) -> float:
    """Accuracy of sub-network ``sub`` with the SuperTransformer's weights, no training (HAT §3.2).

    Pass a :func:`subset` of the validation split (sorted by length) for a fast, batched estimate.
    """
    previous = elastic.set_active(sub)
    try:
        return evaluate(elastic, data, label_names, batch_size).accuracy
    finally:
        elastic.active = previous


@dataclass
class ShortDistillConfig:
    """Hyper-parameters of the short distillation of an extracted sub-network."""

    steps: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 2.0
    kd_weight: float = 0.9
    seed: int = 0


def short_distill(student: torch.nn.Module, data: EncodedDataset, targets: torch.Tensor,
                  config: ShortDistillConfig) -> torch.nn.Module:
    """Distil ``student`` in place for ``config.steps`` steps towards the teacher logits ``targets``
    (one row per row of ``data``, e.g. from :func:`teacher_logits`); returns it in eval mode."""
    if len(targets) != len(data):
        raise UserError(f"{len(targets)} teacher logits for {len(data)} examples; compute them on the same data")
    seed_everything(config.seed)
    optimizer, scheduler = _optimizer(student, config.learning_rate, config.weight_decay, config.warmup_ratio,
                                      config.steps)
    student.train()
    step, epoch = 0, 0
    while step < config.steps:
        for batch, target in kd_batches(data, targets, config.batch_size, config.seed, epoch):
            loss = kd_loss(model_logits(student, batch), target, batch["labels"], config.temperature,
                           config.kd_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step >= config.steps:
                break
        epoch += 1
    return student.eval()
