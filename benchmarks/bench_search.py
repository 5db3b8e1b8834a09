"""Joint search benchmark: hypervolume of the (proxy loss, latency) front found by NSGA-II, HAT-style
constrained evolution, random search and Optuna's NSGA-II at equal budgets; candidates per second with the
analytic cost model; and the agreement (Kendall tau) of the accuracy proxies with accuracy after a short
distillation.

Hypervolume part: MiniLM-L6's real weights, the deterministic weight-error proxy
(:class:`fitformer.search.proxy.WeightErrorProxy`) and the analytic model of the laptop CPU in the catalog;
objectives are normalised by the dense model (latency / dense latency, proxy loss in [0, 1]) and the
reference point is (1.0, 1.0).

Proxy part: candidates of the pipeline's design space (the one ``fitformer compress`` searches: depth
from half to all layers, half or all heads, a quarter, half or all of the FFN, per-layer dense / low-rank /
TT and the device's bit widths), taken from an NSGA-II run and from mutants of the dense model so that they
span the proxy's range, are each built from the cached fine-tuned teacher, distilled briefly with the
pipeline's schedule and scored on the validation split. ``proxy_kendall_tau`` is the Kendall tau between
accuracy and minus the proxy loss of the weight-error proxy (the one the search uses); the KD proxy's tau
is reported beside it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, markdown_table, parser, write_results  # noqa: E402
from fitformer.compress import apply_plan  # noqa: E402
from fitformer.hardware import get_device  # noqa: E402
from fitformer.models import load_classifier  # noqa: E402
from fitformer.search import (  # noqa: E402
    DesignSpace,
    EncoderShape,
    EvolutionConfig,
    NSGA2Config,
    Problem,
    SearchResult,
    Session,
    SpaceConfig,
    evolution_front,
    hypervolume,
    nsga2,
    optuna_nsga2,
    random_search,
)
from fitformer.search.cost import AnalyticCost, device_limits, spec_to_plan  # noqa: E402
from fitformer.search.proxy import CombinedEvaluator, KDProxy, WeightErrorProxy  # noqa: E402
from fitformer.search.space import CandidateSpec  # noqa: E402

DEVICE = "laptop-i7-1185g7"
ALGORITHMS = ("nsga2", "evolution", "random", "optuna_nsga2")


# ------------------------------------------------------------------------------------------------ hypervolume
def search_space(shape: EncoderShape, device: Any) -> DesignSpace:
    return DesignSpace(shape, SpaceConfig(depths=(2, 3, 4, 5, 6), hidden_sizes=(384,), heads=(4, 8, 12),
                                          ffn_sizes=(384, 768, 1536), ranks=(8, 16, 32, 64), max_tt_shapes=2,
                                          embedding=False), device_limits(device))


def candidates_per_second(space: DesignSpace, cost: AnalyticCost) -> float:
    """Decode + analytic cost of 1000 random candidates (after 200 warm-up ones); proxy excluded."""
    rng = np.random.default_rng(0)
    for g in [space.sample(rng) for _ in range(200)]:
        cost(space.decode(g))
    genes = [space.sample(rng) for _ in range(1000)]
    t0 = time.perf_counter()
    for g in genes:
        cost(space.decode(g))
    return len(genes) / (time.perf_counter() - t0)


def hypervolume_runs(seeds: list[int], budget: int, population: int
                     ) -> tuple[list[dict[str, Any]], float, dict[str, np.ndarray]]:
    """Per seed, each algorithm's hypervolume; candidates per second; seed 0's fronts for the plot."""
    net, _ = load_classifier("minilm-l6", num_labels=2)
    shape = EncoderShape.from_config(net.config)
    device = get_device(DEVICE)
    space = search_space(shape, device)
    cost = AnalyticCost(device, shape, (1, 128))
    dense_latency = cost(space.decode(space.largest()))["latency_ms"]
    proxy = WeightErrorProxy.from_model(net, shape)
    cps = candidates_per_second(space, cost)

    def normalised(spec: CandidateSpec) -> dict[str, float]:
        m = CombinedEvaluator(cost, proxy)(spec)
        return {**m, "latency_rel": m["latency_ms"] / dense_latency}

    runs = {
        "nsga2": lambda s, seed: nsga2(s, seed, NSGA2Config(population=population)),
        "evolution": lambda s, seed: evolution_front(
            s, [dense_latency * f for f in (0.2, 0.4, 0.6, 0.8)], seed,
            EvolutionConfig(population=population, parents=population // 4, mutations=3 * population // 8,
                            crossovers=3 * population // 8)),
        "random": lambda s, seed: random_search(s, seed, batch_size=population),
        "optuna_nsga2": lambda s, seed: optuna_nsga2(s, seed, population=population),
    }
    rows, fronts = [], {}
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed}
        for name in ALGORITHMS:
            problem = Problem(space, cost, normalised, objectives=("proxy_loss", "latency_rel"),
                              limits={"size_bytes": device.dram_bytes.value})
            result: SearchResult = runs[name](Session(problem, budget), seed)
            row[name] = hypervolume(result.points(), [1.0, 1.0])
            if seed == seeds[0]:
                fronts[name] = np.array([c.objectives(result.objectives) for c in result.front])
            print(f"seed {seed} {name}: hv {row[name]:.4f} ({len(result.history)} candidates)", flush=True)
        rows.append(row)
    return rows, cps, fronts


# ------------------------------------------------------------------------------------------------ proxy vs accuracy
def pipeline_space(shape: EncoderShape, device: Any) -> DesignSpace:
    """The design space ``fitformer compress`` searches (as built by its search stage)."""
    h, heads, ffn = shape.hidden_size, shape.num_heads, shape.intermediate_size
    return DesignSpace(shape, SpaceConfig(depths=tuple(range(max(1, shape.num_layers // 2), shape.num_layers + 1)),
                                          hidden_sizes=(h,), heads=tuple(sorted({max(1, heads // 2), heads})),
                                          ffn_sizes=tuple(sorted({ffn // 4, ffn // 2, ffn})), embedding=False),
                       device_limits(device))


def spread_candidates(space: DesignSpace, proxy: WeightErrorProxy, cost: AnalyticCost, count: int, seed: int = 0
                      ) -> list[CandidateSpec]:
    """``count`` distinct candidates whose proxy spans its range evenly: a pool of an NSGA-II run
    (what the pipeline distils) and of mutants of the dense model (the mildly compressed end), then the
    candidate nearest each of ``count`` evenly spaced proxy values."""
    problem = Problem(space, cost, CombinedEvaluator(cost, proxy), objectives=("proxy_loss", "latency_ms"))
    pool = {c.key: c.spec for c in nsga2(Session(problem, 200), seed, NSGA2Config(population=32)).history}
    rng = np.random.default_rng(seed)
    for prob in (0.02, 0.05, 0.1, 0.2):
        for _ in range(50):
            spec = space.decode(space.mutate(space.largest(), rng, prob))
            pool.setdefault(spec.key(), spec)
    scored = sorted(((proxy(s)["proxy_loss"], k) for k, s in pool.items() if s.key() != space.decode(
        space.largest()).key()))
    lo, hi = scored[0][0], scored[-1][0]
    picked: list[str] = []
    for target in np.linspace(lo, hi, count):
        _, key = min((abs(p - target), k) for p, k in scored if k not in picked)
        picked.append(key)
    return [pool[k] for k in picked]


def kendall_tau(x: list[float], y: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


def proxy_agreement(count: int, minutes: float, train_examples: int, max_length: int) -> dict[str, Any]:
    """The search's proxy (layer errors on the outputs, sensitivity-weighted, as ``fitformer compress`` builds
    it), the weights-only and the KD proxies of ``count`` candidates vs their validation accuracy after
    distillation."""
    from fitformer.train import DistillConfig, DistillData, distill, get_teacher

    teacher = get_teacher()
    shape = EncoderShape.from_config(teacher.model.config)
    device = get_device(DEVICE)
    space = pipeline_space(shape, device)
    cost = AnalyticCost(device, shape, (1, 128))
    weights = WeightErrorProxy.from_model(teacher.model, shape)
    train = teacher.encoded("train", max_length)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    calib = [train.batch(pick[i * 32:(i + 1) * 32]) for i in range(4)]  # 128 examples, not trained on below
    search = WeightErrorProxy.from_model(teacher.model, shape, batches=calib[:2], moment_batches=calib)
    kd = KDProxy(teacher.model, shape, calib)
    data = DistillData(train.select(pick[128:128 + train_examples]), teacher.encoded("validation", max_length),
                       teacher.label_names)
    rows = []
    for i, spec in enumerate(spread_candidates(space, search, cost, count)):
        t0 = time.perf_counter()
        k = kd(spec)
        student = apply_plan(teacher.model, spec_to_plan(spec, shape))
        with tempfile.TemporaryDirectory() as tmp:
            result = distill(student, teacher.model, data,
                             DistillConfig(schedule="progressive", budget_minutes=minutes, batch_size=32, seed=0),
                             tmp, progress=False)
        formats = [x.format for x in spec.layers]
        row = {"candidate": i, "key": spec.key()[:12], "depth": spec.arch.num_layers,
               "dense": formats.count("dense"), "lowrank": formats.count("lowrank"), "tt": formats.count("tt"),
               "int8": sum(x.bits == 8 for x in spec.layers), "size_mb": spec.weight_bytes() / 1e6,
               "output_proxy": search(spec)["proxy_loss"], "weight_proxy": weights(spec)["proxy_loss"],
               "kd_proxy": k["proxy_loss"],
               "calib_accuracy": k["accuracy"], "accuracy": result.validation_accuracy, "steps": result.steps,
               "seconds": time.perf_counter() - t0}
        print("proxy candidate " + ", ".join(f"{n} {v:.4g}" if isinstance(v, float) else f"{n} {v}"
                                             for n, v in row.items()), flush=True)
        rows.append(row)
    acc = [r["accuracy"] for r in rows]
    return {"rows": rows, "teacher_validation_accuracy": teacher.evaluate("validation").accuracy,
            "tau_output": kendall_tau([-r["output_proxy"] for r in rows], acc),
            "tau_weights": kendall_tau([-r["weight_proxy"] for r in rows], acc),
            "tau_kd": kendall_tau([-r["kd_proxy"] for r in rows], acc),
            "tau_calib_accuracy": kendall_tau([r["calib_accuracy"] for r in rows], acc),
            "distill_minutes": minutes, "train_examples": train_examples, "max_length": max_length}


# ------------------------------------------------------------------------------------------------ report
def plot(fronts: dict[str, np.ndarray], proxy: dict[str, Any], path: Path) -> None:
    """Left: seed 0's fronts (staircases); right: proxy loss vs accuracy after distillation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in fronts.items():
        pts = pts[np.argsort(pts[:, 1])]
        left.step(pts[:, 1], pts[:, 0], where="post", marker="o", markersize=3, label=name)
    left.set(xlabel="latency / dense latency (analytic, laptop-i7-1185g7)", ylabel="weight-error proxy loss",
             title="Pareto fronts, seed 0 (lower left is better)", xlim=(0, 1.05))
    left.legend()
    rows = proxy["rows"]
    acc = [r["accuracy"] for r in rows]
    right.scatter([r["weight_proxy"] for r in rows], acc, label=f"weight-error (tau {proxy['tau_weights']:.2f})")
    kd_ax = right.twiny()
    kd_ax.scatter([r["kd_proxy"] for r in rows], acc, marker="x", color="C1",
                  label=f"KD loss (tau {proxy['tau_kd']:.2f})")
    right.set(xlabel="weight-error proxy loss", ylabel="validation accuracy after distillation",
              title=f"proxy vs accuracy ({len(rows)} candidates)")
    kd_ax.set_xlabel("KD proxy loss (x)")
    handles = right.get_legend_handles_labels()[0] + kd_ax.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(2)
    seeds = list(range(3 if args.quick else 10))
    budget = 120 if args.quick else 400
    population = 16 if args.quick else 32
    t0 = time.perf_counter()
    rows, cps, fronts = hypervolume_runs(seeds, budget, population)
    search_minutes = (time.perf_counter() - t0) / 60
    proxy = proxy_agreement(count=4 if args.quick else 12, minutes=0.2 if args.quick else 1.0,
                            train_examples=512 if args.quick else 4000, max_length=64)
    median = {n: statistics.median(r[n] for r in rows) for n in ALGORITHMS}
    wins = {n: sum(r[n] > r["random"] for r in rows) for n in ("nsga2", "evolution")}
    stem = "search.quick" if args.quick else "search"
    plot(fronts, proxy, RESULTS / f"{stem}.png")
    payload = {"seeds": rows, "candidates_per_second": cps, "proxy_kendall_tau": proxy["tau_output"],
               "budget": budget, "population": population, "median_hypervolume": median,
               "seeds_beating_random": wins, "device": DEVICE, "search_minutes": search_minutes,
               "proxy": {k: v for k, v in proxy.items()}}
    lo, hi = min(r["accuracy"] for r in proxy["rows"]), max(r["accuracy"] for r in proxy["rows"])
    md = "\n".join([
        "## Joint search (`bench_search.py`)", "",
        f"MiniLM-L6 on `{DEVICE}` (analytic cost model), budget {budget} candidates per run, population "
        f"{population}, {len(seeds)} seeds; hypervolume of the (weight-error proxy, latency / dense latency) "
        "front, reference (1, 1); higher is better.", "",
        markdown_table(rows, ["seed", *ALGORITHMS], ".4f"), "",
        "Median: " + ", ".join(f"{n} {v:.4f}" for n, v in median.items()) + ". "
        f"Seeds where ours beats random: nsga2 {wins['nsga2']}/{len(rows)}, evolution {wins['evolution']}/"
        f"{len(rows)} (target: 8/10, and no worse than `optuna_nsga2` at the median). Candidates per second "
        f"(decode + analytic cost, proxy excluded, one thread): {cps:.0f} (target 100).", "",
        f"Proxy agreement: {len(proxy['rows'])} candidates of the pipeline's design space spread over the "
        f"search proxy's range, each distilled for {proxy['distill_minutes']:g} min "
        f"({proxy['train_examples']} training examples, max length {proxy['max_length']}, progressive schedule) "
        f"from the fine-tuned teacher (validation accuracy {proxy['teacher_validation_accuracy']:.3f}); "
        f"validation accuracy after distillation {lo:.3f} to {hi:.3f}. Kendall tau with accuracy "
        f"(minus proxy loss; target 0.6): the search's proxy (errors on layer outputs, sensitivity-weighted, "
        f"calibrated on 128 training rows) **{proxy['tau_output']:.2f}** (`proxy_kendall_tau`), the same on "
        f"the weights alone {proxy['tau_weights']:.2f}, KD-loss proxy {proxy['tau_kd']:.2f}, calibration "
        f"accuracy before distillation {proxy['tau_calib_accuracy']:.2f}.", "",
        markdown_table(proxy["rows"], ["candidate", "depth", "dense", "lowrank", "tt", "int8", "size_mb",
                                       "output_proxy", "weight_proxy", "kd_proxy", "calib_accuracy", "accuracy",
                                       "steps"], ".3f"),
        "", f"![Pareto fronts and proxy agreement](benchmarks/results/{stem}.png)",
    ])
    write_results("search", payload, md, quick=args.quick)


if __name__ == "__main__":
    main()
