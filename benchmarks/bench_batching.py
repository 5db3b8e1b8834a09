"""Training throughput with length-grouped batches against random batches, side by side in one run.

Distillation is step-bound on a CPU: every schedule gets more out of a fixed budget when a step costs less.
A batch pads to its longest row, so random batches of short reviews carry about twice their real tokens;
``DistillConfig.group_by_length`` sorts each chunk of batches by length first. This benchmark trains the
real fine-tuned MiniLM teacher (task loss, AdamW) on rotten-tomatoes batches drawn both ways, alternating
blocks of steps between the two orders so that machine load lands on both, and reports examples per
second, padded tokens per example and their ratios.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import markdown_table, parser, write_results  # noqa: E402
from fitformer.train import DistillConfig, get_teacher  # noqa: E402
from fitformer.train.evaluate import model_logits  # noqa: E402

GROUP = DistillConfig.group_by_length  # the default distillation uses


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="Alternating rounds (default 6, quick 2).")
    p.add_argument("--steps", type=int, default=None, help="Steps per order per round (default 8, quick 3).")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rounds, steps = args.rounds or (2 if args.quick else 6), args.steps or (3 if args.quick else 8)
    teacher = get_teacher()
    train = teacher.encoded("train")
    model = copy.deepcopy(teacher.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    orders = {name: train.epoch_order(args.batch_size, torch.Generator().manual_seed(0), group)
              for name, group in (("random", 0), ("grouped", GROUP))}
    lengths = train.attention_mask.sum(dim=1)
    stats = {name: {"seconds": [], "examples": 0, "padded_tokens": 0, "real_tokens": 0} for name in orders}

    def step(batch: dict[str, torch.Tensor]) -> None:
        loss = torch.nn.functional.cross_entropy(model_logits(model, batch), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(train.batch(orders["random"][: args.batch_size]))  # warm-up
    for r in range(rounds):
        for name, order in orders.items():
            # each round takes the next block of batches of its epoch order, so both see a fair sample
            start = r * steps * args.batch_size
            block = [order[start + k * args.batch_size:][: args.batch_size] for k in range(steps)]
            t0 = time.perf_counter()
            for idx in block:
                step(train.batch(idx))
            stats[name]["seconds"].append(time.perf_counter() - t0)
            for idx in block:
                stats[name]["examples"] += len(idx)
                stats[name]["padded_tokens"] += int(lengths[idx].max()) * len(idx)
                stats[name]["real_tokens"] += int(lengths[idx].sum())
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {s['seconds'][-1]:.1f} s" for n, s in stats.items()))
    rows = []
    for name, s in stats.items():
        total = sum(s["seconds"])
        rows.append({"order": name, "group_by_length": GROUP if name == "grouped" else 0,
                     "examples_per_second": s["examples"] / total,
                     "median_seconds_per_step": statistics.median(s["seconds"]) / steps,
                     "padded_tokens_per_example": s["padded_tokens"] / s["examples"],
                     "real_tokens_per_example": s["real_tokens"] / s["examples"],
                     "steps": rounds * steps})
    speedup = rows[1]["examples_per_second"] / rows[0]["examples_per_second"]
    padding = rows[0]["padded_tokens_per_example"] / rows[1]["padded_tokens_per_example"]
    payload = {"model": "get_teacher() (MiniLM-L6, fine-tuned)", "batch_size": args.batch_size,
               "rows": rows, "speedup_grouped_vs_random": speedup, "padded_token_ratio": padding}
    table = markdown_table(rows, ["order", "group_by_length", "examples_per_second", "median_seconds_per_step",
                                  "padded_tokens_per_example", "real_tokens_per_example", "steps"])
    markdown = f"""## Length-grouped batches (`bench_batching.py`)

Training steps (forward, backward, AdamW) of the fine-tuned MiniLM-L6 on rotten-tomatoes training batches of
{args.batch_size}, drawn from one epoch order shuffled at random and one grouped by length (chunks of {GROUP}
batches sorted by length, then the batches shuffled; `DistillConfig.group_by_length`), alternating blocks of
{steps} steps for {rounds} rounds, {torch.get_num_threads()} threads.

{table}

Grouped batches pad {padding:.2f}x fewer tokens per example and train **{speedup:.2f}x** as many examples per
second.
"""
    write_results("batching", payload, markdown, args.quick)


if __name__ == "__main__":
    main()
