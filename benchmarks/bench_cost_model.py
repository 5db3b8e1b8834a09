"""How well do the cost models predict real host latency?

Samples BERT-style encoder configurations (layers, hidden, heads, FFN, and per group of linears — attention
or FFN — one of: dense fp32, dynamic int8, CSR-sparse, low-rank, TT with random ranks), builds each as a
real PyTorch model, measures it on this host at two input shapes, then:

1. calibrates the analytic model with ``fitformer calibrate``'s micro-benchmarks (no benchmark
   configuration is used for that), then refines its efficiency figures on the training configurations
   (``refine_calibration``), and scores both on the held-out configurations;
2. fits the learned predictor (residual correction of the refined analytic model; none, Huber ridge or an
   MLP ensemble by cross-validation) on the training configurations and scores it on the same held-out ones.

``--from-samples cost_model.json`` skips the measurement and refits from the samples an earlier run saved
(same held-out split), so fitting can be developed without timing anything.

Executable layers: dense and int8 (PyTorch dynamic quantization) are PyTorch's own kernels; sparse linears
run ``torch.sparse.mm`` on a CSR weight; low-rank and TT linears are the small reference modules below
(TT: left-to-right core contraction, the schedule of ``fitformer.hardware.ops.tt_linear_ops``).

Measured latency is the minimum over the timed repetitions and over ``--rounds`` passes (each over the
configurations in a new random order): other processes only ever add time, so on a shared machine the
minimum is the least disturbed estimate (the per-round figures are kept with every sample).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from fitformer.hardware.calibrate import (  # noqa: E402
    calibrate_host,
    csr_weight,
    load_calibration,
    quantized_linear,
    refine_calibration,
    save_calibration,
)
from fitformer.hardware.ops import EncoderArch, LinearCompression, ops_from_config, tt_runs_dense  # noqa: E402
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
    """TT-matrix linear; core i is stored as its GEMM operand, (m_i r_{i-1}) x (n_i r_i). Where the chain does
    more arithmetic than the dense GEMM it runs the dense weight, reconstructed once, as fitformer's planner
    does (``tt_runs_dense``)."""

    def __init__(self, comp: LinearCompression):
        super().__init__()
        self.ins, self.outs = comp.tt_in_modes, comp.tt_out_modes
        self.ranks = (1, *comp.tt_ranks, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(m * self.ranks[i], n * self.ranks[i + 1]) / math.sqrt(m * self.ranks[i]))
            for i, (m, n) in enumerate(zip(self.ins, self.outs, strict=True)))
        self.bias = nn.Parameter(torch.zeros(math.prod(self.outs)))
        self.weight = None
        if tt_runs_dense(comp):
            with torch.no_grad():
                self.weight = self.chain(torch.eye(math.prod(self.ins))).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return nn.functional.linear(x, self.weight, self.bias)
        return (self.chain(x) + self.bias).reshape(*x.shape[:-1], -1)

    def chain(self, x: torch.Tensor) -> torch.Tensor:
        """The cores contracted left to right with ``x``: ``(tokens, prod outs)``."""
        lead, d = x.shape[:-1], len(self.ins)
        t = math.prod(lead)
        # state axes: [T, n_<i, m_>i+1.., m_i, r_{i-1}] so that (m_i, r_{i-1}) is the trailing GEMM axis
        s = x.reshape(t, *self.ins).permute(0, *range(2, d + 1), 1).reshape(-1, self.ins[0])
        done: list[int] = []
        for i in range(d):
            y = s @ self.cores[i]
            if i == d - 1:
                return y.reshape(t, -1)
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

    t = measure(run, warmup=2, repeats=5 if quick else 8, min_seconds=0.03 if quick else 0.08, max_seconds=2.0,
                clock=clock)
    return {"latency_s": t.min_ms / 1e3, "median_s": t.median_ms / 1e3, "std_s": t.std_ms / 1e3}


def measure_configs(configs: list[dict], rounds: int, quick: bool, clock: str, seed: int,
                    started: float) -> dict[tuple[int, int, int], dict]:
    """Every configuration at every shape in ``rounds`` rounds, each in a fresh random order (so a slow
    spell of the machine hits different configurations each round); the fastest round is kept."""
    out: dict[tuple[int, int, int], dict] = {}
    for rnd in range(rounds):
        order = list(range(len(configs)))
        random.Random(seed + 100 + rnd).shuffle(order)
        for done, ci in enumerate(order):
            model = build_model(configs[ci], seed=seed + ci)
            for batch, seq in SHAPES:
                t = time_model(model, batch, seq, quick, clock)
                old = out.setdefault((ci, batch, seq), {"rounds_s": [], "median_s": math.inf})
                old["rounds_s"].append(t["latency_s"])
                if t["latency_s"] <= min(old["rounds_s"]):
                    old["std_s"] = t["std_s"]
                old["median_s"] = min(old["median_s"], t["median_s"])
                old["latency_s"] = min(old["rounds_s"])
            if done % 50 == 0:
                print(f"round {rnd + 1}/{rounds} [{done + 1}/{len(configs)}] {time.perf_counter() - started:.0f} s",
                      flush=True)
    return out


def comp_to_dict(comp: LinearCompression) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(comp).items()}


def comp_from_row(row: dict, key: str, fin: int, fout: int) -> LinearCompression:
    """The compression of one group of linears of a saved sample (full record, or its short description)."""
    full = row.get(f"{key}_comp")
    if full is not None:
        return LinearCompression(**{k: tuple(v) if isinstance(v, list) else v for k, v in full.items()})
    desc = row[key]
    if desc.startswith("tt"):
        ranks = tuple(json.loads(desc[2:]))
        d = len(ranks) + 1
        return LinearCompression(factor="tt", tt_in_modes=modes(fin, d), tt_out_modes=modes(fout, d), tt_ranks=ranks)
    if desc.startswith("lr"):
        return LinearCompression(factor="lowrank", rank=int(desc[2:]))
    if desc.startswith("sp"):
        return LinearCompression(sparsity=float(desc[2:]), sparse_format="unstructured")
    return LinearCompression(bits=8) if desc == "int8" else LinearCompression()


def config_of_row(row: dict) -> dict:
    arch = EncoderArch(layers=row["layers"], hidden=row["hidden"], heads=row["heads"], ffn=row["ffn"], vocab=1000)
    return {"arch": arch, "attn": comp_from_row(row, "attn", arch.hidden, arch.hidden),
            "ffn_in": comp_from_row(row, "ffn_in", arch.hidden, arch.ffn),
            "ffn_out": comp_from_row(row, "ffn_out", arch.ffn, arch.hidden)}


def sample_of_row(row: dict) -> tuple[list, int, int]:
    cfg = config_of_row(row)
    return ops_from_config(cfg["arch"], compression_of(cfg), batch=row["batch"], seq_len=row["seq_len"]), \
        row["batch"], row["seq_len"]


def heldout_configs(n_configs: int, fraction: float, seed: int) -> set[int]:
    """The held-out configurations: a seeded shuffle, the first ``fraction`` of them."""
    order = list(range(n_configs))
    random.Random(seed + 1).shuffle(order)
    return set(order[: max(1, int(round(n_configs * fraction)))])


def repeatability(rows: list[dict]) -> float:
    """How far apart two independent measurements of the same sample are: the best of the odd rounds against
    the best of the even rounds (mean relative gap). A floor under any model's error against these data."""
    gaps = [abs(min(r["rounds_s"][0::2]) - min(r["rounds_s"][1::2])) / min(r["rounds_s"])
            for r in rows if len(r.get("rounds_s", [])) >= 2]
    return float(np.mean(gaps)) if gaps else float("nan")


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


def measure_rows(args: argparse.Namespace, threads: int, started: float) -> tuple[list[dict], dict, dict]:
    """Calibrate on micro-benchmarks, then measure the sampled configurations: (rows, calibration, settings)."""
    print("calibrating the analytic model on micro-benchmarks ...", flush=True)
    calibration = calibrate_host(threads, quick=args.quick, clock=args.clock, extra_probes=layer_probes())
    save_calibration(calibration, RESULTS / ("cost_model_calibration" + (".quick" if args.quick else "") + ".json"))
    print(f"calibrated in {time.perf_counter() - started:.0f} s (probe MAPE {calibration['probe_mape']:.3f})",
          flush=True)
    n_configs = args.configs or (24 if args.quick else 300)
    rng = random.Random(args.seed)
    configs = [sample_config(rng) for _ in range(n_configs)]
    rounds = args.rounds or (1 if args.quick else 8)
    measured = measure_configs(configs, rounds, args.quick, args.clock, args.seed, started)
    rows = []
    for ci, cfg in enumerate(configs):
        a = cfg["arch"]
        for batch, seq in SHAPES:
            t = measured[(ci, batch, seq)]
            rows.append({"config": ci, "layers": a.layers, "hidden": a.hidden, "heads": a.heads, "ffn": a.ffn,
                         "attn": describe(cfg["attn"]), "ffn_in": describe(cfg["ffn_in"]),
                         "ffn_out": describe(cfg["ffn_out"]),
                         **{f"{k}_comp": comp_to_dict(cfg[k]) for k in ("attn", "ffn_in", "ffn_out")},
                         "batch": batch, "seq_len": seq, "measured_s": t["latency_s"], "median_s": t["median_s"],
                         "std_s": t["std_s"], "rounds_s": t["rounds_s"]})
    settings = {"configurations": n_configs, "threads": threads, "clock": args.clock, "rounds": rounds,
                "seed": args.seed, "heldout_fraction": args.heldout,
                "calibration_probe_mape": calibration["probe_mape"],
                "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "measure_seconds": time.perf_counter() - started}
    return rows, calibration, settings


def load_rows(path: Path) -> tuple[list[dict], dict]:
    """Saved samples and the measurement settings of an earlier run (older files lack some settings)."""
    data = json.loads(path.read_text())
    rows, old = data["samples"], data.get("summary", {})
    settings = {"configurations": old.get("configurations", max(r["config"] for r in rows) + 1),
                "threads": old.get("threads", 1), "clock": old.get("clock", "cpu"),
                "rounds": old.get("rounds", 1 if data.get("quick") else 2),
                "seed": old.get("seed", 0), "heldout_fraction": old.get("heldout_fraction", 0.35),
                "calibration_probe_mape": old.get("calibration_probe_mape", float("nan")),
                "measured_at": old.get("measured_at", time.strftime("%Y-%m-%d %H:%M UTC",
                                                                    time.gmtime(path.stat().st_mtime))),
                "measure_seconds": old.get("measure_seconds", old.get("seconds", float("nan")))}
    keep = ("config", "layers", "hidden", "heads", "ffn", "attn", "ffn_in", "ffn_out", "attn_comp", "ffn_in_comp",
            "ffn_out_comp", "batch", "seq_len", "measured_s", "median_s", "std_s", "rounds_s")
    return [{k: r[k] for k in keep if k in r} for r in rows], settings


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=None, help="Configurations to sample (default 300, quick 24).")
    p.add_argument("--heldout", type=float, default=0.35, help="Fraction of configurations held out.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None, help="Measure every configuration this many times, at "
                   "different moments, and keep the fastest (default 8, quick 1).")
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="cpu: single-thread CPU time, not inflated by other processes (default); wall: latency.")
    p.add_argument("--from-samples", type=Path, default=None, metavar="JSON",
                   help="Refit and rescore from the samples saved by an earlier run (no measurement); the "
                        "micro-benchmark calibration is read from --calibration.")
    p.add_argument("--calibration", type=Path, default=None,
                   help="Calibration file for --from-samples (default: cost_model_calibration.json beside it).")
    args = p.parse_args()
    started = time.perf_counter()
    if args.from_samples:
        rows, settings = load_rows(args.from_samples)
        cal_path = args.calibration or args.from_samples.with_name(
            "cost_model_calibration" + (".quick" if args.quick else "") + ".json")
        settings["source"] = f"refit from saved samples ({args.from_samples.name}, measured {settings['measured_at']})"
    else:
        threads = 1 if args.clock == "cpu" else (args.threads or 2)
        torch.set_num_threads(threads)
        rows, _calibration, settings = measure_rows(args, threads, started)
        cal_path = RESULTS / ("cost_model_calibration" + (".quick" if args.quick else "") + ".json")
        settings["source"] = f"measured in this run ({settings['measured_at']})"
    torch.set_num_threads(settings["threads"])
    evaluate(rows, settings, load_calibration(cal_path), args.quick, started)


def evaluate(rows: list[dict], settings: dict, micro: AnalyticModel, quick: bool, started: float) -> None:
    """Refine the calibration and fit the predictor on the training configurations; score both on the
    held-out ones; write the results, the plot and the predictor."""
    samples = [sample_of_row(r) for r in rows]
    n_configs = settings["configurations"]
    held = heldout_configs(n_configs, settings["heldout_fraction"], settings["seed"])
    train_idx = [i for i, r in enumerate(rows) if r["config"] not in held]
    test_idx = [i for i, r in enumerate(rows) if r["config"] in held]
    train_lat = [rows[i]["measured_s"] for i in train_idx]
    analytic = refine_calibration(micro, [samples[i][0] for i in train_idx], train_lat,
                                  log=lambda m: print(m, flush=True))
    refined_path = RESULTS / ("cost_model_calibration_refined" + (".quick" if quick else "") + ".json")
    save_calibration({"key": {"source": settings["source"]}, "spec": analytic.spec.model_dump(),
                      "efficiency": analytic.eff.to_dict()}, refined_path)
    predictor = fit_predictor([samples[i] for i in train_idx], train_lat, analytic, seed=settings["seed"],
                              groups=[rows[i]["config"] for i in train_idx])
    pred = predictor.predict([samples[i] for i in test_idx])
    for i, v in zip(test_idx, pred, strict=True):
        rows[i]["predictor_s"] = float(v)
    for i, (ops, _b, _s) in enumerate(samples):
        rows[i]["analytic_s"] = analytic.latency_s(ops)
        rows[i]["analytic_micro_s"] = micro.latency_s(ops)
    predictor.save(RESULTS / ("cost_model_predictor" + (".quick" if quick else "") + ".safetensors"))
    test = [rows[i] for i in test_idx]
    measured = [r["measured_s"] for r in test]
    m_pred = metrics([r["predictor_s"] for r in test], measured)
    m_anal = metrics([r["analytic_s"] for r in test], measured)
    m_micro = metrics([r["analytic_micro_s"] for r in test], measured)
    noise = float(np.median([r["median_s"] / r["measured_s"] - 1 for r in rows]))
    repeat = repeatability(rows)

    # Search throughput of the analytic model on the MiniLM-L6 architecture, and the catalog at a glance.
    minilm = EncoderArch(layers=6, hidden=384, heads=12, ffn=1536)
    comps = [c for c in (comp_from_row(r, "ffn_in", r["hidden"], r["ffn"]) for r in rows[:40:2]) if c.factor != "tt"]
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        analytic.estimate_ops(ops_from_config(minilm, {"*.intermediate.dense": comps[n % len(comps)]}, batch=1,
                                              seq_len=128))
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
        "analytic_micro_only_mape": m_micro["mape"], "analytic_micro_only_kendall_tau": m_micro["kendall_tau"],
        "measurement_repeatability": repeat, "heldout_count": len(held), "heldout_samples": len(test),
        "samples": len(rows), "shapes": [list(s) for s in SHAPES], "predictor_kind": predictor.report["chosen"],
        "predictor_validation_mape": predictor.report["validation_mape"], "median_over_min_latency": noise,
        "analytic_candidates_per_s": throughput, **settings,
        "targets": {"predictor_mape": 0.05, "predictor_kendall_tau": 0.9, "analytic_mape": 0.15},
        "seconds": time.perf_counter() - started,
    }
    summary["meets_targets"] = (summary["predictor_mape"] <= 0.05 and summary["predictor_kendall_tau"] >= 0.9
                                and summary["analytic_mape"] <= 0.15)
    stem = "cost_model.quick" if quick else "cost_model"
    plot(test, RESULTS / f"{stem}.png")
    by_kind = []
    for kind in ("dense", "int8", "sp", "lr", "tt"):
        sel = [r for r in test if kind in (r["attn"][:len(kind)], r["ffn_in"][:len(kind)], r["ffn_out"][:len(kind)])]
        if sel:
            measured_sel = [r["measured_s"] for r in sel]
            by_kind.append({"contains": kind, "samples": len(sel),
                            "analytic_mape": metrics([r["analytic_s"] for r in sel], measured_sel)["mape"],
                            "predictor_mape": metrics([r["predictor_s"] for r in sel], measured_sel)["mape"]})
    for shape in SHAPES:
        sel = [r for r in test if (r["batch"], r["seq_len"]) == shape]
        measured_sel = [r["measured_s"] for r in sel]
        by_kind.append({"contains": f"shape {shape[0]}x{shape[1]}", "samples": len(sel),
                        "analytic_mape": metrics([r["analytic_s"] for r in sel], measured_sel)["mape"],
                        "predictor_mape": metrics([r["predictor_s"] for r in sel], measured_sel)["mape"]})
    threads = settings["threads"]
    md = f"""## Cost models (`bench_cost_model.py`)

{n_configs} sampled BERT-style encoders (1-4 layers, hidden 64-256, FFN 1-4x, each group of linears dense,
dynamic int8, CSR-sparse, low-rank or TT) measured on the host ({threads} thread, {settings['clock']} clock,
best of {settings['rounds']} rounds) at batch x tokens {SHAPES[0][0]}x{SHAPES[0][1]} and
{SHAPES[1][0]}x{SHAPES[1][1]}; {len(held)} configurations ({len(test)} samples) held out. Figures:
{settings['source']}. The analytic model is calibrated on micro-benchmarks, then its efficiency figures are
refined on the training configurations; the predictor (residual correction of it,
{predictor.report['chosen']} chosen by validation) is fitted on the same training configurations.

| model | held-out MAPE | Kendall tau | RMSE (ms) | target |
|---|---|---|---|---|
| analytic, micro-benchmarks only | {m_micro['mape']:.3f} | {m_micro['kendall_tau']:.3f} | \
{m_micro['rmse_s'] * 1e3:.3f} | |
| calibrated analytic (refined) | {m_anal['mape']:.3f} | {m_anal['kendall_tau']:.3f} | \
{m_anal['rmse_s'] * 1e3:.3f} | MAPE <= 0.15 |
| learned predictor | {m_pred['mape']:.3f} | {m_pred['kendall_tau']:.3f} | {m_pred['rmse_s'] * 1e3:.3f} | \
MAPE <= 0.05, tau >= 0.9 |

![predicted vs measured](benchmarks/results/{stem}.png)

Held-out error by the kinds of linears a configuration contains, and by input shape:

{markdown_table(by_kind, ["contains", "samples", "analytic_mape", "predictor_mape"])}

How to read it: measured latency is the fastest of the rounds (the median repetition was {noise:.1%} above
the fastest on the median sample). Two independent measurements of the same sample (best of the odd against
best of the even rounds) differ by {repeat:.1%} on average: no model can score much below that against
these measurements. The analytic model scores {throughput:.0f} MiniLM-L6-sized candidates/s. MiniLM-L6
(batch 1 x 128 tokens) on the catalog, uncalibrated except the host:

{markdown_table(devices, ["device", "fp32_ms", "fp32_mj", "int8_ms", "int8_mj", "int8_edp_uJs", "fits_on_chip",
                          "int8_native"])}
"""
    write_results("cost_model", {"summary": summary, "devices": devices, "by_kind": by_kind, "samples": rows},
                  md, quick=quick)
    print({k: v for k, v in summary.items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
