"""Training-step time of quantization-aware students: the fused LSQ node against the op-by-op graph.

``fitformer.layers.quant.lsq_fake_quant`` is one autograd node; ``lsq_fake_quant_reference`` composes the same
arithmetic from a dozen elementwise ops. Each row times one forward + backward pass (logits and hidden states,
the distillation's work per step without the teacher) of a student built from the MiniLM teacher, with the two
implementations alternating step by step in one process, and reports the medians and their ratio:

- ``w4a8`` — every linear with 4-bit weights and 8-bit inputs, 4-bit word embedding;
- ``w4a8_tt`` — every encoder linear as a rank-32 TT-matrix and the word embedding as a rank-32 TT, 4-bit
  cores and 8-bit intermediates (the chain QAT-TT trains);
- ``tt_layer`` — one 4-bit 384x1536 rank-32 TT layer with 8-bit intermediates on 1,024 tokens (the case
  ``QuantPlan``'s docstring measures).

Batches are real training batches of the default task (32 reviews, padded to the longest).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_quant import tt_plan  # noqa: E402
from benchmarks.common import markdown_table, parser, write_results  # noqa: E402
from fitformer.compress import apply_plan  # noqa: E402
from fitformer.compress.quant import QuantPlan, calibrate, quantize  # noqa: E402
from fitformer.layers import quant as quant_module  # noqa: E402
from fitformer.layers.tt import TTLinear  # noqa: E402
from fitformer.train import get_teacher  # noqa: E402
from fitformer.train.distill import forward_outputs  # noqa: E402

IMPLEMENTATIONS = {"fused": quant_module.lsq_fake_quant, "reference": quant_module.lsq_fake_quant_reference}


def model_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        out = forward_outputs(model, batch, True, False)
        (out.logits.square().mean() + sum(h.square().mean() for h in out.hidden_states)).backward()
        model.zero_grad(set_to_none=True)
    return step


def time_pair(step: Callable[[], None], repeats: int) -> dict[str, float]:
    """Median milliseconds of ``step`` under each implementation, alternating so drift hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for i in range(repeats + 1):
        for name, fn in IMPLEMENTATIONS.items():
            quant_module.lsq_fake_quant = fn  # LSQQuantizer.forward looks it up at call time
            t0 = time.perf_counter()
            step()
            if i:  # the first round warms up both
                times[name].append((time.perf_counter() - t0) * 1e3)
    quant_module.lsq_fake_quant = IMPLEMENTATIONS["fused"]
    fused, reference = (statistics.median(times[n]) for n in ("fused", "reference"))
    return {"fused_ms": fused, "reference_ms": reference, "speedup": reference / fused}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10, help="Timed steps per implementation and row.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    teacher = get_teacher()
    model = teacher.model.eval()
    train = teacher.encoded("train")
    batch = next(iter(train.select(range(32)).batches(32)))
    calib = list(train.select(range(64)).batches(32))
    head = {"classifier": QuantPlan(8, 8)}
    students = {
        "w4a8": quantize(model, {**head, "Linear": QuantPlan(4, 8), "Embedding": QuantPlan(4, None)}),
        "w4a8_tt": quantize(apply_plan(model, tt_plan(model, 32, 32)),
                            {**head, "TTLinear": QuantPlan(4, 8), "TTEmbedding": QuantPlan(4, 8),
                             "Embedding": QuantPlan(8, None)}),
    }
    rows: list[dict[str, Any]] = []
    for name, student in students.items():
        calibrate(student, calib)
        rows.append({"row": name, "tokens": int(batch["attention_mask"].sum()), **time_pair(
            model_step(student.train(), batch), repeats)})
        print(rows[-1], flush=True)
    layer = quantize(nn.Sequential(TTLinear(384, 1536, (6, 8, 8), (8, 12, 16), 32)), QuantPlan(4, 8))
    x = torch.randn(1024, 384)  # its activation step sizes start from the first (warm-up) batch, as in LSQ

    def layer_step() -> None:
        layer(x).square().mean().backward()
        layer.zero_grad(set_to_none=True)

    rows.append({"row": "tt_layer", "tokens": 1024, **time_pair(layer_step, repeats)})
    print(rows[-1], flush=True)
    summary = {"median_speedup": statistics.median(r["speedup"] for r in rows)}
    reading = (f"The fused LSQ node makes a training step {rows[0]['speedup']:.2f}x faster for the 4-bit dense "
               f"student, {rows[1]['speedup']:.2f}x for the 4-bit TT student with 8-bit intermediates and "
               f"{rows[2]['speedup']:.2f}x for the single TT layer; the values and gradients are the same "
               "(`tests/test_quant.py::test_fused_fake_quant_matches_the_op_by_op_graph`).")
    md = "\n".join([
        "## Quantization-aware training step (`benchmarks/bench_qat_step.py`)", "",
        "One forward + backward pass (logits and hidden states) per row, the fused LSQ node "
        "(`lsq_fake_quant`) against the same arithmetic op by op (`lsq_fake_quant_reference`), alternating "
        f"in one process, median of {repeats} steps each, {args.threads} threads; real batches of 32 reviews.",
        "", markdown_table(rows, ["row", "tokens", "fused_ms", "reference_ms", "speedup"], ".2f"), "", reading])
    write_results("qat_step", {"rows": rows, "summary": summary, "repeats": repeats}, md, quick=args.quick)


if __name__ == "__main__":
    main()
