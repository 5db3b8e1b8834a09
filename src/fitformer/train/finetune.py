"""Fine-tuning a classifier with AdamW and warm-up + linear decay; checkpointed, resumable, cached."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import get_linear_schedule_with_warmup

from ..data.tokenize import EncodedDataset
from ..errors import UserError
from ..io import atomic_path, read_json, write_json_atomic
from ..progress import console, make_progress
from ..utils import seed_everything
from .evaluate import evaluate, model_logits


@dataclass
class FinetuneConfig:
    """Hyper-parameters of fine-tuning; all of them enter the cache key."""

    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    seed: int = 0
    max_train_examples: int | None = None
    checkpoint_every_steps: int = 200

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserError(f"epochs={self.epochs}: must be at least 1")
        if self.batch_size < 1:
            raise UserError(f"batch size {self.batch_size}: must be at least 1")
        if not 0 < self.learning_rate < 1:
            raise UserError(f"learning rate {self.learning_rate}: must be in (0, 1), e.g. 5e-5")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warm-up ratio {self.warmup_ratio}: must be in [0, 1)")
        if not 8 <= self.max_length <= 512:
            raise UserError(f"max length {self.max_length}: must be between 8 and 512 tokens")
        if self.max_train_examples is not None and self.max_train_examples < 2:
            raise UserError(f"max train examples {self.max_train_examples}: must be at least 2")


@dataclass
class FinetuneResult:
    """Outcome of fine-tuning: where the best checkpoint is and how it scored on validation."""

    best_dir: str
    best_epoch: int
    validation_accuracy: float
    train_examples: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nonfinite_origin(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> str:
    """Where a non-finite loss comes from: the first module whose weights or (re-run forward) output hold
    NaN/inf, and any quantizer scale at zero. Called only after the loss went bad, so it costs nothing before."""
    hints = [f"weights of {n}" for n, p in model.named_parameters() if not torch.isfinite(p).all()][:1]
    hints += [f"zero quantizer scale {n}" for n, p in model.named_parameters()
              if n.endswith("scale") and bool((p == 0).any())][:1]
    names = {m: n for n, m in model.named_modules()}
    first: list[str] = []

    def hook(module, _args, output) -> None:
        outs = output if isinstance(output, tuple) else (output,)
        if not first and any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
                             for t in outs):
            first.append(names[module] or "the model")

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model_logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    hints += [f"first non-finite output in {first[0]}"] if first else []
    return "; ".join(hints) or "weights and outputs are finite (the loss itself overflowed)"


def save_checkpoint(out: Path, model: torch.nn.Module, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Write the resumable checkpoint ``out/last``: weights (safetensors), optimizer/scheduler (``scheduler`` may
    be None), counters. Atomic per file; ``state.json`` is written last and names the step, so a crash between
    files is detected on resume. Shared with distillation."""
    last = out / "last"
    last.mkdir(parents=True, exist_ok=True)
    with atomic_path(last / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(last / "optim.pt") as tmp:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "step": state["global_step"]}, tmp)
    write_json_atomic(last / "state.json", state)


def require_same_model(path: Path, module: torch.nn.Module, what: str) -> None:
    """Refuse weights saved from a model of another structure (say, other TT ranks) before loading them:
    ``load_state_dict`` would copy the matching tensors first and then fail half-way. A missing or damaged
    file is left to the loader, which starts over."""
    try:
        with safe_open(str(path), "pt") as f:
            saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except (FileNotFoundError, SafetensorError, OSError):
        return
    if saved != {k: list(v.shape) for k, v in module.state_dict().items()}:
        raise UserError(f"{what} of a model with other layer shapes; pass a new output directory")


def load_checkpoint(out: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any] | None:
    """Restore the resumable checkpoint if it is complete and consistent; otherwise start over. A checkpoint
    of a model with other layer shapes is a user error, raised before any weight is copied."""
    require_same_model(out / "last" / "model.safetensors", model, f"{out} holds an unfinished run")
    last = out / "last"
    try:
        state = read_json(last / "state.json")
        extra = torch.load(last / "optim.pt", weights_only=True)
        if extra["step"] != state["global_step"]:
            return None
        model.load_state_dict(load_file(str(last / "model.safetensors")))
        optimizer.load_state_dict(extra["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(extra["scheduler"])
        return state
    except (FileNotFoundError, KeyError, RuntimeError, ValueError, json.JSONDecodeError, SafetensorError,
            pickle.UnpicklingError, EOFError):
        return None


def finetune(
    model: torch.nn.Module,
    tokenizer,
    train: EncodedDataset,
    validation: EncodedDataset,
    label_names: list[str],
    config: FinetuneConfig,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``train``, keep the best validation checkpoint in ``out_dir/best``.

    A finished run (``out_dir/result.json``) is returned without training. An interrupted run resumes
    from ``out_dir/last`` at the same step with the same data order. Evaluation runs every epoch.
    """
    from ..models.hf import save_classifier  # models -> train is not an import edge the layout allows at top

    config.validate()
    out = Path(out_dir)
    done = out / "result.json"
    if done.exists():
        return FinetuneResult(**read_json(done))
    seed_everything(config.seed)
    if config.max_train_examples is not None and config.max_train_examples < len(train):
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
        train = train.select(pick[: config.max_train_examples])
    steps_per_epoch = train.num_batches(config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    no_decay = ("bias", "LayerNorm.weight", "layernorm", "norm")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)
    state = load_checkpoint(out, model, optimizer, scheduler) or {
        "epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_accuracy": -1.0, "best_epoch": -1,
        "history": [], "seconds": 0.0,
    }
    if state["global_step"]:
        console.print(f"resuming fine-tuning at epoch {state['epoch'] + 1}, step {state['global_step']}")
    started = time.perf_counter() - state["seconds"]
    with make_progress(progress) as bar:
        task = bar.add_task("fine-tune", total=total_steps, completed=state["global_step"], rate="")
        for epoch in range(state["epoch"], config.epochs):
            model.train()
            generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            seen, t0 = 0, time.perf_counter()
            for batch in train.batches(config.batch_size, shuffle=True, generator=generator,
                                       skip=state["step_in_epoch"]):
                loss = torch.nn.functional.cross_entropy(model_logits(model, batch), batch["labels"])
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"loss is {loss.item()} at step {state['global_step']} ({nonfinite_origin(model, batch)}); "
                        f"lower the learning rate "
                        f"({config.learning_rate}); the last good checkpoint is in {out / 'last'}"
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step_in_epoch"] += 1
                state["global_step"] += 1
                seen += len(batch["labels"])
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=1, rate=f"{rate:.0f} ex/s loss {loss.item():.3f}")
                if state["global_step"] % config.checkpoint_every_steps == 0:
                    state["seconds"] = time.perf_counter() - started
                    save_checkpoint(out, model, optimizer, scheduler, state)
            result = evaluate(model, validation, label_names)
            state["history"].append({"epoch": epoch + 1, "validation_accuracy": result.accuracy,
                                     "validation_macro_f1": result.macro_f1})
            console.print(f"epoch {epoch + 1}/{config.epochs}: validation accuracy {result.accuracy:.4f}")
            if result.accuracy > state["best_accuracy"]:
                state["best_accuracy"], state["best_epoch"] = result.accuracy, epoch + 1
                save_classifier(model, tokenizer, out / "best", {
                    **(meta or {}), "label_names": label_names, "finetune": asdict(config),
                    "validation_accuracy": result.accuracy, "epoch": epoch + 1,
                })
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            state["seconds"] = time.perf_counter() - started
            save_checkpoint(out, model, optimizer, scheduler, state)
    final = FinetuneResult(
        best_dir=str(out / "best"), best_epoch=state["best_epoch"], validation_accuracy=state["best_accuracy"],
        train_examples=len(train), seconds=state["seconds"], history=state["history"],
    )
    write_json_atomic(done, final.to_dict())
    shutil.rmtree(out / "last", ignore_errors=True)  # the best checkpoint is all a finished run needs
    return final
