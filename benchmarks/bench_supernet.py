"""SuperTransformer (HAT): does inherited-weight accuracy rank sub-networks as training them would?

Trains one elastic SuperTransformer from the fine-tuned MiniLM teacher (sandwich rule, logits distillation),
then for at least 12 sub-networks spread over the design space measures: accuracy with inherited weights
(validation subset), parameters and host latency of the extracted dense model (batch 32 x 128 tokens), and
test accuracy after a short distillation of the extracted model. Reports Kendall's tau between inherited and
distilled accuracy, the smallest sub-network's inherited accuracy, and the accuracy lost by the sub-network
at half the teacher's latency. The half-latency sub-network is chosen as HAT would, under a latency
constraint: the best inherited accuracy among random candidates whose extracted models measure at most half
the teacher's latency. Every latency is timed in rounds alternating with the teacher, and each ratio is of
such a pair.

Run: ``python benchmarks/bench_supernet.py`` (about 30-40 minutes on 2 cores) or ``--quick``.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, parser, write_results  # noqa: E402

from fitformer.hardware.timing import measure_interleaved, random_token_inputs  # noqa: E402
from fitformer.io import cache_root  # noqa: E402
from fitformer.models import count_parameters  # noqa: E402
from fitformer.models.elastic import ElasticBert, ElasticSpace, SubConfig, extract, subnet_macs  # noqa: E402
from fitformer.train import evaluate, get_teacher  # noqa: E402
from fitformer.train.supernet import (  # noqa: E402
    ShortDistillConfig,
    SupernetConfig,
    inherited_accuracy,
    short_distill,
    subset,
    teacher_logits,
    train_supernet,
)

BATCH, SEQ = 32, 128


def measure_interleaved_pair(teacher: torch.nn.Module, small: torch.nn.Module, inputs: dict[str, torch.Tensor],
                             rounds: int) -> tuple[float, float]:
    """Batch-32 latency of the teacher and of a sub-network, timed in alternating rounds so their ratio holds
    even when the machine's load drifts during the benchmark."""
    teacher.eval()
    small.eval()
    with torch.inference_mode():
        t, s = measure_interleaved([lambda: teacher(**inputs), lambda: small(**inputs)],
                                   rounds=rounds, repeats=3, max_seconds=10)
    return t, s


def choose_subnets(elastic: ElasticBert, count: int, rng: random.Random) -> list[tuple[str, SubConfig]]:
    """The smallest sub-network plus others evenly spaced in MACs between it and the largest."""
    space, hd = elastic.space, elastic.head_dim
    pool = sorted({space.sample(rng) for _ in range(3000)}, key=lambda s: subnet_macs(s, hd))
    low, high = subnet_macs(space.smallest(), hd), subnet_macs(space.largest(), hd)
    chosen = [("smallest", space.smallest())]
    for k in range(1, count):
        target = low + (high - low) * k / (count - 1)
        best = min((s for s in pool if s not in {c for _, c in chosen}),
                   key=lambda s: abs(subnet_macs(s, hd) - target))
        chosen.append(("spread", best))
    return chosen


def half_latency_pick(elastic: ElasticBert, teacher: torch.nn.Module, val, labels, inputs: dict[str, torch.Tensor],
                      rng: random.Random, candidates: int) -> SubConfig:
    """HAT-style pick under a latency constraint: among random candidates at 30-60% of the teacher's MACs,
    the best inherited accuracy of those whose extracted model measures at most half the teacher's latency
    (timed in rounds alternating with the teacher). MACs alone misjudge it: a narrow hidden size saves MACs
    but little time at batch 32, and costs accuracy."""
    space, hd = elastic.space, elastic.head_dim
    full = subnet_macs(space.largest(), hd)
    samples = sorted({space.sample(rng) for _ in range(20_000)}, key=lambda s: s.describe())
    band = [s for s in samples if 0.30 * full <= subnet_macs(s, hd) <= 0.60 * full]
    pool = rng.sample(band, min(candidates, len(band)))
    fast = []
    for sub in pool:
        teacher_ms, sub_ms = measure_interleaved_pair(teacher, extract(elastic, sub), inputs, rounds=2)
        if sub_ms <= 0.5 * teacher_ms:
            fast.append(sub)
    if not fast:
        raise RuntimeError(f"none of {len(pool)} candidates measured at half the teacher's latency")
    return max(fast, key=lambda s: inherited_accuracy(elastic, s, val, labels))


def markdown(payload: dict) -> str:
    """The BENCHMARKS.md section, from the results alone."""
    teacher_row, rows, tau_value, st = payload["teacher"], payload["subnets"], payload["kendall_tau"], \
        payload["settings"]
    teacher_acc = teacher_row["finetuned_accuracy"]
    smallest = next(r for r in rows if r["role"] == "smallest")
    half = next(r for r in rows if r["role"] == "half_latency")
    table = markdown_table([{**r, "config": SubConfig.from_dict(r["config"]).describe()}
                            for r in [teacher_row, *rows]],
                           ["name", "config", "inherited_accuracy", "finetuned_accuracy", "params",
                            "latency_ms_b32", "teacher_latency_ms_b32", "latency_ratio"], ".3f")
    return "\n".join([
        "## SuperTransformer (HAT)", "",
        f"One SuperTransformer trained for {st['supernet_steps']} sandwich steps "
        f"({st['supernet_train_seconds'] / 60:.1f} min) from the MiniLM teacher; each sub-network evaluated with "
        f"inherited weights on {st['validation_subset']} validation examples, then extracted, timed (batch 32 x "
        f"128, {st.get('threads', 2)} threads) in rounds alternating with the teacher, and distilled for "
        f"{st['distill_steps']} steps (test accuracy). `latency_ratio` is the sub-network's time over the "
        "teacher's in the same pair (`teacher_latency_ms_b32`); the teacher row's latency is the median of its "
        "pairings, so a pair timed under heavier load shows larger times on both sides but a true ratio. "
        f"`{half['name']}` is the HAT-style pick: the best inherited accuracy among {st.get('pick_pool', 32)} random "
        "candidates (30-60% of the teacher's MACs) whose extracted models measured at most half the teacher's "
        "latency. Teacher row: test accuracy in both columns.", "",
        table, "",
        f"- Kendall tau (inherited vs distilled): **{tau_value if tau_value is None else round(tau_value, 3)}** "
        "(target >= 0.6)",
        f"- Smallest sub-network, inherited accuracy: **{smallest['inherited_accuracy']:.3f}** (target >= 0.70)",
        f"- Sub-network at {half['latency_ratio']:.2f}x the teacher's latency ({half['name']}): loses "
        f"**{100 * (teacher_acc - half['finetuned_accuracy']):.1f} points** after distillation (target <= 2)",
    ])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="SuperTransformer training steps.")
    p.add_argument("--distill-steps", type=int, default=None, help="Short distillation steps per sub-network.")
    args = p.parse_args()
    quick = args.quick
    torch.set_num_threads(args.threads or 2)
    steps = args.steps or (30 if quick else 400)
    distill_steps = args.distill_steps or (10 if quick else 150)
    val_n, test_n, pool_n = (200, 300, 6) if quick else (1000, None, 32)
    started = time.perf_counter()

    teacher = get_teacher()
    labels = teacher.label_names
    train = teacher.encoded("train")
    val = subset(teacher.encoded("validation"), val_n, seed=1)
    test = subset(teacher.encoded("test"), test_n, seed=2)
    config = SupernetConfig(steps=steps)
    rule = ElasticSpace.for_config(teacher.model.config).layers  # a new depth rule means a new SuperTransformer
    mode = "quick" if quick else "full"
    out = cache_root() / "bench_supernet" / f"{teacher.model_dir.parent.name}-{mode}-{rule}-{steps}"
    t0 = time.perf_counter()
    elastic, result = train_supernet(teacher.model, teacher.tokenizer, train, config, out, progress=False)
    train_seconds = result.seconds
    print(f"supernet: {result.steps} steps in {train_seconds:.0f} s (this call {time.perf_counter() - t0:.0f} s)")
    elastic.eval()
    distill_data = subset(train, config.steps * config.batch_size, config.seed)
    targets = teacher_logits(teacher.model, distill_data, out / "teacher_logits.safetensors")
    vocab = teacher.model.config.vocab_size

    teacher_acc = evaluate(teacher.model, test, labels).accuracy
    teacher_row = {
        "name": "teacher", "config": elastic.full.to_dict(), "inherited_accuracy": teacher_acc,
        "finetuned_accuracy": teacher_acc, "params": count_parameters(teacher.model),
        "latency_ms_b32": None,  # the median of its pairings with the sub-networks, set below
        "validation_subset_accuracy": inherited_accuracy(ElasticBert(teacher.model), elastic.space.largest(),
                                                         val, labels),
        "macs": subnet_macs(elastic.full, elastic.head_dim, SEQ),
    }
    print(f"teacher: test accuracy {teacher_acc:.4f}")
    inputs = random_token_inputs(BATCH, SEQ, vocab)

    rng = random.Random(0)
    chosen = choose_subnets(elastic, 11, rng)
    chosen.append(("half_latency", half_latency_pick(elastic, teacher.model, subset(val, 300, seed=3), labels, inputs,
                                                     rng, pool_n)))
    rows = []
    for i, (role, sub) in enumerate(chosen):
        t = time.perf_counter()
        inherited = inherited_accuracy(elastic, sub, val, labels)
        small = extract(elastic, sub)
        teacher_lat, lat = measure_interleaved_pair(teacher.model, small, inputs, 2 if quick else 4)
        short_distill(small, distill_data, targets, ShortDistillConfig(steps=distill_steps, seed=i))
        tuned = evaluate(small, test, labels).accuracy
        rows.append({"name": f"subnet-{i:02d}", "role": role, "config": sub.to_dict(), "inherited_accuracy": inherited,
                     "finetuned_accuracy": tuned, "params": count_parameters(small), "latency_ms_b32": lat,
                     "latency_ratio": lat / teacher_lat, "teacher_latency_ms_b32": teacher_lat,
                     "macs": subnet_macs(sub, elastic.head_dim, SEQ)})
        print(f"{role:12s} {sub.describe():60s} inherited {inherited:.4f} distilled {tuned:.4f} "
              f"{lat:.0f} ms ({time.perf_counter() - t:.0f} s)", flush=True)

    teacher_row["latency_ms_b32"] = statistics.median(r["teacher_latency_ms_b32"] for r in rows)
    tau = kendalltau([r["inherited_accuracy"] for r in rows], [r["finetuned_accuracy"] for r in rows])
    tau_value = float(tau.statistic) if tau.statistic == tau.statistic else None  # NaN when all ties
    smallest = next(r for r in rows if r["role"] == "smallest")
    half = next(r for r in rows if r["role"] == "half_latency")
    checks = {
        "kendall_tau_at_least_0.6": tau_value is not None and tau_value >= 0.6,
        "smallest_inherited_at_least_0.70": bool(smallest["inherited_accuracy"] >= 0.70),
        "half_latency_loss_at_most_2_points": bool(teacher_acc - half["finetuned_accuracy"] <= 0.02),
    }
    payload = {
        "teacher": teacher_row, "subnets": rows, "kendall_tau": tau_value,
        "kendall_p_value": float(tau.pvalue) if tau_value is not None else None,
        "half_latency": {"name": half["name"], "latency_ratio": half["latency_ratio"],
                         "accuracy_loss": teacher_acc - half["finetuned_accuracy"]},
        "targets": checks,
        "settings": {"supernet_steps": result.steps, "supernet_train_seconds": train_seconds,
                     "distill_steps": distill_steps, "batch_size": config.batch_size,
                     "validation_subset": len(val), "test_examples": len(test), "pick_pool": pool_n,
                     "threads": torch.get_num_threads(),
                     "space": elastic.space.to_dict(), "total_seconds": time.perf_counter() - started},
    }
    write_results("supernet", payload, markdown(payload), quick=quick)


if __name__ == "__main__":
    main()
