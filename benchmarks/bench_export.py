"""ONNX export of a quantized candidate: its TT layers on integer kernels, against the exports before.

A searched size plan factorises most linears as the 2-core low rank ``(in, 1) x (1, out)`` and a few as lopsided
TT shapes such as ``384x2x2-2x2x96``, with 8-bit inputs, 4- or 8-bit cores and float intermediates. Exported
through its own forward, such a layer runs its whole chain in float on the dequantized cores, behind a
quantize-dequantize of its input written as float arithmetic (Div, Round, Clip, Sub, Mul over every activation).
The exporter now runs the low rank's first GEMM on the first core's integer codes (``MatMulIntegerToFloat``) and
its second in float, and every other quantized TT layer as one integer GEMM on its rebuilt weight, re-quantized
to 8 bits. This benchmark exports one saved candidate three ways (the earlier ones by switching those rewrites
off), tests each on the run's test split and times them side by side at batch 1 and 32, 128 tokens, in one
interleaved loop.
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
from fitformer.layers.tensorize import runs_rebuilt  # noqa: E402
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
    rebuilt = sum(onnx_quant._rebuilt_on_integers(m) for m in model.modules())

    def earlier_rebuilt(m: torch.nn.Module) -> bool:  # the export before: only chains costlier than dense
        return onnx_quant._integer_input_tt(m) and runs_rebuilt(m.in_modes, m.out_modes, m.ranks, quantized=False)

    exports = {  # name -> (low rank's first GEMM on integers, which other TT layers run as rebuilt integer GEMMs)
        "all in float": (lambda m: False, lambda m: False),
        "low rank on integers": (onnx_quant._first_core_on_integers, earlier_rebuilt),
        "all on integers": (onnx_quant._first_core_on_integers, onnx_quant._rebuilt_on_integers),
    }
    sessions: dict[str, Any] = {}
    onnx_bytes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (first, rebuilt_rule)) in enumerate(exports.items()):
            path = Path(tmp) / f"export{i}.onnx"
            with mock.patch.object(onnx_quant, "_first_core_on_integers", first), \
                    mock.patch.object(onnx_quant, "_rebuilt_on_integers", rebuilt_rule):
                onnx_quant.export_quantized_onnx(model, path)
            sessions[name] = onnx_quant.ort_session(path, args.threads)
            onnx_bytes[name] = path.stat().st_size
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
    rows = [{"TT layers": name, "test_accuracy": float((predictions[name] == test.labels).float().mean()),
             "latency_ms_b1": statistics.median(times[(name, 1)]),
             "latency_ms_b32": statistics.median(times[(name, 32)]), "onnx_mb": onnx_bytes[name] / 1e6}
            for name in sessions]
    current = predictions["all on integers"]
    agree = {name: float((p == current).float().mean()) for name, p in predictions.items()}
    speedup = {name: {f"b{b}": row[f"latency_ms_b{b}"] / rows[-1][f"latency_ms_b{b}"] for b in feeds}
               for name, row in zip(sessions, rows, strict=True)}
    payload = {"candidate": str(cand), "low_rank_layers": chains, "rebuilt_layers": rebuilt, "rows": rows,
               "prediction_agreement_with_current": agree, "speedup_of_current": speedup, "repeats": repeats}
    earlier = speedup["low rank on integers"]
    md = f"""## ONNX export of TT layers (`benchmarks/bench_export.py`)

The candidate `{cand}` frozen and exported to ONNX three ways. **All in float**: its {chains} low-rank TT
layers `(in, 1) x (1, out)` and its {rebuilt} other TT layers run through their own forward (quantize-dequantize
of the input as float arithmetic, float GEMMs on the dequantized cores). **Low rank on integers** (the export
before this one): the low rank's first GEMM on the first core's integer codes (`MatMulIntegerToFloat`), its
second in float; the other TT layers as before. **All on integers** (the current export): as well, every other
TT layer as one integer GEMM on its rebuilt weight re-quantized to 8 bits. Test accuracy is on the run's test
split. Latencies are medians of {repeats - 2} timed runs at 128 tokens, the three models in one interleaved loop
on onnxruntime with {args.threads} threads.

{markdown_table(rows, ["TT layers", "test_accuracy", "latency_ms_b1", "latency_ms_b32", "onnx_mb"])}

The current export against the one before: **{earlier['b1']:.2f}x faster at batch 1, {earlier['b32']:.2f}x at
batch 32**, agreeing on {agree['low rank on integers']:.2%} of the test predictions; against all in float
{speedup['all in float']['b1']:.2f}x and {speedup['all in float']['b32']:.2f}x.
"""
    write_results("export", payload, md, quick=args.quick)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
