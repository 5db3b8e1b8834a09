"""The headline benchmark: ``fitformer compress`` on the default (MiniLM-L6 on rotten-tomatoes) three times —
for speed, size and energy — with the dense teacher and the uniform heuristic baseline measured in the same runs.

Runs (each a full ``compress`` run directory under ``--work``, resumable; the thorough preset unless
``--quick`` or ``--minutes``):

- ``speed``: objective latency on the laptop CPU of the catalog, sub-networks of int8 layers with an int8
  embedding, candidates modelled >= 3x faster than the teacher, at most 1.0 accuracy point lost;
- ``size``: objective size, the word embedding searched too (TT, 8/4 bits), candidates modelled >= 50x
  smaller, at most 2.0 points lost; one candidate distilled in two stages for up to 12 epochs or 45 minutes
  (the preset's four 15-minute distillations are too short for a 4-bit 50x student);
- ``energy``: objective energy-delay product on the Raspberry Pi 4 (edge), int8 sub-networks as for speed,
  candidates modelled >= 5.7x lower EDP, at most 1.1 points lost.

Every model is measured as it ships: quantized ones frozen, saved with packed integer weights and run in
onnxruntime on integer kernels, float ones in PyTorch; ``size_bytes`` is the weights file on disk;
``latency_ms_b1``/``latency_ms_b32`` are host wall-clock latencies at 128 tokens, the teacher and every run's
models timed in one interleaved loop at the end (so their ratios are not skewed by drift); ``edp`` maps catalog
devices to the modelled EDP (mJ*s, batch 1, 128 tokens). When a run finds no candidate that meets its
accuracy limit, the most accurate candidate is reported with ``"meets_constraints": false``.

With the thorough preset the speed run alone took 79 minutes on a 2-core host (19 of them fine-tuning the
teacher, which is cached for the next runs). Where the three runs cannot be made in one sitting,
``--runs speed``, ``--runs size`` and ``--runs energy`` write one file each (``compress-speed.json``, ...),
and ``--combine`` then writes ``compress.json`` from them, each target checked against the teacher timed in
its own run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, parser, write_results  # noqa: E402

from fitformer.config import build_config  # noqa: E402
from fitformer.errors import InfeasibleError  # noqa: E402
from fitformer.hardware import get_device  # noqa: E402
from fitformer.hardware.timing import measure_interleaved, random_token_inputs  # noqa: E402
from fitformer.io import read_json  # noqa: E402
from fitformer.pipeline import Pipeline, forward_call, is_candidate  # noqa: E402
from fitformer.search.cost import AnalyticCost  # noqa: E402
from fitformer.search.space import CandidateSpec, EncoderShape  # noqa: E402

EDGE = "raspberry-pi-4"
EDP_DEVICES = (EDGE, "jetson-agx-orin-64gb", "laptop-i7-1185g7", "xeon-platinum-8380")
INT8 = {"formats": ["dense"], "bits": [8], "embedding": True}  # sub-networks of int8 layers: integer kernels
RUNS: dict[str, dict[str, Any]] = {
    "speed": {"objective": "latency", "devices": ["laptop-i7-1185g7"], "min_gain": 3.0, "max_accuracy_drop": 1.0,
              **INT8},
    # the 50x student (4-bit TT and low-rank layers) needs the long two-stage distillation of the best size run
    # measured (run j in BENCHMARKS.md: one candidate, 12 epochs in 43 minutes), not four 15-minute ones
    "size": {"objective": "size", "devices": ["laptop-i7-1185g7"], "min_gain": 50.0, "max_accuracy_drop": 2.0,
             "embedding": True, "bits": [32, 8, 4], "candidates": 1, "budget_minutes": 45.0, "distill_epochs": 12.0,
             "distill_schedule": "two_stage"},
    "energy": {"objective": "edp", "devices": [EDGE], "min_gain": 5.7, "max_accuracy_drop": 1.1, **INT8},
}
# headline target per run: (what, factor over the teacher, accuracy points)
TARGETS = {"speed": ("latency_ms_b32", 3.0, 1.0), "size": ("size_bytes", 50.0, 2.0), "energy": (EDGE, 5.7, 1.1)}
ENTRY_KEYS = ("test_accuracy", "latency_ms_b1", "latency_ms_b32", "size_bytes", "runtime")


def edp_map(spec: dict[str, Any], shape: EncoderShape) -> dict[str, float]:
    """Modelled EDP (mJ*s) of a candidate on catalog devices, batch 1 at 128 tokens."""
    return {d: AnalyticCost(get_device(d), shape, (1, 128))(CandidateSpec.from_dict(spec))["edp_mjs"]
            for d in EDP_DEVICES}


def entry(row: dict[str, Any], spec: dict[str, Any], shape: EncoderShape, key: str) -> dict[str, Any]:
    return {"key": key, **{k: row[k] for k in ENTRY_KEYS}, "edp": edp_map(spec, shape)}


def run_one(name: str, overrides: dict[str, Any], work: Path, log) -> dict[str, Any]:
    config = build_config(preset="thorough", out=work / name, **{**RUNS[name], **overrides})
    pipeline = Pipeline(config, log=lambda m: log(f"[{name}] {m}"))
    reason = None
    try:
        pipeline.execute()
    except InfeasibleError as exc:
        log(f"[{name}] infeasible: {exc}")
        reason = str(exc)
    run = pipeline.run
    shape = pipeline.shape
    teacher_spec = read_json(run.file(f"search/{Path(config.devices[0]).stem}.json"))["teacher"]["spec"]
    if not run.file("evaluate.json").exists():  # the search found no plan that gains enough
        teacher = run.stage("evaluate-teacher", lambda r: (pipeline.evaluate_teacher(), []))
        return {"teacher": entry(teacher, teacher_spec, shape, "teacher"),
                "chosen": {"meets_constraints": False, "reason": reason}, "uniform": None}
    meets = reason is None
    evaluation = read_json(run.file("evaluate.json"))
    specs = {c["key"]: c["spec"] for c in read_json(run.file("candidates.json"))}
    summary = read_json(run.file("summary.json"))
    key = (summary.get("chosen") or {}).get("key") if meets else None
    if key is None:  # report the most accurate candidate, marked as not meeting the constraints
        key = max((k for k in evaluation if is_candidate(k)), key=lambda k: evaluation[k]["test_accuracy"])
    uniform = pipeline.uniform_baseline(key)
    return {"teacher": entry(evaluation["teacher"], teacher_spec, shape, "teacher"),
            "chosen": {**entry(evaluation[key], specs[key], shape, key), "meets_constraints": meets},
            "uniform": {**entry(uniform, uniform["spec"], shape, "uniform"), "rank": uniform["rank"]},
            "pipeline": pipeline}


def time_side_by_side(results: dict[str, dict[str, Any]], rounds: int, log) -> None:
    """Re-time the teacher and every run's chosen model and uniform baseline in one interleaved loop (batch 1
    and 32, 128 tokens) and write those latencies into the entries: each run's own timings are minutes apart,
    and this machine's speed drifts by more than the gains between them."""
    models: dict[tuple[str, str], tuple[Any, Any]] = {}
    for name, r in results.items():
        if r["uniform"] is None:
            continue
        pipeline = r["pipeline"]
        if ("teacher", "") not in models:
            models[("teacher", "")] = pipeline.deployed("teacher")
        models[(name, "chosen")] = pipeline.deployed(r["chosen"]["key"])
        models[(name, "uniform")] = pipeline.deployed("uniform")
    if len(models) < 2:
        return
    vocab = int(next(iter(results.values()))["pipeline"].teacher.model.config.vocab_size)
    for batch in (1, 32):
        inputs = random_token_inputs(batch, 128, vocab)
        log(f"timing {len(models)} models side by side at batch {batch}")
        ms = measure_interleaved([forward_call(m, s, inputs) for m, s in models.values()], rounds=rounds)
        for (name, role), t in zip(models, ms, strict=True):
            targets = [r["teacher"] for r in results.values()] if name == "teacher" else [results[name][role]]
            for e in targets:
                e[f"latency_ms_b{batch}"] = t


def check(name: str, teacher: dict[str, Any], chosen: dict[str, Any], uniform: dict[str, Any]) -> dict[str, Any]:
    if uniform is None:
        return {"met": False, "reason": chosen["reason"]}
    what, factor, points = TARGETS[name]
    t, c = (teacher["edp"][what], chosen["edp"][what]) if name == "energy" else (teacher[what], chosen[what])
    drop = 100 * (teacher["test_accuracy"] - chosen["test_accuracy"])
    gain = t / c
    return {"gain": gain, "target_gain": factor, "accuracy_drop_points": drop, "max_drop_points": points,
            "beats_uniform": chosen["test_accuracy"] > uniform["test_accuracy"],
            "met": gain >= factor and drop <= points and chosen["test_accuracy"] > uniform["test_accuracy"]}


def markdown(result: dict[str, Any], settings: dict[str, Any]) -> str:
    by_run = result.get("teacher_by_run")  # a combined result: each run timed its own teacher
    rows = [] if by_run else [{"model": "teacher", **result["teacher"]}]
    for name in result["chosen"]:
        if by_run:
            rows.append({"model": f"{name}: teacher", **by_run[name]})
        if result["uniform_baseline"][name] is None:
            continue
        rows.append({"model": f"{name}: chosen", **result["chosen"][name]})
        rows.append({"model": f"{name}: uniform", **result["uniform_baseline"][name]})
    for r in rows:
        r["size_mb"] = r["size_bytes"] / 1e6
        r[f"edp_{EDGE}"] = r["edp"][EDGE]
    table = markdown_table(rows, ["model", "runtime", "test_accuracy", "latency_ms_b1", "latency_ms_b32", "size_mb",
                                  f"edp_{EDGE}"])
    targets = markdown_table([{"run": n, **t} for n, t in result["targets"].items()],
                             ["run", "gain", "target_gain", "accuracy_drop_points", "max_drop_points",
                              "beats_uniform", "met"], floatfmt=".2f")
    missing = "".join(f"\n- {n}: {t['reason']}" for n, t in result["targets"].items() if "reason" in t)
    missing = f"\nRuns with no candidate to distil:{missing}\n" if missing else ""
    subset = "" if set(result["chosen"]) == set(RUNS) else " --runs " + " ".join(result["chosen"])
    loop = ("each run's models timed with its own teacher in one interleaved loop (the runs were made "
            "separately and combined with `--combine`)" if by_run else "all models timed in one interleaved loop")
    return f"""## Compress end to end (`benchmarks/bench_compress.py{subset}`)

`fitformer compress` on MiniLM-L6 / rotten-tomatoes, runs: {", ".join(result["chosen"])}; settings
{settings}. Every model measured as it ships (quantized: packed weights, onnxruntime integer kernels);
test accuracy on 1,280 held-out reviews; host latency at 128 tokens, {loop};
size = weights file on disk; EDP modelled on the catalog's Raspberry Pi 4 (mJ*s, batch 1). The uniform
baseline is HEAT's heuristic (one TT rank and bit width everywhere, the chosen model's word embedding) at the
chosen model's size, trained with the same budget.

{table}

Headline targets (gain over the teacher: batch-32 latency, file size, modelled edge EDP):

{targets}
{missing}"""


def combine(quick: bool) -> dict[str, Any]:
    """The three-run result from the single-run files that ``--runs speed``, ``--runs size`` and ``--runs energy``
    wrote, when the runs could not be made in one sitting (the thorough speed run alone took 79 minutes,
    19 of them fine-tuning the teacher).
    Each target is checked against the teacher timed in the same run, since latencies measured hours apart
    are not comparable; ``teacher`` is the speed run's, ``teacher_by_run`` has each run's."""
    parts = {}
    for name in RUNS:
        path = RESULTS / (f"compress-{name}.quick.json" if quick else f"compress-{name}.json")
        if not path.exists():
            raise SystemExit(f"--combine needs {path.name}: run `python benchmarks/bench_compress.py --runs {name}"
                             f"{' --quick' if quick else ''}` first")
        parts[name] = read_json(path)
    # the same kind of machine (cores, threads, torch); a fresh VM of that kind may run another kernel build
    machines = {json.dumps({k: v for k, v in p["machine"].items() if k != "platform"}, sort_keys=True)
                for p in parts.values()}
    if len(machines) > 1:
        raise SystemExit("--combine needs the three runs from one kind of machine; "
                         f"theirs differ: {', '.join(sorted(machines))}")
    return {"teacher": parts["speed"]["teacher"],
            "teacher_by_run": {n: p["teacher"] for n, p in parts.items()},
            "chosen": {n: p["chosen"][n] for n, p in parts.items()},
            "uniform_baseline": {n: p["uniform_baseline"][n] for n, p in parts.items()},
            "settings": {n: p["settings"] for n, p in parts.items()},
            "targets": {n: p["targets"][n] for n, p in parts.items()}}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/bench-compress"), help="Run directories (resumable).")
    p.add_argument("--minutes", type=float, default=None, help="Distillation minutes per run (default: preset).")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="Which runs.")
    p.add_argument("--model", default=None, help="Model (default: minilm-l6); a tiny one for a smoke test.")
    p.add_argument("--data", type=Path, default=None, help="Labelled data file instead of rotten-tomatoes.")
    p.add_argument("--train-examples", type=int, default=None, help="Training examples used for distillation "
                   "(default: preset; 0: all of them).")
    p.add_argument("--learning-rate", type=float, default=None, help="Peak distillation learning rate "
                   "(default: RunConfig's distill_learning_rate).")
    p.add_argument("--epochs", type=float, default=None, help="Most distillation epochs per candidate (default: "
                   "RunConfig's distill_epochs); raise it so that --minutes, not the epochs, ends distillation.")
    p.add_argument("--word-dropout", type=float, default=None, help="Distillation augmentation, as RunConfig's "
                   "distill_word_dropout (default 0).")
    p.add_argument("--neighbour-swap", type=float, default=None, help="Distillation augmentation, as RunConfig's "
                   "distill_neighbour_swap (default 0).")
    p.add_argument("--temperature", type=float, default=None, help="Soft-target temperature of distillation, as "
                   "RunConfig's distill_temperature (default 1).")
    p.add_argument("--ema-decay", type=float, default=None, help="Decay of the moving average of the weights "
                   "that is validated and shipped, as RunConfig's distill_ema_decay (default 0.99; 0: the raw "
                   "weights).")
    p.add_argument("--hidden-loss", choices=["mse", "cosine", "fisher"], default=None, help="How the two_stage "
                   "schedule matches hidden states, as RunConfig's distill_hidden_loss (default mse).")
    p.add_argument("--fisher-examples", type=int, default=None, help="Training examples whose teacher gradients "
                   "steer the refit of a TT word embedding, as RunConfig's refit_fisher_examples (default 1024; "
                   "0: rows by token counts, plain metric).")
    p.add_argument("--fisher-weighs", choices=["directions", "rows", "both"], default=None, help="What that Fisher "
                   "information steers, as RunConfig's refit_fisher_weighs (default directions).")
    p.add_argument("--refit-inputs", choices=["student", "teacher"], default=None, help="What each factorized "
                   "layer is refit on, as RunConfig's refit_inputs (default student: in order, on the student's "
                   "inputs).")
    p.add_argument("--schedule", default=None, help="Distillation schedule, as RunConfig's distill_schedule "
                   "(default: the preset's; docs/distillation.md).")
    p.add_argument("--candidates", type=int, default=None, help="Candidates distilled per run (default: preset); "
                   "--minutes is split between them.")
    p.add_argument("--search-budget", type=int, default=None, help="Plans each search evaluates (default: "
                   "preset).")
    p.add_argument("--bits", type=int, nargs="+", default=None, help="Weight bit widths the search may choose, "
                   "as RunConfig's bits (default: each run's own).")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="TT and low-rank ranks the search may "
                   "choose, as RunConfig's ranks (default: RunConfig's).")
    p.add_argument("--combine", action="store_true", help="Write compress.json from the three single-run files "
                   "(compress-speed.json, compress-size.json, compress-energy.json) instead of running anything.")
    args = p.parse_args()
    if args.combine:
        out = combine(args.quick)
        write_results("compress", out, markdown(out, out["settings"]), quick=args.quick)
        return
    torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"teacher_epochs": 3, "threads": args.threads}
    if args.quick:
        overrides.update(search_budget=150, candidates=2, budget_minutes=6.0, distill_max_train_examples=4000,
                         latency_repeats=10, distill_schedule="logits_kd")
    if args.model is not None:
        overrides["model"] = args.model
    if args.data is not None:
        overrides["data"] = args.data
    if args.minutes is not None:
        overrides["budget_minutes"] = args.minutes
    if args.train_examples is not None:
        overrides["distill_max_train_examples"] = args.train_examples or None
    if args.epochs is not None:
        overrides["distill_epochs"] = args.epochs
    if args.learning_rate is not None:
        overrides["distill_learning_rate"] = args.learning_rate
    if args.word_dropout is not None:
        overrides["distill_word_dropout"] = args.word_dropout
    if args.neighbour_swap is not None:
        overrides["distill_neighbour_swap"] = args.neighbour_swap
    if args.temperature is not None:
        overrides["distill_temperature"] = args.temperature
    if args.ema_decay is not None:
        overrides["distill_ema_decay"] = args.ema_decay
    if args.hidden_loss is not None:
        overrides["distill_hidden_loss"] = args.hidden_loss
    if args.fisher_examples is not None:
        overrides["refit_fisher_examples"] = args.fisher_examples
    if args.fisher_weighs is not None:
        overrides["refit_fisher_weighs"] = args.fisher_weighs
    if args.refit_inputs is not None:
        overrides["refit_inputs"] = args.refit_inputs
    if args.schedule is not None:
        overrides["distill_schedule"] = args.schedule
    if args.candidates is not None:
        overrides["candidates"] = args.candidates
    if args.search_budget is not None:
        overrides["search_budget"] = args.search_budget
    if args.bits is not None:
        overrides["bits"] = args.bits
    if args.ranks is not None:
        overrides["ranks"] = args.ranks
    results = {name: run_one(name, overrides, args.work, log=print) for name in args.runs}
    time_side_by_side(results, rounds=4 if args.quick else 8, log=print)
    first = next(iter(results.values()))
    out = {"teacher": first["teacher"], "chosen": {n: r["chosen"] for n, r in results.items()},
           "uniform_baseline": {n: r["uniform"] for n, r in results.items()},
           "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items() if k != "threads"},
                        "runs": {n: RUNS[n] for n in results}}}
    out["targets"] = {n: check(n, first["teacher"], out["chosen"][n], out["uniform_baseline"][n]) for n in results}
    # a subset of the runs gets its own file (compress-size.json, ...), so it never replaces a three-run result
    name = "compress" if set(results) == set(RUNS) else "-".join(["compress", *results])
    write_results(name, out, markdown(out, out["settings"]), quick=args.quick)
    for n, t in out["targets"].items():
        print(n, {k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()})


if __name__ == "__main__":
    main()
