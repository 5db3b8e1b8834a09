"""``fitformer finetune`` and ``fitformer evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..data import encode, split_dataset
from ..errors import UserError
from ..models import load_classifier, read_meta
from ..train import EvalResult, FinetuneConfig, evaluate, get_teacher
from .options import DataOpt, LabelColOpt, ModelOpt, TaskOpt, TextColOpt, load_dataset


def print_eval(result: EvalResult, title: str) -> None:
    """A metrics table and confusion matrix on the terminal."""
    console = Console()
    console.print(f"[bold]{title}[/]: accuracy {result.accuracy:.4f}, macro-F1 {result.macro_f1:.4f} "
                  f"({result.examples} examples)")
    table = Table("class", "support", "predicted", "precision", "recall", "F1",
                  *(f"-> {name}" for name in result.label_names))
    for i, name in enumerate(result.label_names):
        c = result.per_class[name]
        table.add_row(name, str(c["support"]), str(c["predicted"]), f"{c['precision']:.3f}", f"{c['recall']:.3f}",
                      f"{c['f1']:.3f}", *(str(v) for v in result.confusion[i]))
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        model: str = ModelOpt,
        task: str = TaskOpt,
        data: Path = DataOpt,
        text_col: list[str] = TextColOpt,
        label_col: str = LabelColOpt,
        epochs: int = typer.Option(3, help="Training epochs."),
        batch_size: int = typer.Option(32, help="Examples per step."),
        lr: float = typer.Option(5e-5, "--lr", help="Peak learning rate (AdamW, warm-up then linear decay)."),
        max_length: int = typer.Option(128, help="Maximum tokens per example."),
        max_train_examples: int = typer.Option(None, help="Train on a random subset of this size."),
        seed: int = typer.Option(0, help="Seed for the split, initialisation and data order."),
        out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: the teacher cache)."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Fine-tune the dense teacher; cached, so a second call with the same inputs is instant.

        Example: fitformer finetune --model minilm-l6 --task rotten-tomatoes --epochs 3
        """
        if out is not None and out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; pass a directory")
        config = FinetuneConfig(epochs=epochs, batch_size=batch_size, learning_rate=lr, max_length=max_length,
                                seed=seed, max_train_examples=max_train_examples)
        config.validate()
        dataset = load_dataset(task, data, text_col, label_col)
        teacher = get_teacher(model, data=dataset, config=config, split_seed=seed, out_dir=out)
        test = teacher.evaluate("test")
        if as_json:
            typer.echo(json.dumps({"model_dir": str(teacher.model_dir), "finetune": teacher.result.to_dict(),
                                   "test": test.to_dict()}, indent=2))
            return
        Console().print(f"best checkpoint: {teacher.model_dir} (epoch {teacher.result.best_epoch}, "
                        f"validation accuracy {teacher.result.validation_accuracy:.4f})")
        print_eval(test, "test")

    @app.command("evaluate")
    def evaluate_cmd(
        model: Path = typer.Option(..., "--model", "-m", help="A classifier directory saved by fitformer."),
        task: str = TaskOpt,
        data: Path = DataOpt,
        text_col: list[str] = TextColOpt,
        label_col: str = LabelColOpt,
        split: str = typer.Option("test", help="train, validation, test or all."),
        seed: int = typer.Option(0, help="Split seed (the one used for fine-tuning)."),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    ) -> None:
        """Accuracy, macro-F1, per-class counts and confusion matrix of a classifier.

        Example: fitformer evaluate --model runs/teacher/best --task rotten-tomatoes --split test --json
        """
        if split not in ("train", "validation", "test", "all"):
            raise UserError(f"--split {split}: use train, validation, test or all")
        meta = read_meta(model) if model.is_dir() else {}
        dataset = load_dataset(task, data, text_col, label_col)
        names = meta.get("label_names")
        if names is None:
            raise UserError(f"{model}: not a classifier saved by fitformer (no fitformer.json); run finetune first")
        if names != dataset.label_names:
            raise UserError(f"{model} predicts classes {names} but the data has {dataset.label_names}; "
                            "evaluate on the task it was trained for")
        net, tokenizer = load_classifier(model)
        rows = dataset if split == "all" else split_dataset(dataset, seed=seed)[split]
        max_length = meta.get("finetune", {}).get("max_length", 128)
        result = evaluate(net, encode(tokenizer, rows, max_length), dataset.label_names)
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
        else:
            print_eval(result, split)
