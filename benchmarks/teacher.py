"""Fine-tune the real MiniLM-L6 teacher on the full rotten-tomatoes train split and report test accuracy.

Writes benchmarks/results/teacher.json: {"test_accuracy", "train_examples", "seconds", ...}. The teacher is
cached, so a rerun reports the cached model (``seconds`` is the time its fine-tuning took).
"""

from __future__ import annotations

import torch
from common import markdown_table, parser, write_results

from fitformer.train import FinetuneConfig, get_teacher


def main() -> None:
    args = parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    config = FinetuneConfig(max_train_examples=1000, epochs=1) if args.quick else FinetuneConfig()
    teacher = get_teacher(config=config)
    test = teacher.evaluate("test")
    payload = {
        "model": "minilm-l6",
        "task": "rotten-tomatoes",
        "test_accuracy": test.accuracy,
        "test_macro_f1": test.macro_f1,
        "validation_accuracy": teacher.result.validation_accuracy,
        "train_examples": teacher.result.train_examples,
        "test_examples": test.examples,
        "seconds": teacher.result.seconds,
        "finetune": vars(config),
        "history": teacher.result.history,
    }
    row = {k: payload[k] for k in ("test_accuracy", "test_macro_f1", "train_examples", "test_examples")}
    row["minutes"] = payload["seconds"] / 60
    markdown = "\n".join([
        "## Dense teacher (MiniLM-L6 on rotten-tomatoes)",
        "",
        "`python benchmarks/teacher.py`: full fine-tuning of the pretrained all-MiniLM-L6-v2 with a new "
        f"classification head ({config.epochs} epochs, batch {config.batch_size}, lr {config.learning_rate}, "
        "warm-up then linear decay; best validation epoch kept).",
        "",
        markdown_table([row], ["test_accuracy", "test_macro_f1", "train_examples", "test_examples", "minutes"]),
    ])
    write_results("teacher", payload, markdown, quick=args.quick)


if __name__ == "__main__":
    main()
