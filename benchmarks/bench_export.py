"""ONNX export of a quantized candidate: low-rank layers with their first GEMM on integer codes, against float.

A searched size plan factorises most linears as the 2-core low rank ``(in, 1) x (1, out)`` with 8-bit inputs,
4- or 8-bit cores and float intermediates. Exported through the layer's own forward, such a layer runs both
GEMMs in float on the dequantized cores, behind a quantize-dequantize of its input written as float arithmetic
(Div, Round, Clip, Sub, Mul over every activation). The exporter now runs its first GEMM on the first core's
integer codes (``MatMulIntegerToFloat``) and its second in float. This benchmark exports one saved candidate
both ways (the float way by switching that rewrite off), tests both on the run's test split and times them
side by side at batch 1 and 32, 128 tokens, in one interleaved loop.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, parser, write_results  # noqa: E402
from fitformer.compress.quant import freeze  # noqa: E402
from fitformer.config import RunConfig  # noqa: E402
from fitformer.errors import UserError  # noqa: E402
from fitformer.export import load, onnx_quant  # noqa: E402
from fitformer.io import read_json  # noqa: E402
from fitformer.pipeline import Pipeline  # noqa: E402

DEFAULT_RUN = Path("runs/bench-compress-thorough/size")


def candidate_dir(run: Path) -> Path:
    """The first saved candidate of a finished ``fitformer compress`` run."""
    found = sorted(p for p in (run / "candidates").glob("*") if p.is_dir()) if (run / "candidates").is_dir() else []
    if not found:
        raise UserError(f"no saved candidate under {run}/candidates; run `python benchmarks/bench_compress.py "
                        "--runs size` first, or pass --run")
    return found[0]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=DEFAULT_RUN, help="A finished compress run with a quantized "
                   "candidate (default: the thorough size run of bench_compress.py).")
    p.add_argument("--repeats", type=int, default=12, help="Timed runs per model and batch size (first 2 warm-up).")
    args = p.parse_args()
    repeats = 4 if args.quick else args.repeats
    cand = candidate_dir(args.run)
    config = RunConfig(**read_json(args.run / "manifest.json")["config"])
    test = Pipeline(config).teacher.encoded("test")
    model = freeze(load(cand).model).eval()
    chains = sum(onnx_quant._first_core_on_integers(m) for m in model.modules())
    sessions: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with mock.patch.object(onnx_quant, "_first_core_on_integers", lambda m: False):
            onnx_quant.export_quantized_onnx(model, Path(tmp) / "float.onnx")
        onnx_quant.export_quantized_onnx(model, Path(tmp) / "integer.onnx")
        for name in ("float", "integer"):
            sessions[name] = onnx_quant.ort_session(Path(tmp) / f"{name}.onnx", args.threads)
        onnx_bytes = {name: (Path(tmp) / f"{name}.onnx").stat().st_size for name in sessions}
    predictions = {name: onnx_quant.ort_predict(s, test).argmax(-1) for name, s in sessions.items()}
    ids = torch.randint(1000, 20000, (32, 128), generator=torch.Generator().manual_seed(0))
    feeds = {b: {"input_ids": ids[:b], "attention_mask": torch.ones(b, 128, dtype=torch.long),
                 "token_type_ids": torch.zeros(b, 128, dtype=torch.long)} for b in (1, 32)}
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in sessions for b in feeds}
    for rep in range(repeats):
        for b, feed in feeds.items():
            for name, s in sessions.items():
                start = time.perf_counter()
                onnx_quant.ort_logits(s, feed)
                if rep >= 2:
                    times[(name, b)].append((time.perf_counter() - start) * 1000)
    rows = [{"low-rank layers": name, "test_accuracy": float((predictions[name] == test.labels).float().mean()),
             "latency_ms_b1": statistics.median(times[(name, 1)]),
             "latency_ms_b32": statistics.median(times[(name, 32)]), "onnx_mb": onnx_bytes[name] / 1e6}
            for name in sessions]
    agree = float((predictions["float"] == predictions["integer"]).float().mean())
    speedup = {f"b{b}": rows[0][f"latency_ms_b{b}"] / rows[1][f"latency_ms_b{b}"] for b in feeds}
    payload = {"candidate": str(cand), "low_rank_layers": chains, "rows": rows, "prediction_agreement": agree,
               "speedup": speedup, "repeats": repeats}
    md = f"""## ONNX export of low-rank layers (`benchmarks/bench_export.py`)

The candidate `{cand}` frozen and exported to ONNX twice. In one, its {chains} low-rank TT layers
`(in, 1) x (1, out)` run in float (quantize-dequantize of the input as float arithmetic, two float GEMMs on
the dequantized cores). In the other, the first GEMM runs on the first core's integer codes
(`MatMulIntegerToFloat`) and the second in float. Test accuracy is on the run's test split. Latencies are
medians of {repeats - 2} timed runs at 128 tokens, both models in one interleaved loop on onnxruntime with
{args.threads} threads.

{markdown_table(rows, ["low-rank layers", "test_accuracy", "latency_ms_b1", "latency_ms_b32", "onnx_mb"])}

First GEMM on integers: **{speedup['b1']:.2f}x faster at batch 1, {speedup['b32']:.2f}x at batch 32**; the two
exports agree on {agree:.2%} of the test predictions.
"""
    write_results("export", payload, md, quick=args.quick)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
