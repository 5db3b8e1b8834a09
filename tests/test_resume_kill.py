"""``fitformer compress`` killed with SIGKILL at several points resumes to the uninterrupted result.

One run is killed after its teacher stage, again after the searches, again in the middle of a distillation,
then finished; each restart must skip what had finished (same manifest entries, "done earlier, skipped",
no second teacher training, distillation resumed from its checkpoint). Its result must equal a run that was
never interrupted, trained from its own cache: the same split, search fronts, candidates, plan, chosen model
and accuracies (which also shows that the same seed gives the same run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

DEVICES = ["laptop-i7-1185g7", "raspberry-pi-4"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_model_dir, sentiment_data) -> Path:
    root = tmp_path_factory.mktemp("resume")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": sentiment_data.label_names[y]}) + "\n"
                            for t, y in zip(sentiment_data.texts, sentiment_data.labels, strict=True)))
    # budget_minutes far above what the tiny distillations need: they end at their step budget, not the clock
    config = {"model": str(tiny_model_dir), "data": str(data), "devices": DEVICES, "max_accuracy_drop": 100,
              "budget_minutes": 4, "search_budget": 40, "candidates": 2, "teacher_epochs": 1, "max_length": 32,
              "latency_repeats": 3, "onnx": False}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, out: Path, cache: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "FITFORMER_CACHE": str(cache), "FITFORMER_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, "-m", "fitformer.cli", "compress", "--config", str(config),
                                 "--out", str(out)], stdout=handle, stderr=subprocess.STDOUT, env=env)


def stages(run: Path) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text())["stages"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 20 ms); fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the kill point"
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def split_hash(cache: Path) -> str:
    (meta,) = cache.glob("teachers/*/best/fitformer.json")
    return json.loads(meta.read_text())["split"]["split_hash"]


def result_of(run: Path) -> dict:
    """What must not depend on interruptions: everything except measured latencies and paths."""
    summary = json.loads((run / "summary.json").read_text())
    rows = {"teacher": summary["teacher"], **summary["candidates"], **summary["baselines"]}
    return {"chosen": summary["chosen"]["key"],
            "accuracy": {k: v["test_accuracy"] for k, v in rows.items()},
            "modelled": {k: v["modelled"] for k, v in rows.items()},
            "plan": json.loads((run / "model" / "plan.json").read_text()),
            "candidates": json.loads((run / "candidates.json").read_text()),
            "fronts": {d: json.loads((run / "search" / f"{d}.json").read_text()) for d in DEVICES}}


@pytest.mark.slow  # five compress processes on the tiny model: about 100 s on two cores
def test_compress_killed_three_times_resumes_to_the_uninterrupted_result(config_file, tmp_path):
    reference = tmp_path / "reference"
    log = tmp_path / "reference.log"
    assert start(config_file, reference, tmp_path / "cache-reference", log).wait() == 0, log.read_text()

    run, cache = tmp_path / "killed", tmp_path / "cache-killed"
    distilling = lambda: [d for d in (run / "distill").glob("*") if (d / "last" / "state.json").exists()]  # noqa: E731
    kill_points = {
        "after the teacher": lambda: "teacher" in stages(run),
        "after the searches": lambda: all(f"search-{d}" in stages(run) for d in DEVICES),
        "during distillation": lambda: bool(distilling()),
    }
    finished_before: list[dict] = []
    mid_distill: list[bool] = []
    for i, ready in enumerate(kill_points.values()):
        kill_when(start(config_file, run, cache, tmp_path / f"killed-{i}.log"), ready)
        finished_before.append(stages(run))
        mid_distill.append(any(not (d / "result.json").exists() for d in distilling()))
    log = tmp_path / "killed-3.log"
    assert start(config_file, run, cache, log).wait() == 0, log.read_text()

    final = stages(run)
    for i, finished in enumerate(finished_before):
        assert finished, "a kill point came before any stage finished"
        restart_log = (tmp_path / f"killed-{i + 1}.log").read_text()
        for name, entry in finished.items():
            assert final[name] == entry, f"stage {name}, finished before kill {i + 1}, was recomputed"
            assert f"{name}: done earlier, skipped" in restart_log
        assert "epoch 1/" not in restart_log, "the teacher was trained again"
        if i == 2 and mid_distill[i]:
            assert "resuming distillation at stage" in restart_log
    assert split_hash(cache) == split_hash(tmp_path / "cache-reference")
    assert result_of(run) == result_of(reference)
