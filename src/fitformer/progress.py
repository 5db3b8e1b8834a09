"""Rich progress bars with throughput and ETA, silent when output is not a terminal or when disabled."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress_enabled() -> bool:
    """Progress bars are shown on an interactive terminal unless FITFORMER_PROGRESS=0."""
    setting = os.environ.get("FITFORMER_PROGRESS")
    if setting is not None:
        return setting not in ("0", "false", "no")
    return sys.stderr.isatty()


def make_progress(enabled: bool | None = None) -> Progress:
    """A progress display with description, bar, count, rate field, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (progress_enabled() if enabled is None else enabled),
        transient=False,
    )
