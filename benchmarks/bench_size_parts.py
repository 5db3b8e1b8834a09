"""Which part of the size plan costs the accuracy: its word embedding alone, or its encoder alone, distilled.

The size run's chosen plan (``bench_compress.py --runs size``) compresses two things: the word embedding
(30,522 x 384, half the teacher's weights, as a 4-bit TT-matrix of about 170 KB) and the encoder's linears.
This benchmark builds two students from the teacher, each with one part compressed as the plan says and the
other left in float: ``embedding`` (the plan's word embedding, everything else in float) and ``encoder``
(everything the plan compresses but the word embedding: the encoder linears and the 4-bit side weights). Each
is refit and distilled as ``fitformer compress`` distils a candidate (two stages, ``--epochs`` epochs; the
time budget is set high enough that the epochs end it) and tested in PyTorch on the 1,280 test reviews.
Neither student is small: they show where the full plan's lost points come from, not a model to ship.
``--collect DIR`` gathers a finished work directory.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_ema import SIZE_RUN  # noqa: E402
from benchmarks.common import markdown_table, parse_size_plan_args, size_plan_parser, write_results  # noqa: E402
from fitformer.config import build_config  # noqa: E402
from fitformer.errors import UserError  # noqa: E402
from fitformer.io import read_json, write_json_atomic  # noqa: E402
from fitformer.pipeline import Pipeline  # noqa: E402

PARTS = ("embedding", "encoder")
WORD_EMBEDDING = "embeddings.word_embeddings"
BUDGET_MINUTES = 240.0  # far above what the epochs take: the epochs, not the clock, end each distillation


def part_plan(plan: dict[str, Any], part: str) -> dict[str, Any]:
    """``plan`` (a ``CompressionPlan`` dict) reduced to one part: only the word embedding's steps and the model
    steps (``embedding``), or everything but the word embedding's steps (``encoder``)."""
    layers = plan["layers"]
    if part == "embedding":
        layers = {k: v for k, v in layers.items() if k.endswith(WORD_EMBEDDING)}
    elif part == "encoder":
        layers = {k: v for k, v in layers.items() if not k.endswith(WORD_EMBEDDING)}
    else:
        raise UserError(f"unknown part '{part}'; choose from {', '.join(PARTS)}")
    return {**plan, "layers": layers}


def run(plan_from: Path, work: Path, parts: list[str], epochs: float) -> dict[str, Any]:
    chosen = read_json(plan_from / "candidates.json")[0]
    done = work / "parts.json"
    results = read_json(done) if done.exists() else {}
    for part in parts:
        if part in results:
            continue
        config = build_config(preset="thorough", out=work / part, budget_minutes=BUDGET_MINUTES,
                              distill_epochs=epochs, **SIZE_RUN)
        pipeline = Pipeline(config, log=lambda m: print(m, flush=True))
        cand = {**chosen, "key": part, "plan": part_plan(chosen["plan"], part)}
        write_json_atomic(pipeline.run.file("candidates.json"), [cand])
        started = time.time()
        result = pipeline._train(cand, "distill/student")
        student = pipeline._student(cand, pipeline.run.file("distill/student/best/model.safetensors"))
        results[part] = {"part": part, "test_accuracy": pipeline.teacher.evaluate("test", model=student).accuracy,
                         "validation": result.validation_accuracy, "best_step": result.best_step,
                         "steps": result.steps, "minutes": (time.time() - started) / 60}
        print(results[part], flush=True)
        write_json_atomic(done, results)
    return results


def markdown(plan_from: Path, epochs: float, rows: list[dict[str, Any]]) -> str:
    return f"""## Where the size plan loses its points (`benchmarks/bench_size_parts.py`)

The chosen plan of the size run in `{plan_from}` split in two: `embedding` compresses only its word embedding
and keeps everything else in float; `encoder` compresses everything else as the plan does (the encoder
linears, the 4-bit position and token-type tables and pooler) and keeps the float word embedding. Each is
refit and distilled like a candidate of `fitformer compress` (two stages, {epochs:g} epochs) and tested in
PyTorch on 1,280 reviews (validation: the best of the evaluations on another 1,280). One run each: a single
run's test accuracy is uncertain by about a point.

{markdown_table(rows, ["part", "test_accuracy", "validation", "steps", "minutes"])}
"""


def main() -> None:
    p = size_plan_parser(__doc__.splitlines()[0], "runs/bench-size-parts", 6.0, "parts.json")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="Parts to distil alone.")
    args = parse_size_plan_args(p, "candidates.json")
    results = read_json(args.collect / "parts.json") if args.collect else \
        run(args.plan_from, args.work, args.parts, args.epochs)
    rows = [results[p] for p in PARTS if p in results]
    write_results("size_parts", {"plan_from": str(args.plan_from), "epochs": args.epochs, "rows": rows},
                  markdown(args.plan_from, args.epochs, rows))


if __name__ == "__main__":
    main()
