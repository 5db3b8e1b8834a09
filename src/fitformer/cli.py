"""The ``fitformer`` command line: a typer app whose commands live in ``fitformer.commands.*``.

``main()`` turns a :class:`~fitformer.errors.UserError` into one line on stderr and exit code 2 (3 for
infeasible constraints); any other exception is logged with its traceback and exits 1.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import traceback
from pathlib import Path

import typer

from .errors import EXIT_INTERNAL_ERROR, UserError

# Each module defines ``register(app)``; a new command group is one module plus one name here.
COMMAND_MODULES = ["data", "train", "hardware", "prune", "search", "distill", "quant", "compress"]

app = typer.Typer(
    name="fitformer",
    help="Fit a pretrained Transformer to the hardware it must run on.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"{__package__}.commands.{_name}").register(app)


def _log_path() -> Path:
    return Path(os.environ.get("FITFORMER_LOG_DIR", tempfile.gettempdir())) / "fitformer-error.log"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click's usage errors carry their own exit code
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            sys.exit(130)
        log = _log_path()
        log.write_text(traceback.format_exc(), encoding="utf-8")
        print(f"internal error: {type(exc).__name__}: {exc} (traceback in {log})", file=sys.stderr)
        sys.exit(EXIT_INTERNAL_ERROR)
    sys.exit(0)


if __name__ == "__main__":
    main()
