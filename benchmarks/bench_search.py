"""Joint search benchmark: hypervolume of the (proxy loss, latency) front found by NSGA-II, HAT-style
constrained evolution, random search and Optuna's NSGA-II at equal budgets, and candidates per second with
the analytic cost model.

Hypervolume part: MiniLM-L6's real weights, the deterministic weight-error proxy
(:class:`fitformer.search.proxy.WeightErrorProxy`) and the analytic model of the laptop CPU in the catalog;
objectives are normalised by the dense model (latency / dense latency, proxy loss in [0, 1]) and the
reference point is (1.0, 1.0). ``proxy_kendall_tau`` (KD proxy vs accuracy after short distillation) is
reported as null when not measured in this run.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, parser, write_results  # noqa: E402
from fitformer.hardware import get_device  # noqa: E402
from fitformer.models import load_classifier  # noqa: E402
from fitformer.search import (  # noqa: E402
    DesignSpace,
    EncoderShape,
    EvolutionConfig,
    NSGA2Config,
    Problem,
    Session,
    SpaceConfig,
    evolution_front,
    hypervolume,
    nsga2,
    optuna_nsga2,
    random_search,
)
from fitformer.search.cost import AnalyticCost, device_limits  # noqa: E402
from fitformer.search.proxy import CombinedEvaluator, WeightErrorProxy  # noqa: E402

DEVICE = "laptop-i7-1185g7"


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(2)
    seeds = list(range(3 if args.quick else 10))
    budget = 120 if args.quick else 400
    population = 16 if args.quick else 32
    net, _ = load_classifier("minilm-l6", num_labels=2)
    shape = EncoderShape.from_config(net.config)
    device = get_device(DEVICE)
    space = DesignSpace(shape, SpaceConfig(depths=(2, 3, 4, 5, 6), hidden_sizes=(384,), heads=(4, 8, 12),
                                           ffn_sizes=(384, 768, 1536), ranks=(8, 16, 32, 64), max_tt_shapes=2,
                                           embedding=False), device_limits(device))
    cost = AnalyticCost(device, shape, (1, 128))
    dense_latency = cost(space.decode(space.largest()))["latency_ms"]
    proxy = WeightErrorProxy.from_model(net, shape)

    # candidates per second with the analytic cost model (decode + cost, proxy excluded)
    rng = np.random.default_rng(0)
    warm = [space.sample(rng) for _ in range(200)]
    for g in warm:
        cost(space.decode(g))
    genes = [space.sample(rng) for _ in range(1000)]
    t0 = time.perf_counter()
    for g in genes:
        cost(space.decode(g))
    cps = len(genes) / (time.perf_counter() - t0)

    def normalised(spec):
        m = CombinedEvaluator(cost, proxy)(spec)
        return {**m, "latency_rel": m["latency_ms"] / dense_latency}

    algorithms = {
        "nsga2": lambda s, seed: nsga2(s, seed, NSGA2Config(population=population)),
        "evolution": lambda s, seed: evolution_front(
            s, [dense_latency * f for f in (0.2, 0.4, 0.6, 0.8)], seed,
            EvolutionConfig(population=population, parents=population // 4, mutations=3 * population // 8,
                            crossovers=3 * population // 8)),
        "random": lambda s, seed: random_search(s, seed, batch_size=population),
        "optuna_nsga2": lambda s, seed: optuna_nsga2(s, seed, population=population),
    }
    rows = []
    for seed in seeds:
        row = {"seed": seed}
        for name, run in algorithms.items():
            problem = Problem(space, cost, normalised, objectives=("proxy_loss", "latency_rel"))
            result = run(Session(problem, budget), seed)
            row[name] = hypervolume(result.points(), [1.0, 1.0])
            print(f"seed {seed} {name}: hv {row[name]:.4f} ({len(result.history)} candidates)", flush=True)
        rows.append(row)
    median = {n: statistics.median(r[n] for r in rows) for n in algorithms}
    wins = {n: sum(r[n] > r["random"] for r in rows) for n in ("nsga2", "evolution")}
    payload = {"seeds": rows, "candidates_per_second": cps, "proxy_kendall_tau": None, "budget": budget,
               "median_hypervolume": median, "seeds_beating_random": wins, "device": DEVICE,
               "proxy": "weight-error (hypervolume part)"}
    md = "\n".join([
        "## Joint search", "",
        f"MiniLM-L6 on `{DEVICE}` (analytic cost model), budget {budget} candidates per run, "
        f"{len(seeds)} seeds; hypervolume of the (weight-error proxy, latency / dense latency) front, "
        "reference (1, 1); higher is better.", "",
        markdown_table(rows, ["seed", *algorithms], ".4f"), "",
        "Median: " + ", ".join(f"{n} {v:.4f}" for n, v in median.items()) + ". "
        f"Seeds where ours beats random: nsga2 {wins['nsga2']}/{len(rows)}, evolution {wins['evolution']}/"
        f"{len(rows)}. Candidates per second (decode + analytic cost, proxy excluded): {cps:.0f}.",
        "proxy_kendall_tau: not measured in this run.",
    ])
    write_results("search", payload, md, quick=args.quick)


if __name__ == "__main__":
    main()
