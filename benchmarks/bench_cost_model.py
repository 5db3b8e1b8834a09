"""How well do the cost models predict real host latency?

Samples BERT-style encoder configurations (layers, hidden, heads, FFN, and per group of linears — attention
or FFN — one of: dense fp32, dynamic int8, CSR-sparse, low-rank, TT with random ranks), builds each as a
real PyTorch model, measures it on this host at two input shapes, then:

1. calibrates the analytic model with ``fitformer calibrate``'s micro-benchmarks (no benchmark
   configuration is used for that) and scores it on the held-out configurations;
2. fits the learned predictor (residual correction of the analytic model; ridge vs. MLP by validation)
   on the training configurations and scores it on the same held-out ones.

Executable layers: dense and int8 (PyTorch dynamic quantization) are PyTorch's own kernels; sparse linears
run ``torch.sparse.mm`` on a CSR weight; low-rank and TT linears are the small reference modules below
(TT: left-to-right core contraction, the schedule of ``fitformer.hardware.ops.tt_linear_ops``).

Measured latency is the minimum over the timed repetitions: other processes only ever add time, so on a
shared machine the minimum is the least disturbed estimate (the median and trimmed mean are kept too).
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, markdown_table, parser, write_results  # noqa: E402
from fitformer.hardware.analytic import AnalyticModel  # noqa: E402
from fitformer.hardware.calibrate import calibrate_host, csr_weight, quantized_linear  # noqa: E402
from fitformer.hardware.ops import EncoderArch, LinearCompression, ops_from_config  # noqa: E402
from fitformer.hardware.predictor import fit_predictor, metrics  # noqa: E402
from fitformer.hardware.spec import load_catalog  # noqa: E402
from fitformer.hardware.timing import measure  # noqa: E402

SHAPES = ((1, 32), (4, 64))
ATTN = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
FFN = ("intermediate.dense", "output.dense")


# ------------------------------------------------------------------------------------ executable linears


class LowRankLinear(nn.Module):
    """x @ U @ V + b."""

    def __init__(self, fin: int, fout: int, rank: int):
        super().__init__()
        self.u = nn.Linear(fin, rank, bias=False)
        self.v = nn.Linear(rank, fout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.u(x))


class TTLinear(nn.Module):
    """TT-matrix linear; core i is stored as its GEMM operand, (m_i r_{i-1}) x (n_i r_i)."""

    def __init__(self, comp: LinearCompression):
        super().__init__()
        self.ins, self.outs = comp.tt_in_modes, comp.tt_out_modes
        self.ranks = (1, *comp.tt_ranks, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(m * self.ranks[i], n * self.ranks[i + 1]) / math.sqrt(m * self.ranks[i]))
            for i, (m, n) in enumerate(zip(self.ins, self.outs, strict=True)))
        self.bias = nn.Parameter(torch.zeros(math.prod(self.outs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], len(self.ins)
        t = math.prod(lead)
        # state axes: [T, n_<i, m_>i+1.., m_i, r_{i-1}] so that (m_i, r_{i-1}) is the trailing GEMM axis
        s = x.reshape(t, *self.ins).permute(0, *range(2, d + 1), 1).reshape(-1, self.ins[0])
        done: list[int] = []
        for i in range(d):
            y = s @ self.cores[i]
            if i == d - 1:
                return (y.reshape(t, -1) + self.bias).reshape(*lead, -1)
            rest, r = self.ins[i + 1:], self.ranks[i + 1]
            y = y.reshape(t, *done, *rest, self.outs[i], r)
            k = len(done)
            perm = [0, *range(1, 1 + k), 1 + k + len(rest), *range(2 + k, 1 + k + len(rest)), 1 + k,
                    2 + k + len(rest)]
            s = y.permute(*perm).reshape(-1, rest[0] * r)
            done.append(self.outs[i])
        raise AssertionError("unreachable")


class CSRLinear(nn.Module):
    """Unstructured-sparse linear: W (CSR) @ x^T."""

    def __init__(self, fin: int, fout: int, sparsity: float, seed: int):
        super().__init__()
        self.weight = csr_weight(fin, fout, sparsity, seed)
        self.bias = nn.Parameter(torch.zeros(fout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return (torch.sparse.mm(self.weight, flat.t()).t() + self.bias).reshape(*x.shape[:-1], -1)


def build_linear(comp: LinearCompression, fin: int, fout: int, seed: int) -> nn.Module:
    if comp.factor == "tt":
        return TTLinear(comp)
    if comp.factor == "lowrank":
        return LowRankLinear(fin, fout, comp.rank)
    if comp.sparsity > 0:
        return CSRLinear(fin, fout, comp.sparsity, seed)
    if comp.bits == 8:
        return quantized_linear(fin, fout)
    return nn.Linear(fin, fout)


# ------------------------------------------------------------------------------------ sampling


def modes(n: int, d: int) -> tuple[int, ...]:
    """A balanced factorisation of ``n`` into ``d`` factors >= 2 (largest first), or () if none."""
    best: tuple[int, ...] = ()

    def rec(rem: int, k: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if k == 1:
            if rem >= 2:
                cand = tuple(sorted((*acc, rem), reverse=True))
                if not best or max(cand) / min(cand) < max(best) / min(best):
                    best = cand
            return
        for f in range(2, rem + 1):
            if rem % f == 0:
                rec(rem // f, k - 1, (*acc, f))

    rec(n, d, ())
    return best


def sample_comp(rng: random.Random, fin: int, fout: int) -> LinearCompression:
    choice = rng.choice(["dense", "dense", "int8", "sparse", "lowrank", "tt"])
    if choice == "int8":
        return LinearCompression(bits=8)
    if choice == "sparse":
        return LinearCompression(sparsity=rng.choice([0.5, 0.7, 0.8, 0.9, 0.95]), sparse_format="unstructured")
    if choice == "lowrank":
        return LinearCompression(factor="lowrank", rank=rng.choice([r for r in (8, 16, 32, 64) if r < min(fin, fout)]))
    if choice == "tt":
        d = rng.choice([2, 3])
        ins, outs = modes(fin, d), modes(fout, d)
        if ins and outs:
            return LinearCompression(factor="tt", tt_in_modes=ins, tt_out_modes=outs,
                                     tt_ranks=tuple(rng.choice([2, 4, 8, 16]) for _ in range(d - 1)))
    return LinearCompression()


def sample_config(rng: random.Random) -> dict:
    hidden = rng.choice([64, 96, 128, 192, 256])
    heads = rng.choice([h for h in (2, 4, 8) if hidden % h == 0])
    ffn = hidden * rng.choice([1, 2, 3, 4])
    arch = EncoderArch(layers=rng.choice([1, 2, 3, 4]), hidden=hidden, heads=heads, ffn=ffn, vocab=1000)
    return {"arch": arch, "attn": sample_comp(rng, hidden, hidden), "ffn_in": sample_comp(rng, hidden, ffn),
            "ffn_out": sample_comp(rng, ffn, hidden)}


def compression_of(cfg: dict) -> dict[str, LinearCompression]:
    return {"*.attention.self.*": cfg["attn"], "*.attention.output.dense": cfg["attn"],
            "*.intermediate.dense": cfg["ffn_in"], "*.output.dense": cfg["ffn_out"]}


def build_model(cfg: dict, seed: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    a: EncoderArch = cfg["arch"]
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        intermediate_size=a.ffn, max_position_embeddings=max(s for _, s in SHAPES))).eval()
    for i, layer in enumerate(model.bert.encoder.layer):
        for suffix in ATTN:
            parent, _, child = suffix.rpartition(".")
            setattr(layer.get_submodule(parent), child, build_linear(cfg["attn"], a.hidden, a.hidden, seed + i))
        layer.intermediate.dense = build_linear(cfg["ffn_in"], a.hidden, a.ffn, seed + i)
        layer.output.dense = build_linear(cfg["ffn_out"], a.ffn, a.hidden, seed + i)
    return model.eval()


def describe(comp: LinearCompression) -> str:
    if comp.factor == "tt":
        return f"tt{list(comp.tt_ranks)}"
    if comp.factor == "lowrank":
        return f"lr{comp.rank}"
    if comp.sparsity:
        return f"sp{comp.sparsity}"
    return "int8" if comp.bits == 8 else "dense"


def time_model(model: nn.Module, batch: int, seq: int, quick: bool, clock: str) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))

    def run() -> object:
        with torch.inference_mode():
            return model(input_ids=ids)

    t = measure(run, warmup=2, repeats=5 if quick else 12, min_seconds=0.03 if quick else 0.15, max_seconds=2.0,
                clock=clock)
    return {"latency_s": t.min_ms / 1e3, "median_s": t.median_ms / 1e3, "mean_s": t.mean_ms / 1e3,
            "std_s": t.std_ms / 1e3, "repeats": t.repeats}


def layer_probes() -> list:
    """Calibration probes for the layer implementations: one tiny fixed encoder per kind of linear (these
    fixed architectures are not among the sampled configurations)."""
    kinds = {"int8": LinearCompression(bits=8), "sparse": LinearCompression(sparsity=0.8, sparse_format="unstructured"),
             "lowrank": LinearCompression(factor="lowrank", rank=16),
             "tt": LinearCompression(factor="tt", tt_in_modes=(8, 10), tt_out_modes=(8, 10), tt_ranks=(8,))}
    probes = []
    for i, (name, comp) in enumerate(kinds.items()):
        ffn = comp if comp.factor != "tt" else LinearCompression()
        cfg = {"arch": EncoderArch(layers=2, hidden=80, heads=4, ffn=160, vocab=1000), "attn": comp, "ffn_in": ffn,
               "ffn_out": ffn}
        model = build_model(cfg, seed=10_000 + i)
        for batch, seq in SHAPES:
            ids = torch.randint(0, 1000, (batch, seq))

            def run(model: nn.Module = model, ids: torch.Tensor = ids) -> object:
                with torch.inference_mode():
                    return model(input_ids=ids)

            ops = ops_from_config(cfg["arch"], compression_of(cfg), batch=batch, seq_len=seq)
            probes.append((f"bert {name} L2 H80 b{batch} s{seq}", ops, run, 3.0))
    return probes


# ------------------------------------------------------------------------------------ main


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    meas = np.array([r["measured_s"] for r in rows]) * 1e3
    for ax, key, title in ((axes[0], "analytic_s", "calibrated analytic"), (axes[1], "predictor_s", "predictor")):
        pred = np.array([r[key] for r in rows]) * 1e3
        for shape, marker in zip(SHAPES, "os", strict=True):
            sel = np.array([(r["batch"], r["seq_len"]) == shape for r in rows])
            ax.scatter(meas[sel], pred[sel], s=12, marker=marker, alpha=0.7, label=f"batch {shape[0]} x {shape[1]}")
        lo, hi = meas.min() * 0.8, meas.max() * 1.25
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ape = np.mean(np.abs(pred - meas) / meas)
        ax.set_title(f"{title}: MAPE {ape:.1%} (held out)")
        ax.set_xlabel("measured latency (ms)")
        ax.legend()
    axes[0].set_ylabel("predicted latency (ms)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=None, help="Configurations to sample (default 300, quick 24).")
    p.add_argument("--heldout", type=float, default=0.35, help="Fraction of configurations held out.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None, help="Measure every configuration this many times, at "
                   "different moments, and keep the fastest (default 2, quick 1).")
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="cpu: single-thread CPU time, not inflated by other processes (default); wall: latency.")
    args = p.parse_args()
    threads = 1 if args.clock == "cpu" else (args.threads or 2)
    torch.set_num_threads(threads)
    n_configs = args.configs or (24 if args.quick else 300)
    started = time.perf_counter()

    print("calibrating the analytic model on micro-benchmarks ...", flush=True)
    calibration = calibrate_host(threads, quick=args.quick, clock=args.clock, extra_probes=layer_probes())
    from fitformer.hardware.calibrate import load_calibration, save_calibration

    cal_path = save_calibration(calibration, RESULTS / ("cost_model_calibration" + (".quick" if args.quick else "")
                                                         + ".json"))
    analytic: AnalyticModel = load_calibration(cal_path)
    print(f"calibrated in {time.perf_counter() - started:.0f} s (probe MAPE {calibration['probe_mape']:.3f})",
          flush=True)

    rng = random.Random(args.seed)
    configs = [sample_config(rng) for _ in range(n_configs)]
    rounds = args.rounds or (1 if args.quick else 2)
    best: dict[tuple[int, int, int], dict] = {}
    for rnd in range(rounds):
        for ci, cfg in enumerate(configs):
            model = build_model(cfg, seed=args.seed + ci)
            for batch, seq in SHAPES:
                t = time_model(model, batch, seq, args.quick, args.clock)
                old = best.get((ci, batch, seq))
                if old is None or t["latency_s"] < old["latency_s"]:
                    best[(ci, batch, seq)] = {**t, "median_s": min(t["median_s"], old["median_s"]) if old else
                                              t["median_s"]}
            if ci % 50 == 0:
                print(f"round {rnd + 1}/{rounds} [{ci + 1}/{n_configs}] {time.perf_counter() - started:.0f} s",
                      flush=True)
    samples, rows = [], []
    for ci, cfg in enumerate(configs):
        comp = compression_of(cfg)
        for batch, seq in SHAPES:
            t = best[(ci, batch, seq)]
            ops = ops_from_config(cfg["arch"], comp, batch=batch, seq_len=seq)
            samples.append((ops, batch, seq))
            a = cfg["arch"]
            rows.append({"config": ci, "layers": a.layers, "hidden": a.hidden, "heads": a.heads, "ffn": a.ffn,
                         "attn": describe(cfg["attn"]), "ffn_in": describe(cfg["ffn_in"]),
                         "ffn_out": describe(cfg["ffn_out"]), "batch": batch, "seq_len": seq,
                         "measured_s": t["latency_s"], "median_s": t["median_s"], "std_s": t["std_s"],
                         "analytic_s": analytic.latency_s(ops)})

    order = list(range(n_configs))
    random.Random(args.seed + 1).shuffle(order)
    held = set(order[: max(1, int(round(n_configs * args.heldout)))])
    train_idx = [i for i, r in enumerate(rows) if r["config"] not in held]
    test_idx = [i for i, r in enumerate(rows) if r["config"] in held]
    predictor = fit_predictor([samples[i] for i in train_idx], [rows[i]["measured_s"] for i in train_idx], analytic,
                              seed=args.seed)
    pred = predictor.predict([samples[i] for i in test_idx])
    for i, v in zip(test_idx, pred, strict=True):
        rows[i]["predictor_s"] = float(v)
    predictor.save(RESULTS / ("cost_model_predictor" + (".quick" if args.quick else "") + ".safetensors"))
    test = [rows[i] for i in test_idx]
    measured = [r["measured_s"] for r in test]
    m_pred = metrics([r["predictor_s"] for r in test], measured)
    m_anal = metrics([r["analytic_s"] for r in test], measured)
    noise = float(np.median([r["median_s"] / r["measured_s"] - 1 for r in rows]))

    # Search throughput of the analytic model on the MiniLM-L6 architecture, and the catalog at a glance.
    minilm = EncoderArch(layers=6, hidden=384, heads=12, ffn=1536)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        analytic.estimate_ops(ops_from_config(minilm, {"*.intermediate.dense": configs[n % 10]["ffn_in"]}
                                              if configs[n % 10]["ffn_in"].factor != "tt" else None,
                                              batch=1, seq_len=128))
        n += 1
    throughput = n / (time.perf_counter() - t0)
    devices = []
    minilm_ops = ops_from_config(minilm, batch=1, seq_len=128)
    int8_ops = ops_from_config(minilm, {"*": LinearCompression(bits=8)}, batch=1, seq_len=128)
    for name, spec in {"host": analytic.spec, **load_catalog()}.items():
        model = analytic if name == "host" else AnalyticModel(spec)
        c, q = model.estimate_ops(minilm_ops), model.estimate_ops(int8_ops)
        devices.append({"device": name, "fp32_ms": c.latency_ms, "fp32_mj": c.energy_j * 1e3,
                        "int8_ms": q.latency_ms, "int8_mj": q.energy_j * 1e3, "int8_edp_uJs": q.edp * 1e6,
                        "fits_on_chip": q.weights_fit_on_chip, "int8_native": q.supported})

    summary = {
        "predictor_mape": m_pred["mape"], "predictor_kendall_tau": m_pred["kendall_tau"],
        "predictor_rmse_ms": m_pred["rmse_s"] * 1e3, "analytic_mape": m_anal["mape"],
        "analytic_kendall_tau": m_anal["kendall_tau"], "analytic_rmse_ms": m_anal["rmse_s"] * 1e3,
        "heldout_count": len(held), "heldout_samples": len(test), "configurations": n_configs,
        "samples": len(rows), "shapes": [list(s) for s in SHAPES], "predictor_kind": predictor.report["chosen"],
        "predictor_validation_mape": predictor.report["validation_mape"],
        "calibration_probe_mape": calibration["probe_mape"], "median_over_min_latency": noise,
        "analytic_candidates_per_s": throughput, "threads": threads, "clock": args.clock, "rounds": rounds,
        "targets": {"predictor_mape": 0.05, "predictor_kendall_tau": 0.9, "analytic_mape": 0.15},
        "seconds": time.perf_counter() - started,
    }
    summary["meets_targets"] = (summary["predictor_mape"] <= 0.05 and summary["predictor_kendall_tau"] >= 0.9
                                and summary["analytic_mape"] <= 0.15)
    stem = "cost_model.quick" if args.quick else "cost_model"
    plot(test, RESULTS / f"{stem}.png")
    by_kind = []
    for kind in ("dense", "int8", "sp", "lr", "tt"):
        sel = [r for r in test if kind in (r["attn"][:len(kind)], r["ffn_in"][:len(kind)], r["ffn_out"][:len(kind)])]
        if sel:
            measured_sel = [r["measured_s"] for r in sel]
            by_kind.append({"contains": kind, "samples": len(sel),
                            "analytic_mape": metrics([r["analytic_s"] for r in sel], measured_sel)["mape"],
                            "predictor_mape": metrics([r["predictor_s"] for r in sel], measured_sel)["mape"]})
    md = f"""## Cost models (`bench_cost_model.py`)

{n_configs} sampled BERT-style encoders (1-4 layers, hidden 64-256, FFN 1-4x, each group of linears dense,
dynamic int8, CSR-sparse, low-rank or TT) measured on the host with {threads} threads at batch x tokens
{SHAPES[0][0]}x{SHAPES[0][1]} and {SHAPES[1][0]}x{SHAPES[1][1]}; {len(held)} configurations ({len(test)} samples)
held out. The analytic model is calibrated on micro-benchmarks only; the predictor (residual correction of
it, {predictor.report['chosen']} chosen by validation) is fitted on the other configurations.

| model | held-out MAPE | Kendall tau | RMSE (ms) | target |
|---|---|---|---|---|
| calibrated analytic | {m_anal['mape']:.3f} | {m_anal['kendall_tau']:.3f} | {m_anal['rmse_s'] * 1e3:.3f} | \
MAPE <= 0.15 |
| learned predictor | {m_pred['mape']:.3f} | {m_pred['kendall_tau']:.3f} | {m_pred['rmse_s'] * 1e3:.3f} | \
MAPE <= 0.05, tau >= 0.9 |

![predicted vs measured](benchmarks/results/{stem}.png)

Held-out error by the kinds of linears a configuration contains:

{markdown_table(by_kind, ["contains", "samples", "analytic_mape", "predictor_mape"])}

Measured latency is the minimum over repetitions (the median was {noise:.1%} higher on the median sample: the
machine is shared). The analytic model scores {throughput:.0f} MiniLM-L6-sized candidates/s. MiniLM-L6
(batch 1 x 128 tokens) on the catalog, uncalibrated except the host:

{markdown_table(devices, ["device", "fp32_ms", "fp32_mj", "int8_ms", "int8_mj", "int8_edp_uJs", "fits_on_chip",
                          "int8_native"])}
"""
    write_results("cost_model", {"summary": summary, "devices": devices, "by_kind": by_kind, "samples": rows},
                  md, quick=args.quick)
    print({k: v for k, v in summary.items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
