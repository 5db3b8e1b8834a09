"""``fitformer distill``: apply a compression plan to the teacher and distil the student back to accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml
from rich.console import Console

from ..compress import CompressionPlan, apply_plan
from ..errors import UserError
from ..io import write_json_atomic
from ..train import SCHEDULES, DistillConfig, DistillData, distill, get_teacher
from .options import DataOpt, LabelColOpt, ModelOpt, TaskOpt, TextColOpt, load_dataset


def read_plan(path: Path) -> CompressionPlan:
    """A compression plan from a YAML or JSON file."""
    if not path.is_file():
        raise UserError(f"--plan {path}: no such file; write a plan (YAML/JSON with 'layers' and 'model_steps')")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"--plan {path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    return CompressionPlan.from_dict(data)


def register(app: typer.Typer) -> None:
    @app.command("distill")
    def distill_cmd(
        plan: Path = typer.Option(..., "--plan", "-p", help="Compression plan (YAML or JSON) applied to the teacher."),
        model: str = ModelOpt,
        task: str = TaskOpt,
        data: Path = DataOpt,
        text_col: list[str] = TextColOpt,
        label_col: str = LabelColOpt,
        schedule: str = typer.Option(DistillConfig.schedule, help=f"One of: {', '.join(SCHEDULES)}."),
        budget_minutes: float = typer.Option(None, "--budget-minutes", help="Wall-clock budget, split over stages."),
        max_steps: int = typer.Option(None, help="Step budget (default: --epochs over the training data)."),
        epochs: float = typer.Option(DistillConfig.epochs, help="Epochs when --max-steps is not given."),
        lr: float = typer.Option(DistillConfig.learning_rate, "--lr", help="Peak learning rate (AdamW)."),
        batch_size: int = typer.Option(DistillConfig.batch_size, help="Examples per step."),
        temperature: float = typer.Option(DistillConfig.temperature, help="Soft-target temperature."),
        hidden_loss: str = typer.Option(DistillConfig.hidden_loss, help="Hidden-state loss: mse, cosine or "
                                        "fisher (mse in the directions the teacher's task loss reads)."),
        word_dropout: float = typer.Option(DistillConfig.word_dropout, help="Augmentation: token drop rate."),
        neighbour_swap: float = typer.Option(DistillConfig.neighbour_swap, help="Augmentation: share of examples "
                                             "with words swapped for embedding-space neighbours."),
        ema_decay: float = typer.Option(DistillConfig.ema_decay, help="Validate and keep the moving average of "
                                        "the weights with this decay (0: the raw weights)."),
        group_by_length: int = typer.Option(DistillConfig.group_by_length, help="Sort each chunk of this many "
                                            "batches by length, so batches pad less (0: random batches)."),
        patience: int = typer.Option(DistillConfig.patience, help="Early stopping after this many evaluations "
                                     "without improvement (0: off)."),
        seed: int = typer.Option(0, help="Seed of the data order."),
        out: Path = typer.Option(Path("distill-run"), "--out", "-o", help="Run directory (resumable)."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Distil a compressed student from the cached teacher; rerun the same command to resume.

        Example: fitformer distill --plan plan.yaml --schedule progressive --budget-minutes 30 --out runs/tt
        """
        config = DistillConfig(schedule=schedule, budget_minutes=budget_minutes, max_steps=max_steps, epochs=epochs,
                               learning_rate=lr, batch_size=batch_size, temperature=temperature,
                               hidden_loss=hidden_loss, word_dropout=word_dropout, neighbour_swap=neighbour_swap,
                               ema_decay=ema_decay,
                               group_by_length=group_by_length,
                               patience=patience, seed=seed)
        config.validate()
        compression = read_plan(plan)
        teacher = get_teacher(model, data=load_dataset(task, data, text_col, label_col))
        student = apply_plan(teacher.model, compression)
        write_json_atomic(out / "plan.json", compression.to_dict())  # with best/ it rebuilds the student
        result = distill(student, teacher.model, DistillData.from_teacher(teacher), config, out)
        test = teacher.evaluate("test", model=student)
        summary = {"distill": result.to_dict(), "test_accuracy": test.accuracy,
                   "teacher_test_accuracy": teacher.evaluate("test").accuracy}
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        Console().print(f"{schedule}: test accuracy {test.accuracy:.4f} (teacher "
                        f"{summary['teacher_test_accuracy']:.4f}), best validation {result.validation_accuracy:.4f} "
                        f"after {result.steps} steps in {result.seconds / 60:.1f} min; weights in {result.best_dir}")
