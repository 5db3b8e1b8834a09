"""Per-layer allocation against one low rank everywhere, at the size run's file size, after distillation.

The size run's search allocates formats, ranks and bits layer by layer (``search/allocate.py``), guided by a
proxy measured before any training. This benchmark asks whether that allocation still pays once the student
is distilled: it takes the chosen plan of a finished size run (``bench_compress.py --runs size``), replaces
every encoder linear by the 2-core low rank ``(in, 1) x (1, out)`` at 4 bits with the largest single rank
whose file is no larger than the chosen plan's (the word embedding and side weights kept as chosen), and
distils, ships and tests it exactly as ``fitformer compress`` does the chosen plan (refit, ``--minutes`` of
two-stage distillation capped at ``--epochs``, frozen, onnxruntime integer kernels). The chosen plan's own
test accuracy is read from that run's evaluation. ``--collect DIR`` gathers a finished work directory.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_ema import SIZE_RUN  # noqa: E402
from benchmarks.common import markdown_table, parse_size_plan_args, size_plan_parser, write_results  # noqa: E402
from fitformer.config import build_config  # noqa: E402
from fitformer.errors import UserError  # noqa: E402
from fitformer.io import read_json, write_json_atomic  # noqa: E402
from fitformer.pipeline import Pipeline, _plan_for  # noqa: E402
from fitformer.search.space import CandidateSpec, largest_rank_within  # noqa: E402

BITS = 4


def uniform_lowrank(chosen: CandidateSpec, rank: int) -> CandidateSpec:
    """``chosen`` with every encoder linear as the rank-``rank`` low rank at :data:`BITS` bits."""
    layers = tuple(replace(x, format="tt", rank=rank, in_modes=(x.in_features, 1), out_modes=(1, x.out_features),
                           bits=BITS, sparsity=0.0) for x in chosen.layers)
    return replace(chosen, layers=layers)


def largest_rank(chosen: CandidateSpec) -> int:
    """The largest rank whose file is no larger than ``chosen``'s."""
    def build(rank: int) -> CandidateSpec:
        return uniform_lowrank(chosen, rank)

    high = min(min(x.in_features, x.out_features) for x in chosen.layers)
    rank = largest_rank_within(build, chosen.file_bytes(), high)
    if build(rank).file_bytes() > chosen.file_bytes():
        raise UserError("no single low rank fits the chosen plan's file size")
    return rank


def run(plan_from: Path, work: Path, minutes: float, epochs: float) -> dict[str, Any]:
    config = build_config(preset="thorough", out=work, budget_minutes=minutes, distill_epochs=epochs, **SIZE_RUN)
    pipeline = Pipeline(config, log=lambda m: print(m, flush=True))
    chosen = CandidateSpec.from_dict(read_json(plan_from / "candidates.json")[0]["spec"])
    rank = largest_rank(chosen)
    uniform = uniform_lowrank(chosen, rank)
    spec = uniform.to_dict()
    print(f"uniform low rank {rank} at {BITS} bits: {uniform.file_bytes():,} predicted bytes, the chosen plan "
          f"{chosen.file_bytes():,}", flush=True)
    cand = {"key": f"lowrank{rank}", "spec": spec, "plan": _plan_for(spec, pipeline.shape).to_dict()}
    write_json_atomic(pipeline.run.file("candidates.json"), [cand])
    started = time.time()
    result = pipeline._train(cand, "distill/lowrank")
    student = pipeline._student(cand, pipeline.run.file("distill/lowrank/best/model.safetensors"))
    row = pipeline._deploy(student, cand, pipeline.run.file("candidates/lowrank"))
    row.update(rank=rank, validation=result.validation_accuracy, best_step=result.best_step, steps=result.steps,
               seconds=time.time() - started)
    write_json_atomic(work / "experiment.json", row)
    return row


def chosen_row(plan_from: Path) -> dict[str, Any]:
    """The chosen plan as its size run tested it (its evaluation and distillation stages)."""
    key = read_json(plan_from / "candidates.json")[0]["key"]
    tested = read_json(plan_from / "evaluate.json")[key]
    distilled = read_json(plan_from / "distill" / key[:12] / "result.json")
    return {"plan": f"allocated ({key[:8]})", "test_accuracy": tested["test_accuracy"],
            "size_bytes": tested["size_bytes"], "validation": distilled["validation_accuracy"],
            "steps": distilled["steps"]}


def markdown(plan_from: Path, rows: list[dict[str, Any]]) -> str:
    return f"""## Per-layer allocation against one low rank everywhere (`benchmarks/bench_uniform_lowrank.py`)

The chosen plan of the size run in `{plan_from}` (per-layer formats, ranks and bits from the search) against
every encoder linear as one 4-bit low rank, the largest whose file is no larger, with the same word embedding
and side weights; both distilled the same way (two stages, 12 epochs or the time budget), shipped on
onnxruntime integer kernels and tested on 1,280 reviews (validation: the best of the evaluations on another
1,280). One run each: a single size run's test accuracy is uncertain by about a point.

{markdown_table(rows, ["plan", "test_accuracy", "validation", "steps", "size_bytes"])}
"""


def main() -> None:
    p = size_plan_parser(__doc__.splitlines()[0], "runs/bench-uniform-lowrank", 12.0, "experiment.json")
    p.add_argument("--minutes", type=float, default=38.0, help="Distillation budget (bench_compress --minutes).")
    args = parse_size_plan_args(p, "evaluate.json")
    row = read_json(args.collect / "experiment.json") if args.collect else \
        run(args.plan_from, args.work, args.minutes, args.epochs)
    rows = [chosen_row(args.plan_from),
            {"plan": f"uniform low rank {row['rank']}",
             **{k: row[k] for k in ("test_accuracy", "size_bytes", "validation", "steps")}}]
    write_results("allocation", {"plan_from": str(args.plan_from), "rows": rows, "uniform": row},
                  markdown(args.plan_from, rows))


if __name__ == "__main__":
    main()
