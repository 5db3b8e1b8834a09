"""Distillation schedules on one aggressive TT student of the real MiniLM teacher, same time budget each.

The student: every linear layer of the six encoder layers (attention Q/K/V/output, FFN in/out) as a
TT-matrix initialised by TT-SVD of the fine-tuned teacher's weights and then refit to the teacher's layer
outputs on 256 training examples (``--refit-steps``), at the largest uniform rank that makes the encoder
at least 10x smaller (encoder parameters = everything inside ``bert.encoder``: TT cores, biases and
LayerNorms; the embedding, pooler and classifier stay dense and are not counted).
Each schedule trains a fresh copy of it for the same number of minutes; the table reports test accuracy
of the best-validation weights, and how much of the gap between ``finetune_only`` and the teacher the
best schedule closes.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, parser, write_results  # noqa: E402

from fitformer.compress import CompressionPlan, TTPlan, apply_plan, refit_factorized  # noqa: E402
from fitformer.compress.tt import linear_layers  # noqa: E402
from fitformer.data import load_task, split_dataset  # noqa: E402
from fitformer.layers.tensorize import choose_tensorization  # noqa: E402
from fitformer.models import count_parameters, load_classifier  # noqa: E402
from fitformer.train import (  # noqa: E402
    SCHEDULES,
    DistillConfig,
    DistillData,
    FinetuneConfig,
    Teacher,
    distill,
    get_teacher,
)


def encoder_parameters(model: torch.nn.Module) -> int:
    return count_parameters(model.base_model.encoder)


def tt_encoder_plan(model: torch.nn.Module, rank: int) -> tuple[CompressionPlan, int]:
    """A TT plan for every encoder linear layer at ``rank`` (3 cores, the toolkit's FLOP-optimal tensorization,
    chosen once per distinct layer size) and the number of TT-core parameters it gives."""
    layers = linear_layers(model, ("*encoder.layer.*",))
    shapes = {}
    for m in layers.values():
        key = (m.in_features, m.out_features)
        if key not in shapes:
            shapes[key] = choose_tensorization(*key, rank, (3,))
    plan = CompressionPlan(layers={
        n: [TTPlan(shapes[(m.in_features, m.out_features)].in_modes, shapes[(m.in_features, m.out_features)].out_modes,
                   rank, None, 3)] for n, m in layers.items()})
    cores = sum(shapes[(m.in_features, m.out_features)].params for m in layers.values())
    return plan, cores


def build_student(teacher_model: torch.nn.Module, min_ratio: float) -> tuple[torch.nn.Module, dict]:
    """The TT student at the largest rank whose whole encoder is at least ``min_ratio`` times smaller."""
    dense = encoder_parameters(teacher_model)
    dense_weights = sum(m.weight.numel() for m in linear_layers(teacher_model, ("*encoder.layer.*",)).values())
    for rank in (64, 56, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4):
        plan, cores = tt_encoder_plan(teacher_model, rank)
        if dense / (dense - dense_weights + cores) >= min_ratio:
            break
    student = apply_plan(teacher_model, plan)
    ratio = dense / encoder_parameters(student)
    if ratio < min_ratio:
        raise RuntimeError(f"TT student at rank {rank} is only {ratio:.1f}x smaller")
    first = next(iter(plan.layers.values()))[0]
    info = {"encoder_parameters_teacher": dense, "encoder_parameters_student": encoder_parameters(student),
            "encoder_compression": ratio, "tt_rank": rank, "tt_layers": len(plan.layers),
            "num_cores": first.num_cores}
    return student, info


def teacher_from_dir(model_dir: str) -> Teacher:
    """A Teacher around an already fine-tuned classifier, with the default teacher's data splits."""
    model, tokenizer = load_classifier(model_dir)
    return Teacher(model, tokenizer, split_dataset(load_task(None), seed=0), FinetuneConfig(), None)  # type: ignore[arg-type]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=None, help="Budget per schedule (default 12, quick 0.75).")
    p.add_argument("--ratio", type=float, default=10.0, help="Minimum encoder compression of the student.")
    p.add_argument("--refit-steps", type=int, default=200, help="Steps of the data-aware refit of every TT layer "
                   "to the teacher's outputs before distillation (0: TT-SVD start only).")
    p.add_argument("--val-examples", type=int, default=500, help="Validation rows used for early stopping.")
    p.add_argument("--teacher-dir", default=None, help="A fine-tuned classifier directory to use instead of "
                   "get_teacher() (same task, splits and max length as the default teacher).")
    p.add_argument("--word-dropout", type=float, default=0.1, help="Augmentation of every schedule's training "
                   "batches: drop each word piece with this probability (0: the plain data). The teacher "
                   "labels what the student sees, so the distilling schedules learn from new soft targets "
                   "every epoch while finetune_only keeps the original label.")
    p.add_argument("--learning-rate", type=float, default=DistillConfig.learning_rate,
                   help="Peak learning rate of every schedule (default: DistillConfig's).")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES,
                   help="Schedules to run (default: all).")
    args = p.parse_args()
    if "finetune_only" not in args.schedules:
        p.error("--schedules must include finetune_only, the baseline the gap is measured from")
    torch.set_num_threads(args.threads)
    minutes = args.minutes or (0.75 if args.quick else 12.0)
    teacher = get_teacher() if args.teacher_dir is None else teacher_from_dir(args.teacher_dir)
    teacher_accuracy = teacher.evaluate("test").accuracy
    student0, info = build_student(teacher.model, args.ratio)
    print(f"teacher test accuracy {teacher_accuracy:.4f}; student encoder {info['encoder_compression']:.1f}x "
          f"smaller (TT rank {info['tt_rank']}, {info['tt_layers']} layers)")
    data = DistillData.from_teacher(teacher, max_train_examples=2000 if args.quick else None)
    svd_accuracy = teacher.evaluate("test", model=student0).accuracy
    refit = None
    if args.refit_steps:
        t0 = time.perf_counter()
        report = refit_factorized(student0, teacher.model, data.train.select(range(256)).batches(32),
                                  steps=args.refit_steps)
        refit = {"steps": args.refit_steps, "seconds": time.perf_counter() - t0,
                 "mean_error_before": statistics.fmean(report.before.values()),
                 "mean_error_after": statistics.fmean(report.after.values())}
        print(f"{report.summary()} in {refit['seconds']:.0f} s")
    pick = torch.randperm(len(data.validation), generator=torch.Generator().manual_seed(0))
    data.validation = data.validation.select(pick[: 300 if args.quick else args.val_examples])
    default = DistillConfig().schedule
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        untrained = teacher.evaluate("test", model=student0).accuracy if refit else svd_accuracy
        for method in args.schedules:
            student = copy.deepcopy(student0)
            config = DistillConfig(schedule=method, budget_minutes=minutes, max_steps=10**9,
                                   eval_every_steps=25 if args.quick else 100, word_dropout=args.word_dropout,
                                   learning_rate=args.learning_rate)
            t0 = time.perf_counter()
            result = distill(student, teacher.model, data, config, f"{tmp}/{method}")
            wall = time.perf_counter() - t0
            accuracy = teacher.evaluate("test", model=student).accuracy
            rows.append({"method": method, "test_accuracy": accuracy, "minutes": result.seconds / 60,
                         "validation_accuracy": result.validation_accuracy, "steps": result.steps,
                         "stages": result.stages, "wall_minutes": wall / 60})
            print(f"{method}: test accuracy {accuracy:.4f} after {result.steps} steps, {result.seconds / 60:.1f} min")
    baseline = next(r["test_accuracy"] for r in rows if r["method"] == "finetune_only")
    best = max((r for r in rows if r["method"] != "finetune_only"), key=lambda r: r["test_accuracy"])
    gap = teacher_accuracy - baseline
    closed = (best["test_accuracy"] - baseline) / gap if gap > 0 else float("nan")
    best_overall = max(rows, key=lambda r: r["test_accuracy"])["method"]
    payload = {"teacher_accuracy": teacher_accuracy, "teacher": args.teacher_dir or "get_teacher()",
               "default": default, "rows": rows,
               "student": info, "student_accuracy_before_training": untrained,
               "student_accuracy_tt_svd": svd_accuracy, "refit": refit, "budget_minutes": minutes,
               "best_method": best_overall, "gap_closed_by_best": closed, "word_dropout": args.word_dropout,
               "learning_rate": args.learning_rate, "targets": {"gap_closed_at_least": 0.5, "default_is_best": True},
               "met": {"gap_closed": closed >= 0.5, "default_is_best": best_overall == default}}
    table = markdown_table([{**r, "minutes": round(r["minutes"], 1)} for r in rows],
                           ["method", "test_accuracy", "validation_accuracy", "steps", "minutes"])
    threads = torch.get_num_threads()
    refit_text = "" if refit is None else (
        f", refit to the teacher's layer outputs on 256 training examples ({refit['steps']} steps per layer, "
        f"{refit['seconds']:.0f} s; mean relative output error {refit['mean_error_before']:.2f} -> "
        f"{refit['mean_error_after']:.2f})")
    markdown = f"""## Distillation schedules (`bench_distill.py`)

Student: all {info['tt_layers']} encoder linear layers of the fine-tuned MiniLM-L6 as TT-matrices (rank
{info['tt_rank']}, {info['num_cores']} cores, TT-SVD init), encoder {info['encoder_compression']:.1f}x smaller
({info['encoder_parameters_student']:,} vs {info['encoder_parameters_teacher']:,} parameters; embedding not
counted, left dense). Teacher ({args.teacher_dir or "the cached teacher"}) test accuracy
{teacher_accuracy:.3f}; the student from TT-SVD {svd_accuracy:.3f}{refit_text}, before training
{untrained:.3f}. Each schedule: {minutes:g} minutes on the same
data (batches grouped by length, `group_by_length={DistillConfig().group_by_length}`; word dropout
{args.word_dropout:g}; peak learning rate {args.learning_rate:g}), {threads} threads; early
stopping on {len(data.validation)} validation rows; best-validation weights scored
on the test split.

{table}

Best schedule `{best['method']}` closes {closed:.0%} of the gap between `finetune_only` and the teacher
(target 50%); the default schedule is `{default}`, the best measured is `{best_overall}`.
"""
    write_results("distill", payload, markdown, quick=args.quick)


if __name__ == "__main__":
    main()
