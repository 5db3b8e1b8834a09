"""Checkpoint selection: the best evaluation of a moving average of the weights against that of the raw weights.

Distils the first candidate of a finished size run (``bench_compress.py --runs size``) exactly as
``fitformer compress`` does (refit, then ``--minutes`` of distillation capped at ``--epochs``) with the raw
weights validated, as ``distill_ema_decay=0`` does, while a step hook keeps an exponential moving average of
the weights for each of ``--decays`` and validates it at every 100th step of the prediction stage. At the end
the raw best and each average's best ship the same way (frozen, onnxruntime integer kernels) and are tested:
one training trajectory, so the comparison is side by side. Each ``--seed`` (the distillation data order) adds
one run to ``benchmarks/results/ema.json``; the summary gives each decay's mean test gain over the raw weights.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fitformer.train as train  # noqa: E402
from benchmarks.common import RESULTS, markdown_table, parser, write_results  # noqa: E402
from fitformer.config import build_config  # noqa: E402
from fitformer.errors import UserError  # noqa: E402
from fitformer.io import read_json, write_json_atomic  # noqa: E402
from fitformer.pipeline import Pipeline  # noqa: E402
from fitformer.train.average import WeightAverage  # noqa: E402
from fitformer.train.evaluate import evaluate  # noqa: E402

SIZE_RUN = {"objective": "size", "devices": ["laptop-i7-1185g7"], "min_gain": 50.0, "max_accuracy_drop": 2.0,
            "embedding": True, "bits": [32, 8, 4], "candidates": 1, "distill_schedule": "two_stage",
            "distill_max_train_examples": None}


def run_seed(plan_from: Path, work: Path, seed: int, minutes: float, epochs: float,
             decays: list[float]) -> dict[str, Any]:
    """One distillation with the raw weights validated and, beside them, one moving average per decay."""
    config = build_config(preset="thorough", out=work, budget_minutes=minutes, distill_epochs=epochs,
                          distill_ema_decay=0.0, **SIZE_RUN)
    pipeline = Pipeline(config, log=lambda m: print(m, flush=True))
    cand = read_json(plan_from / "candidates.json")[0]
    write_json_atomic(pipeline.run.file("candidates.json"), [cand])
    averages: dict[float, WeightAverage] = {}
    best: dict[float, tuple[float, int, dict[str, torch.Tensor]]] = {d: (-1.0, -1, {}) for d in decays}
    history: list[dict[str, float]] = []
    distill = train.distill

    def with_averages(student, teacher, data, cfg, out_dir, hook=None, progress=None):
        cfg = dataclasses.replace(cfg, seed=seed)
        head = {"weight": student.classifier.weight.detach().clone(), "trained": False}

        def validate(model, step):
            row = {"step": step}
            for d in decays:
                with averages[d].applied(model):
                    row[str(d)] = evaluate(model, data.validation, data.label_names).accuracy
                    if row[str(d)] > best[d][0]:
                        best[d] = (row[str(d)], step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            model.train()
            history.append(row)
            print("average", row, flush=True)

        def step_hook(model, step, fraction):
            for d in decays:
                averages.setdefault(d, WeightAverage(model, d)).update(model)
            # the prediction stage, where the raw side validates too, is the one that trains the classifier
            head["trained"] = head["trained"] or not torch.equal(model.classifier.weight, head["weight"])
            if head["trained"] and step % cfg.eval_every_steps == 0:
                validate(model, step)

        result = distill(student, teacher, data, cfg, out_dir, hook=step_hook, progress=progress)
        if not history or history[-1]["step"] != result.steps:  # the last weights, as the raw side does
            validate(student, result.steps)
        return result

    train.distill = with_averages
    try:
        key = cand["key"][:12]
        started = time.time()
        result = pipeline._train(cand, f"distill/{key}")
    finally:
        train.distill = distill
    student = pipeline._student(cand, pipeline.run.file(f"distill/{key}/best/model.safetensors"))
    row: dict[str, Any] = {"seed": seed, "key": cand["key"], "minutes": minutes, "epochs": epochs,
                           "raw": {"validation": result.validation_accuracy, "best_step": result.best_step,
                                   "steps": result.steps}}
    row["raw"]["test"] = pipeline._deploy(student, cand, pipeline.run.file(f"candidates/{key}"))["test_accuracy"]
    for d in decays:
        accuracy, step, state = best[d]
        student.load_state_dict(state)
        test = pipeline._deploy(student, cand, pipeline.run.file(f"candidates/average-{d}"))["test_accuracy"]
        row[f"ema{d}"] = {"validation": accuracy, "best_step": step, "test": test}
    row["history"], row["seconds"] = history, time.time() - started
    write_json_atomic(work / "experiment.json", row)
    return row


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    decays = sorted({k for r in runs for k in r if k.startswith("ema")})
    out: dict[str, Any] = {"runs": len(runs), "raw_test_mean": statistics.fmean(r["raw"]["test"] for r in runs)}
    for d in decays:
        gains = [r[d]["test"] - r["raw"]["test"] for r in runs if d in r]
        out[d] = {"test_mean": statistics.fmean(r[d]["test"] for r in runs if d in r),
                  "test_gain_mean_points": 100 * statistics.fmean(gains),
                  "runs_better_than_raw": sum(g > 0 for g in gains)}
    return out


def markdown(runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    decays = sorted({k for r in runs for k in r if k.startswith("ema")})
    rows = []
    for r in runs:
        row = {"seed": f"{r['seed']}*" if r.get("collected") else r["seed"], "steps": r["raw"]["steps"],
               "raw val": r["raw"]["validation"], "raw test": r["raw"]["test"]}
        for d in decays:
            row[f"{d} val"], row[f"{d} test"] = r[d]["validation"], r[d]["test"]
        rows.append(row)
    columns = ["seed", "steps", "raw val", "raw test"] + [f"{d} {s}" for d in decays for s in ("val", "test")]
    collected = "" if not any(r.get("collected") for r in runs) else (
        "\n\\* gathered with `--collect` from runs of the benchmark's first version: no warm-up of the averages, "
        "validated from step 2,000 (docs/distillation.md).\n")
    gains = "; ".join(f"{d}: mean test gain {summary[d]['test_gain_mean_points']:+.2f} points, better in "
                      f"{summary[d]['runs_better_than_raw']} of {summary['runs']} runs" for d in decays)
    return f"""## Checkpoint selection by a moving average of the weights (`benchmarks/bench_ema.py`)

The size run's candidate (50x, 4-bit TT and low-rank layers) distilled once per seed as `fitformer compress`
does; beside the raw weights' evaluations, one exponential moving average per decay is validated every 100
steps of the prediction stage; each best ships as the model does (onnxruntime integer kernels) and is tested
on 1,280 reviews; validation on another 1,280.

{markdown_table(rows, columns)}

{gains}.
{collected}"""


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--plan-from", type=Path, default=Path("runs/bench-compress/size"),
                   help="A finished size run directory (bench_compress.py --runs size); its first candidate.")
    p.add_argument("--work", type=Path, default=Path("runs/bench-ema"), help="Run directories (one per seed).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the distillation data order.")
    p.add_argument("--minutes", type=float, default=45.0, help="Distillation budget (the size run's).")
    p.add_argument("--epochs", type=float, default=12.0, help="Most distillation epochs (the size run's).")
    p.add_argument("--decays", type=float, nargs="+", default=[0.99, 0.998], help="Decays of the averages.")
    p.add_argument("--collect", nargs="*", default=[], metavar="DIR:SEED",
                   help="Only gather the experiment.json of these finished work directories (each with the seed "
                        "it ran) into the results.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    previous = RESULTS / "ema.json"
    runs = {r["seed"]: r for r in read_json(previous)["runs"]} if previous.exists() else {}
    if args.collect:
        for item in args.collect:
            folder, _, seed = item.rpartition(":")
            if not folder or not seed.isdigit():
                raise UserError(f"--collect {item}: give DIR:SEED, e.g. runs/bench-ema/seed0:0")
            row = {**read_json(Path(folder) / "experiment.json"), "seed": int(seed), "collected": True}
            runs[row["seed"]] = row
    else:
        if not (args.plan_from / "candidates.json").exists():
            raise UserError(f"{args.plan_from} holds no candidates.json; run `python benchmarks/bench_compress.py "
                            "--runs size` first or pass --plan-from")
        runs[args.seed] = run_seed(args.plan_from, args.work / f"seed{args.seed}", args.seed, args.minutes,
                                   args.epochs, args.decays)
    ordered = [runs[s] for s in sorted(runs)]
    summary = summarize(ordered)
    write_results("ema", {"runs": ordered, "summary": summary}, markdown(ordered, summary))


if __name__ == "__main__":
    main()
