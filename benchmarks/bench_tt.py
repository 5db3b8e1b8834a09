"""TT-matrix layers against dense, one-call opt_einsum and tensorly-torch, side by side in one run.

For each layer size (BERT-base and MiniLM feed-forward shapes), token count, rank and tensorization
(``balanced``: the most even 3-way factorization; ``enumerated``: the 3-core shape with the fewest FLOPs at
that rank from :func:`fitformer.layers.enumerate_shapes`, of a shape and its mirror image the one whose plan
runs faster on the host, see :func:`fitformer.layers.choose_tensorization`), it times at inference
(``no_grad``):

- ``dense``: ``nn.Linear``;
- ``planned``: ``TTLinear`` with the contraction planner (plan made and cached before timing);
- ``naive_einsum``: one ``opt_einsum.contract`` call over input and cores, ``optimal`` path (path found
  before timing), with the reshape of its result to ``(tokens, out)`` that a layer has to return (opt_einsum
  often hands back a strided view, whose copy can cost more than the contraction);
- ``tltorch``: ``tltorch.FactorizedLinear`` with BlockTT at the same ranks, best of its ``factorized`` and
  ``reconstructed`` implementations.

``dense`` and ``planned`` are timed in 16 alternating rounds (so load from elsewhere lands on both), each
side running untimed for 30 ms before its timed calls in every round: right after a 30 ms dense GEMM a
2,048-token TT layer's calls run up to 1.9x slower for about ten calls, a wake that would charge the fast
side a larger share of its time than the slow one. ``naive_einsum`` and ``tltorch`` are timed in runs of
consecutive calls.

Writes ``benchmarks/results/tt.json`` (``tt.quick.json`` with ``--quick``).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import opt_einsum
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, parser, write_results  # noqa: E402
from fitformer.hardware.timing import measure, measure_interleaved  # noqa: E402
from fitformer.layers import Planner, TTLinear, balanced_modes, choose_tensorization, tt_flops  # noqa: E402
from fitformer.layers.planner import _einsum_equation, einsum_operands  # noqa: E402

LAYERS = [(384, 1536), (1536, 384), (768, 3072), (3072, 768)]
TOKENS = [128, 2048]
RANKS = [8, 16, 32, 64]
SETTLE_SECONDS = 0.03  # untimed calls per side and round before its timed ones (hardware.timing.settle)


def ms(fn, repeats: int = 7) -> float:
    return measure(fn, warmup=2, repeats=repeats, max_seconds=4.0).median_ms


def tltorch_ms(in_modes, out_modes, ranks, x) -> float:
    import tltorch

    best = float("inf")
    for impl in ("factorized", "reconstructed"):
        layer = tltorch.FactorizedLinear(in_modes, out_modes, factorization="blocktt", rank=list(ranks),
                                         implementation=impl).eval()
        with torch.no_grad():
            best = min(best, ms(lambda layer=layer: layer(x), repeats=5))
    return best


def bench_row(in_f: int, out_f: int, tokens: int, rank: int, kind: str, planner: Planner) -> dict:
    if kind == "balanced":
        in_modes, out_modes = balanced_modes(in_f, 3), balanced_modes(out_f, 3)
    else:
        shape = choose_tensorization(in_f, out_f, rank, num_cores=(3,), tokens=tokens, planner=planner)
        in_modes, out_modes = shape.in_modes, shape.out_modes
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f).eval()
    tt = TTLinear(in_f, out_f, in_modes, out_modes, rank, planner=planner).eval()
    x = torch.randn(tokens, in_f)
    eq = _einsum_equation(3)
    with torch.no_grad():
        t0 = time.perf_counter()
        exe = tt.plan(tokens)
        plan_ms = (time.perf_counter() - t0) * 1e3
        x_padded = torch.nn.functional.pad(x, (0, tt.spec.in_padded - in_f))
        operands = einsum_operands(x_padded, tt.spec, list(tt.cores))
        expr = opt_einsum.contract_expression(eq, *[o.shape for o in operands], optimize="optimal")
        naive = expr(*operands, backend="torch").reshape(tokens, -1)[:, :out_f] + tt.bias
        torch.testing.assert_close(naive, tt(x), rtol=1e-3, atol=1e-3)
        # 16 alternating rounds: a fallback row runs the same GEMM as dense, so its ratio is pure noise; each
        # side settles for SETTLE_SECONDS before its timed calls (a fast layer runs slower in a slow one's wake)
        dense_ms, planned_ms = measure_interleaved([lambda: dense(x), lambda: tt(x)], rounds=16,
                                                   settle_seconds=SETTLE_SECONDS)
        # the reshape to (tokens, out) is part of a layer: opt_einsum may return a strided view
        naive_ms = ms(lambda: expr(*operands, backend="torch").reshape(tokens, -1), repeats=5)
    return {
        "in": in_f, "out": out_f, "tokens": tokens, "rank": rank,
        "shape": f"{'x'.join(map(str, in_modes))}-{'x'.join(map(str, out_modes))}",
        "dense": dense_ms, "planned": planned_ms, "naive_einsum": naive_ms,
        "tltorch": tltorch_ms(in_modes, out_modes, tt.ranks, x),
        "params": sum(p.numel() for p in tt.parameters()), "flops": tt.flops(tokens),
        "chain_flops": min(tt_flops(in_modes, out_modes, tt.ranks, tokens, d) for d in ("rtl", "ltr")),
        "dense_flops": 2 * in_f * out_f * tokens,
        "plan": exe.describe(), "ranks": list(tt.ranks), "tensorization": kind, "plan_ms": plan_ms,
    }


def summarize(rows: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    slowdown = [r["planned"] / r["dense"] for r in rows]
    vs_tltorch = [r["tltorch"] / r["planned"] for r in rows]
    def half_ratio_share(flops_key: str) -> tuple[int, float | None]:
        """Rows whose FLOP ratio (dense over ``flops_key``) is at least 4, and the share of them whose measured
        speedup over dense reaches half that ratio."""
        factorizable = [r for r in rows if r["dense_flops"] / r[flops_key] >= 4]
        efficient = [r for r in factorizable if r["dense"] / r["planned"] >= 0.5 * r["dense_flops"] / r[flops_key]]
        return len(factorizable), (len(efficient) / len(factorizable) if factorizable else None)

    n_factorizable, share = half_ratio_share("flops")
    n_chain, share_chain = half_ratio_share("chain_flops")
    return {
        "rows": len(rows),
        "median_dense_ms": med("dense"), "median_planned_ms": med("planned"),
        "median_naive_einsum_ms": med("naive_einsum"), "median_tltorch_ms": med("tltorch"),
        "median_speedup_planned_vs_dense": statistics.median(r["dense"] / r["planned"] for r in rows),
        "median_speedup_planned_vs_naive_einsum": statistics.median(r["naive_einsum"] / r["planned"] for r in rows),
        "median_speedup_planned_vs_tltorch": statistics.median(vs_tltorch),
        "max_planned_over_dense": max(slowdown),
        "rows_factorized": sum(r["plan"] != "dense" for r in rows),
        "rows_flop_ratio_ge_4": n_factorizable,
        "share_reaching_half_flop_ratio": share,
        # the same against the FLOPs of the unfused chain (the TT's least arithmetic), whatever ran
        "rows_chain_flop_ratio_ge_4": n_chain,
        "share_reaching_half_chain_flop_ratio": share_chain,
        "targets": {
            "planned_never_above_1.10x_dense": max(slowdown) <= 1.10,
            "median_speedup_vs_tltorch_ge_1.5": statistics.median(vs_tltorch) >= 1.5,
            "half_flop_ratio_in_80pct_of_rows": share is not None and share >= 0.8,
        },
    }


def markdown(rows: list[dict], summary: dict) -> str:
    table = [{**r, "dense/planned": r["dense"] / r["planned"], "flop ratio": r["dense_flops"] / r["flops"],
              "chain": r["dense_flops"] / r["chain_flops"],
              "tltorch/planned": r["tltorch"] / r["planned"]} for r in rows]
    t = summary["targets"]
    return "\n".join([
        "## TT-matrix layers (`bench_tt.py`)", "",
        "Inference latency (ms, median) of one layer; `planned` is `TTLinear` with the contraction planner, "
        "`naive_einsum` one opt_einsum call (optimal path), `tltorch` tensorly-torch BlockTT (best of its two "
        "implementations). `flop ratio` is dense FLOPs over the FLOPs of the planned execution (`chain` over "
        "those of the unfused chain); `plan` is what "
        "the planner chose (`dense` = factorizing does not pay at this size, so the reconstructed weight runs "
        "as one GEMM). `dense` and `planned` are timed in 16 alternating rounds, each side running untimed "
        f"for {SETTLE_SECONDS * 1e3:.0f} ms before its timed calls (docs/tensorized.md).", "",
        markdown_table(table, ["in", "out", "tokens", "rank", "shape", "dense", "planned", "naive_einsum",
                               "tltorch", "plan", "flop ratio", "chain", "dense/planned", "tltorch/planned"], ".2f"),
        "",
        f"Reading: planned is at most {summary['max_planned_over_dense']:.3f}x the dense time (target 1.10x: "
        f"{'met' if t['planned_never_above_1.10x_dense'] else 'missed'}); median speedup over tensorly-torch "
        f"{summary['median_speedup_planned_vs_tltorch']:.2f}x (target 1.5x: "
        f"{'met' if t['median_speedup_vs_tltorch_ge_1.5'] else 'missed'}); of the "
        f"{summary['rows_flop_ratio_ge_4']} rows whose planned execution needs at least 4x fewer FLOPs than "
        f"dense, {summary['share_reaching_half_flop_ratio'] or 0:.0%} "
        f"turn at least half of that ratio into measured speedup (target 80%: "
        f"{'met' if t['half_flop_ratio_in_80pct_of_rows'] else 'missed'}); counted against the FLOPs of the "
        f"unfused chain instead (`chain_flops`, the TT's least arithmetic, whatever execution ran), "
        f"{summary['share_reaching_half_chain_flop_ratio'] or 0:.0%} of "
        f"{summary['rows_chain_flop_ratio_ge_4']} rows. Balanced tensorizations at high rank "
        "often need more FLOPs than the dense layer; the planner then runs the dense weight.",
    ])


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    layers, tokens, ranks = (LAYERS[::2], [128], [8, 32]) if args.quick else (LAYERS, TOKENS, RANKS)
    planner = Planner(measure=True)
    rows = []
    for in_f, out_f in layers:
        for t in tokens:
            for r in ranks:
                for kind in ("balanced", "enumerated"):
                    row = bench_row(in_f, out_f, t, r, kind, planner)
                    rows.append(row)
                    print(f"{in_f}x{out_f} T={t} r={r} {row['shape']:>22} {row['plan']:>22}  dense {row['dense']:8.2f}"
                          f"  planned {row['planned']:8.2f}  einsum {row['naive_einsum']:8.2f}  "
                          f"tltorch {row['tltorch']:8.2f}  flop ratio {row['dense_flops'] / row['flops']:.1f}",
                          flush=True)
    summary = summarize(rows)
    print(summary)
    write_results("tt", {"rows": rows, "summary": summary}, markdown(rows, summary), quick=args.quick)


if __name__ == "__main__":
    main()
