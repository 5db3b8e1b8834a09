"""``fitformer data inspect``: sizes, class balance and length statistics of a task or file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..data import BUILTIN_TASKS, split_dataset
from .options import LabelColOpt, TextColOpt, load_dataset


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Inspect built-in tasks and data files.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("inspect")
    def inspect(
        source: str = typer.Argument("rotten-tomatoes", help="A built-in task name or a CSV/TSV/JSONL file."),
        text_col: list[str] = TextColOpt,
        label_col: str = LabelColOpt,
        seed: int = typer.Option(0, help="Split seed."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    ) -> None:
        """Print sizes, class balance, length statistics and the split of a dataset.

        Example: fitformer data inspect rotten-tomatoes
        """
        is_task = source in BUILTIN_TASKS
        data = load_dataset(source if is_task else None, None if is_task else Path(source), text_col, label_col)
        splits = split_dataset(data, seed=seed)
        words = [len(t.split()) for t in data.texts]
        summary = {
            "source": data.source,
            "examples": len(data),
            "pairs": data.is_pair,
            "classes": data.class_counts(),
            "words": {"mean": statistics.fmean(words), "median": statistics.median(words),
                      "min": min(words), "max": max(words)},
            "splits": splits.manifest["counts"],
            "content_hash": data.content_hash(),
            "split_hash": splits.manifest["split_hash"],
        }
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        console = Console()
        console.print(f"[bold]{data.source}[/]: {len(data)} examples{' (sentence pairs)' if data.is_pair else ''}, "
                      f"{len(data.label_names)} classes")
        table = Table("class", "all", "train", "validation", "test")
        for name in data.label_names:
            table.add_row(name, str(summary["classes"][name]),
                          *(str(splits.manifest["counts"][s][name]) for s in ("train", "validation", "test")))
        console.print(table)
        w = summary["words"]
        console.print(f"words per text: mean {w['mean']:.1f}, median {w['median']}, min {w['min']}, max {w['max']}")
        console.print(f"content hash {summary['content_hash'][:16]}, split hash {summary['split_hash'][:16]}")
