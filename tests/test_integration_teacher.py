"""Integration: the real MiniLM fine-tuned on a few hundred real rotten-tomatoes reviews learns the task."""

from __future__ import annotations

import pytest

from fitformer.data import load_task
from fitformer.train import FinetuneConfig, get_teacher


@pytest.mark.slow
def test_minilm_learns_rotten_tomatoes(tmp_path):
    full = load_task("rotten-tomatoes")
    data = full.subset(list(range(0, len(full), 8)))  # 1,601 real reviews, both classes
    config = FinetuneConfig(epochs=2, batch_size=16, learning_rate=1e-4, max_length=64)
    teacher = get_teacher("minilm-l6", data=data, config=config, out_dir=tmp_path / "teacher")
    test = teacher.evaluate("test")
    majority = max(test.per_class[name]["support"] for name in test.label_names) / test.examples
    assert test.accuracy >= majority + 0.08, (test.accuracy, majority)
