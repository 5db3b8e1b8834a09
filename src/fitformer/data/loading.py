"""Reading labelled data from CSV, TSV and JSONL files, with clear errors for bad input."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

from ..errors import UserError
from .dataset import TextDataset

SUPPORTED_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; pass an existing CSV, TSV or JSONL file with --data") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; pass a CSV, TSV or JSONL file with --data") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path}: line {line} is not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8"
        ) from None


def _read_rows(path: Path) -> tuple[list[dict[str, object]], list[str], int]:
    """Rows as dicts, the column names, and the line number of the first data row."""
    suffix = path.suffix.lower()
    kind = SUPPORTED_SUFFIXES.get(suffix)
    if kind is None:
        raise UserError(f"{path}: unknown file type '{suffix}'; use .csv, .tsv or .jsonl")
    text = _read_text(path)
    if kind == "jsonl":
        rows: list[dict[str, object]] = []
        columns: dict[str, None] = {}
        # JSON Lines ends lines with "\n" only: U+2028 and friends may appear raw inside a string value.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg}); one object per line") from None
            except (RecursionError, ValueError) as exc:  # deeper than the stack; an integer over 4300 digits
                why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
                raise UserError(f"{path}: line {number} cannot be read ({why}); one flat object per line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {number} is not a JSON object; one object per line")
            row["__line__"] = number
            columns.update(dict.fromkeys(k for k in row if k != "__line__"))
            rows.append(row)
        return rows, list(columns), 1
    delimiter = "\t" if kind == "tsv" else ","
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        fieldnames = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            row["__line__"] = reader.line_num
            rows.append(row)
    except csv.Error as exc:
        raise UserError(f"{path}: malformed {kind.upper()} ({exc}); check quoting and delimiters") from None
    return rows, fieldnames, 2


def _label_names(values: list[str]) -> list[str]:
    """Sorted label names; numeric labels sort by value so '0','1','10' keep their order."""
    unique = set(values)
    try:
        return sorted(unique, key=lambda v: float(v))
    except ValueError:
        return sorted(unique)


def load_table(
    path: str | Path,
    text_cols: list[str],
    label_col: str,
    min_class_examples: int = 2,
) -> TextDataset:
    """Load a labelled dataset from a CSV, TSV or JSONL file.

    ``text_cols`` holds one column (single sentences) or two (sentence pairs). Every row must have a
    non-empty text and a label; a class with fewer than ``min_class_examples`` rows is treated as a
    stray value (a typo) and reported.
    """
    path = Path(path)
    if not 1 <= len(text_cols) <= 2:
        raise UserError(f"--text-col given {len(text_cols)} times; give one column, or two for sentence pairs")
    rows, columns, _ = _read_rows(path)
    if not rows:
        raise UserError(f"{path}: no data rows; the file needs a header and at least one row per class")
    for col in [*text_cols, label_col]:
        if col not in columns:
            flag = "--label-col" if col == label_col else "--text-col"
            raise UserError(f"{path}: no column '{col}' (columns: {', '.join(columns)}); fix {flag}")
    texts: list[list[str]] = [[] for _ in text_cols]
    raw_labels: list[str] = []
    for row in rows:
        line = row["__line__"]
        for slot, col in enumerate(text_cols):
            value = row.get(col)
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{path}: line {line}: empty text in column '{col}'; fill it or remove the row")
            texts[slot].append(value.strip())
        label = row.get(label_col)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise UserError(f"{path}: line {line}: empty label in column '{label_col}'; fill it or remove the row")
        raw_labels.append(str(label).strip())
    counts = Counter(raw_labels)
    if len(counts) < 2:
        only = next(iter(counts))
        raise UserError(
            f"{path}: column '{label_col}' has one class ('{only}'); classification needs at least two"
        )
    strays = [name for name, n in counts.items() if n < min_class_examples]
    if strays:
        stray = strays[0]
        line = next(row["__line__"] for row, lab in zip(rows, raw_labels, strict=True) if lab == stray)
        raise UserError(
            f"{path}: line {line}: label '{stray}' in column '{label_col}' appears only {counts[stray]} time(s); "
            f"fix the typo or remove the row (classes: {', '.join(sorted(counts))})"
        )
    names = _label_names(raw_labels)
    index = {name: i for i, name in enumerate(names)}
    return TextDataset(
        texts=texts[0],
        pair_texts=texts[1] if len(text_cols) == 2 else None,
        labels=[index[v] for v in raw_labels],
        label_names=names,
        source=str(path),
    )
