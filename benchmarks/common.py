"""Shared plumbing of the benchmarks: arguments, results files and the BENCHMARKS.md page.

Each benchmark writes ``benchmarks/results/<name>.json`` (the figures) and ``<name>.md`` (its table and a
short reading); ``BENCHMARKS.md`` is rebuilt from all the ``.md`` fragments after every run, so benchmarks
never edit each other's text.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from fitformer.errors import UserError
from fitformer.io import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Order of sections in BENCHMARKS.md; fragments not listed come after, alphabetically.
ORDER = ["teacher", "tt", "quant", "prune", "cost_model", "supernet", "distill", "batching", "search", "compress"]


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark has."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="A small subset that runs in about a minute.")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads.")
    return p


def size_plan_parser(description: str, work: str, epochs: float, collected: str) -> argparse.ArgumentParser:
    """:func:`parser` plus the flags of the benchmarks that rework the chosen plan of a finished size run
    (``bench_compress.py --runs size``): ``--plan-from``, ``--work``, ``--epochs`` and ``--collect DIR``, which
    gathers the file ``collected`` of a finished work directory instead of running anything."""
    p = parser(description)
    p.add_argument("--plan-from", type=Path, default=Path("runs/bench-compress/size"),
                   help="A finished size run directory (bench_compress.py --runs size); its first candidate.")
    p.add_argument("--work", type=Path, default=Path(work), help="Work directory.")
    p.add_argument("--epochs", type=float, default=epochs, help="Most distillation epochs.")
    p.add_argument("--collect", type=Path, default=None, metavar="DIR",
                   help=f"Only gather the {collected} of this finished work directory into the results.")
    return p


def parse_size_plan_args(p: argparse.ArgumentParser, needs: str) -> argparse.Namespace:
    """Parse a :func:`size_plan_parser`'s arguments, set the PyTorch threads and check that ``--plan-from``
    holds the file ``needs`` of a finished size run."""
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.plan_from / needs).exists():
        raise UserError(f"{args.plan_from} holds no {needs} of a size run; run `python benchmarks/bench_compress.py "
                        "--runs size` first or pass --plan-from")
    return args


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0]}


def write_results(name: str, payload: dict[str, Any], markdown: str, quick: bool = False) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` (``<name>.quick.*`` for quick runs, kept out of the page)
    and rebuild BENCHMARKS.md."""
    stem = f"{name}.quick" if quick else name
    payload = {**payload, "machine": machine(), "quick": quick}
    path = RESULTS / f"{stem}.json"
    write_json_atomic(path, payload)
    write_text_atomic(RESULTS / f"{stem}.md", markdown.strip() + "\n")
    render()
    print(f"wrote {path}")
    return path


def render() -> None:
    """Rebuild BENCHMARKS.md from the full-run fragments."""
    fragments = {p.stem: p for p in RESULTS.glob("*.md") if not p.stem.endswith(".quick")}
    for quick in RESULTS.glob("*.quick.md"):  # a quick run stands in until a full one exists, marked as such
        fragments.setdefault(quick.stem.removesuffix(".quick"), quick)
    names = [n for n in ORDER if n in fragments] + sorted(set(fragments) - set(ORDER))
    parts = ["# Benchmarks", "",
             "Measured by the scripts in `benchmarks/` on the machine named in each JSON file under "
             "`benchmarks/results/`. Speed figures are ratios taken side by side in one run. "
             "Regenerate a section with `python benchmarks/<script>.py`; this page is rebuilt from "
             "`benchmarks/results/*.md` each time.", ""]
    for n in names:
        text = fragments[n].read_text(encoding="utf-8").strip()
        if fragments[n].stem.endswith(".quick"):
            head, _, rest = text.partition("\n")
            text = f"{head} — quick run (`--quick`), no full run yet\n{rest}"
        parts += [text, ""]
    write_text_atomic(ROOT / "BENCHMARKS.md", "\n".join(parts))


def markdown_table(rows: list[dict[str, Any]], columns: list[str], floatfmt: str = ".3f") -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns``."""
    def fmt(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
