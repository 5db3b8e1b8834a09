"""Options shared by several commands, and turning them into loaded data."""

from __future__ import annotations

from pathlib import Path

import typer

from ..data import TextDataset, load_task

ModelOpt = typer.Option("minilm-l6", "--model", "-m", help="Built-in model name or local Hugging Face directory.")
TaskOpt = typer.Option(None, "--task", "-t", help="Built-in task (default: rotten-tomatoes).")
DataOpt = typer.Option(None, "--data", help="CSV, TSV or JSONL file with labelled texts (instead of --task).")
TextColOpt = typer.Option(None, "--text-col", help="Text column; give twice for sentence pairs (default: text).")
LabelColOpt = typer.Option("label", "--label-col", help="Label column of --data.")


def load_dataset(task: str | None, data: Path | None, text_col: list[str] | None, label_col: str) -> TextDataset:
    """The dataset named by the shared data options."""
    return load_task(task=task, data=data, text_cols=text_col or ["text"], label_col=label_col)
