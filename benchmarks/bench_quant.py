"""Quantization benchmark: LSQ quantization-aware training of the MiniLM teacher, measured for real.

Rows (one run, side by side, ``torch.set_num_threads`` and onnxruntime on the same thread count):

- ``dense_fp32`` — the fine-tuned teacher in PyTorch; size = its safetensors file.
- ``dense_fp32_ort`` — the same model exported to ONNX, in onnxruntime; size = the ONNX file.
- ``torch_dynamic_int8`` — the peer: ``torch.ao.quantization.quantize_dynamic`` (int8 Linear) in PyTorch.
- ``qat_w8a8`` / ``qat_w4a8`` — LSQ QAT (logits KD + CE from the teacher), frozen, saved packed; run in
  onnxruntime with integer MatMuls (both ONNX forms are timed, the faster is reported).
- ``qat_w4a8_tt`` — TT layers (TT-SVD of every encoder linear and of the word embedding) with 4-bit cores
  (a step size per bond channel) and 8-bit intermediates, 8-bit position and token-type tables,
  then QAT with the two-stage distillation (hidden states, then logits).

Sizes are files on disk; accuracy is on the test split (of the onnxruntime model for our rows); latency
is batch 1 and batch 32 at 128 tokens.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, parser, write_results  # noqa: E402
from fitformer.compress import CompressionPlan, apply_plan, refit_factorized  # noqa: E402
from fitformer.compress.quant import QuantPlan, calibrate, freeze, quantize  # noqa: E402
from fitformer.compress.tt import TTEmbeddingPlan, TTPlan, linear_layers  # noqa: E402
from fitformer.data import load_task, split_dataset  # noqa: E402
from fitformer.export.onnx_quant import (  # noqa: E402
    FORMATS,
    compare_with_torch,
    export_onnx,
    export_quantized_onnx,
    ort_predict,
    ort_session,
)
from fitformer.export.quantized import save_quantized, size_bytes  # noqa: E402
from fitformer.hardware.timing import measure  # noqa: E402
from fitformer.io import cache_root, sha256_file, sha256_json  # noqa: E402
from fitformer.layers.tensorize import choose_tensorization  # noqa: E402
from fitformer.models import load_classifier  # noqa: E402
from fitformer.train import FinetuneConfig, Teacher, evaluate, get_teacher, metrics_from_predictions  # noqa: E402
from fitformer.train.distill import DistillConfig, DistillData, distill  # noqa: E402

SEQ = 128


def teacher_from_dir(model_dir: str) -> Teacher:
    """A Teacher around an already fine-tuned classifier, with the default teacher's data splits."""
    model, tokenizer = load_classifier(model_dir)
    teacher = Teacher(model, tokenizer, split_dataset(load_task(None), seed=0), FinetuneConfig(), None)  # type: ignore[arg-type]
    teacher.source_dir = Path(model_dir)
    return teacher


def dense_file_of(teacher: Teacher) -> Path:
    return getattr(teacher, "source_dir", None) or teacher.model_dir


def latency_inputs(batch: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, SEQ), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[:, -1] = min(101, vocab - 1), min(102, vocab - 1)  # [CLS] ... [SEP] of the BERT vocabulary
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def time_torch(model: nn.Module, inputs: dict[str, dict[str, torch.Tensor]], quick: bool) -> dict[str, float]:
    model.eval()
    out = {}
    for name, batch in inputs.items():
        with torch.inference_mode():
            t = measure(lambda b=batch: model(**b), warmup=2, repeats=5 if quick else (30 if name == "b1" else 10),
                        max_seconds=10 if quick else 40)
        out[f"latency_ms_{name}"] = t.mean_ms
    return out


def time_ort(session, inputs: dict[str, dict[str, torch.Tensor]], quick: bool) -> dict[str, float]:
    out = {}
    for name, batch in inputs.items():
        feeds = {k: v.numpy().astype(np.int64) for k, v in batch.items()}
        t = measure(lambda f=feeds: session.run(["logits"], f), warmup=2,
                    repeats=5 if quick else (30 if name == "b1" else 10), max_seconds=10 if quick else 40)
        out[f"latency_ms_{name}"] = t.mean_ms
    return out


def ort_accuracy(session, test, label_names) -> float:
    return metrics_from_predictions(ort_predict(session, test).argmax(-1), test.labels, label_names).accuracy


def qat_row(method: str, base: nn.Module, spec: Any, teacher, test, calib, inputs, steps: int, minutes: float,
            lr: float, work: Path, threads: int, quick: bool, schedule: str = "logits_kd",
            key_extra: Any = None) -> dict[str, Any]:
    """Quantize, calibrate, distil, freeze, save packed, export to ONNX, evaluate and time."""
    t0 = time.perf_counter()
    student = quantize(base, spec)
    calibrate(student, calib)
    ptq = evaluate(student, test, teacher.label_names).accuracy
    config = DistillConfig(schedule=schedule, max_steps=steps, budget_minutes=minutes, learning_rate=lr,
                           warmup_ratio=0.1,
                           eval_every_steps=steps, checkpoint_every_steps=max(50, steps // 4), batch_size=32)
    weights = sha256_file(dense_file_of(teacher) / "model.safetensors")
    # every distillation setting (defaults included) is in the key: a changed default retrains, never reuses
    key = sha256_json([method, weights, repr(spec), quick, asdict(config)]
                      + ([] if key_extra is None else [key_extra]))[:12]
    result = distill(student, teacher.model, DistillData.from_teacher(teacher), config, work / f"{method}-{key}",
                     progress=False)
    frozen = freeze(student)
    torch_acc = evaluate(frozen, test, teacher.label_names).accuracy
    size = save_quantized(frozen, work / f"{method}.safetensors", meta={"method": method})
    formats: dict[str, dict[str, float]] = {}
    best = None
    for fmt in FORMATS:
        info = export_quantized_onnx(frozen, work / f"{method}.{fmt}.onnx", fmt)
        session = ort_session(info["path"], threads)
        formats[fmt] = {**time_ort(session, inputs, quick), "onnx_size_bytes": info["size_bytes"]}
        if best is None or formats[fmt]["latency_ms_b32"] < formats[best[0]]["latency_ms_b32"]:
            best = (fmt, session)
    fmt, session = best
    gap = compare_with_torch(frozen, session, list(test.select(range(min(256, len(test)))).batches(64)))
    return {
        "method": method, "runtime": f"onnxruntime ({fmt})",
        "test_accuracy": ort_accuracy(session, test, teacher.label_names), "size_bytes": size,
        "latency_ms_b1": formats[fmt]["latency_ms_b1"], "latency_ms_b32": formats[fmt]["latency_ms_b32"],
        "torch_fake_quant_accuracy": torch_acc, "ptq_accuracy": ptq, "qat_steps": result.steps,
        "qat_seconds": result.seconds, "qat_schedule": schedule, "ort_vs_torch": gap, "onnx_formats": formats,
        "spec": repr(spec), "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps-w8", type=int, default=150, help="QAT steps of qat_w8a8 (at most).")
    p.add_argument("--steps-w4", type=int, default=400, help="QAT steps of qat_w4a8 (at most).")
    p.add_argument("--steps-tt", type=int, default=2000, help="QAT steps of qat_w4a8_tt (at most).")
    p.add_argument("--minutes-w8", type=float, default=3.0, help="QAT time budget of qat_w8a8.")
    p.add_argument("--minutes-w4", type=float, default=6.0, help="QAT time budget of qat_w4a8.")
    p.add_argument("--minutes-tt", type=float, default=16.0, help="QAT time budget of qat_w4a8_tt.")
    p.add_argument("--schedule-tt", default="two_stage", help="Distillation schedule of qat_w4a8_tt: matching "
                   "the embedding output and hidden states first (two_stage) recovers more than logits alone "
                   "(after the refit: 0.823 in 16 minutes against 0.808 for logits_kd in 20).")
    p.add_argument("--teacher-dir", default=None, help="A fine-tuned classifier directory to use instead of "
                   "get_teacher() (same task, splits and max length as the default teacher).")
    p.add_argument("--tt-rank", type=int, default=68, help="TT rank of the encoder linears (68: about 5x).")
    p.add_argument("--tt-refit-steps", type=int, default=200, help="Steps of the data-aware refit of the TT "
                   "layers (and the TT embedding, on the training text's tokens) before QAT; 0: TT-SVD start only.")
    p.add_argument("--tt-embedding-rank", type=int, default=64, help="TT rank of the word embedding.")
    args = p.parse_args()
    threads = min(args.threads, 2)
    torch.set_num_threads(threads)
    quick = args.quick
    if quick:
        args.steps_w8, args.steps_w4, args.steps_tt = 10, 10, 10
        args.minutes_w8, args.minutes_w4, args.minutes_tt = 1.0, 1.0, 1.0
    teacher = get_teacher() if args.teacher_dir is None else teacher_from_dir(args.teacher_dir)
    model = teacher.model.eval()
    test = teacher.encoded("test")
    if quick:
        test = test.select(range(min(128, len(test))))
    train = teacher.encoded("train")
    calib = list(train.select(range(min(256 if not quick else 64, len(train)))).batches(32))
    vocab = model.config.vocab_size
    inputs = {"b1": latency_inputs(1, vocab), "b32": latency_inputs(32, vocab, 1)}
    work = cache_root() / "bench_quant" / ("quick" if quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def log(row: dict[str, Any]) -> None:
        rows.append(row)
        print({k: row[k] for k in ("method", "test_accuracy", "size_bytes", "latency_ms_b1", "latency_ms_b32")},
              flush=True)

    dense_file = dense_file_of(teacher) / "model.safetensors"
    log({"method": "dense_fp32", "runtime": "pytorch", "test_accuracy": evaluate(model, test, teacher.label_names)
         .accuracy, "size_bytes": size_bytes(dense_file), **time_torch(model, inputs, quick)})

    onnx_path = export_onnx(model, work / "dense_fp32.onnx")
    session = ort_session(onnx_path, threads)
    log({"method": "dense_fp32_ort", "runtime": "onnxruntime", "test_accuracy": ort_accuracy(
        session, test, teacher.label_names), "size_bytes": size_bytes(onnx_path), **time_ort(session, inputs, quick)})

    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    torch.save(dynamic.state_dict(), work / "torch_dynamic_int8.pt")
    log({"method": "torch_dynamic_int8", "runtime": "pytorch", "test_accuracy": evaluate(
        dynamic, test, teacher.label_names).accuracy, "size_bytes": size_bytes(work / "torch_dynamic_int8.pt"),
        **time_torch(dynamic, inputs, quick)})
    del dynamic

    head = {"classifier": QuantPlan(8, 8)}  # the 384 x 2 head costs nothing at 8 bits
    log(qat_row("qat_w8a8", model, {**head, "Linear": QuantPlan(8, 8), "Embedding": QuantPlan(8, None)},
                teacher, test, calib, inputs, args.steps_w8, args.minutes_w8, 2e-5, work, threads, quick))
    log(qat_row("qat_w4a8", model, {**head, "Linear": QuantPlan(4, 8), "Embedding": QuantPlan(4, None)},
                teacher, test, calib, inputs, args.steps_w4, args.minutes_w4, 5e-5, work, threads, quick))

    plan = tt_plan(model, args.tt_rank, args.tt_embedding_rank)
    tt_model = apply_plan(model, plan)
    tt_model.fitformer_plans = [plan.to_dict()]
    refit = None
    if args.tt_refit_steps:
        t0 = time.perf_counter()
        report = refit_factorized(tt_model, model, calib, steps=args.tt_refit_steps,
                                  token_counts=train.token_counts(vocab))
        refit = {"steps": args.tt_refit_steps, "seconds": time.perf_counter() - t0,
                 "errors_before": report.before, "errors_after": report.after}
        print(f"{report.summary()} in {refit['seconds']:.0f} s", flush=True)
    # position and token-type tables at 8 bits: at 4 they double the PTQ error of the embedding output
    # (0.39 -> 0.53 relative) for 0.1 MB, a twentieth of the file
    row = qat_row("qat_w4a8_tt", tt_model, {**head, "TTLinear": QuantPlan(4, 8), "TTEmbedding": QuantPlan(4, 8),
                                             "Embedding": QuantPlan(8, None)},
                  teacher, test, calib, inputs, args.steps_tt, args.minutes_tt, 1e-4, work, threads, quick,
                  args.schedule_tt, key_extra=[args.tt_refit_steps, plan.to_dict()])
    row["tt"] = {"linear_rank": args.tt_rank, "embedding_rank": args.tt_embedding_rank,
                 "embedding_reconstruction_error": tt_model.bert.embeddings.word_embeddings.reconstruction_error,
                 "refit": refit}
    log(row)

    summary = summarize(rows)
    payload = {"rows": rows, "summary": summary, "threads": threads, "seq_len": SEQ,
               "dense_model": args.teacher_dir or "get_teacher()",
               "args": {k: v for k, v in vars(args).items()}}
    write_results("quant", payload, markdown(rows, summary, threads, args.teacher_dir), quick=quick)


def tt_plan(model: nn.Module, rank: int, embedding_rank: int) -> CompressionPlan:
    """TT-SVD of every encoder linear (the FLOP-cheapest 3-core tensorization at ``rank``, chosen once per
    shape) and of the word embedding."""
    shapes: dict[tuple[int, int], TTPlan] = {}
    layers: dict[str, list] = {}
    for name, linear in linear_layers(model, exclude=["classifier"]).items():
        key = (linear.in_features, linear.out_features)
        if key not in shapes:
            s = choose_tensorization(*key, rank, (3,), SEQ)
            shapes[key] = TTPlan(s.in_modes, s.out_modes, rank, None, 3)
        layers[name] = [shapes[key]]
    layers["bert.embeddings.word_embeddings"] = [TTEmbeddingPlan(max_rank=embedding_rank)]
    return CompressionPlan(layers=layers)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios and the issue's targets, computed from the measured rows."""
    by = {r["method"]: r for r in rows}
    dense = by["dense_fp32"]
    fp32_b32 = min(by["dense_fp32"]["latency_ms_b32"], by["dense_fp32_ort"]["latency_ms_b32"])
    for r in rows:
        r["accuracy_drop_points"] = 100 * (dense["test_accuracy"] - r["test_accuracy"])
        r["compression_x"] = dense["size_bytes"] / r["size_bytes"]
        r["speedup_b32_vs_fastest_fp32"] = fp32_b32 / r["latency_ms_b32"]
    w8, w4, tt = by["qat_w8a8"], by["qat_w4a8"], by["qat_w4a8_tt"]
    targets = {
        "qat_w8a8_drop_le_0.5": w8["accuracy_drop_points"] <= 0.5,
        "qat_w8a8_speedup_b32_ge_1.5": w8["speedup_b32_vs_fastest_fp32"] >= 1.5,
        "qat_w4a8_drop_le_1.5": w4["accuracy_drop_points"] <= 1.5,
        "qat_w4a8_smaller_ge_7x": w4["compression_x"] >= 7,
        "qat_w4a8_tt_smaller_ge_40x": tt["compression_x"] >= 40,
        "qat_w4a8_tt_drop_le_2.5": tt["accuracy_drop_points"] <= 2.5,
    }
    return {"fastest_fp32_latency_ms_b32": fp32_b32, "targets": targets}


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], threads: int, teacher_dir: str | None) -> str:
    table = markdown_table(
        [{**r, "size_mb": r["size_bytes"] / 1e6} for r in rows],
        ["method", "runtime", "test_accuracy", "accuracy_drop_points", "size_mb", "compression_x", "latency_ms_b1",
         "latency_ms_b32", "speedup_b32_vs_fastest_fp32"], floatfmt=".3f")
    formats = "; ".join(
        f"{r['method']}: " + ", ".join(f"{f} {v['latency_ms_b32']:.0f} ms" for f, v in r["onnx_formats"].items())
        for r in rows if "onnx_formats" in r)
    met = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in summary["targets"].items())
    dense = "the cached teacher" if teacher_dir is None else f"the classifier in `{teacher_dir}`"
    return f"""## Quantization (`benchmarks/bench_quant.py`)

MiniLM-L6 fine-tuned on rotten-tomatoes ({dense}),
test split; {threads} threads in PyTorch and onnxruntime; latency is
the trimmed mean of batch 1 and batch 32 at 128 tokens. `size_mb` is the file on disk (our rows: the packed
safetensors written by `fitformer.export.quantized.save_quantized`); our rows' accuracy and latency are of
the onnxruntime model. Accuracy drop is in points against `dense_fp32`; speed-up is against the faster fp32 row.

{table}

Batch-32 latency of the two ONNX forms (integer = QuantizeLinear + MatMulIntegerToFloat, qdq = Q/DQ around float
MatMul): {formats}.

Targets: {met}.
"""


if __name__ == "__main__":
    main()
