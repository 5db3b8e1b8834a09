"""Run directories: finished stages are skipped, corrupted or partial ones rerun."""

from __future__ import annotations

import pytest

from fitformer.errors import UserError
from fitformer.io import write_text_atomic
from fitformer.rundir import RunDir


def make_stage(calls: list[str], name: str, content: str = "data"):
    def fn(run: RunDir):
        calls.append(name)
        write_text_atomic(run.file(f"{name}.txt"), content)
        return {"value": len(calls)}, [f"{name}.txt"]

    return fn


def test_finished_stage_is_not_rerun(tmp_path):
    calls: list[str] = []
    assert RunDir(tmp_path).stage("a", make_stage(calls, "a")) == {"value": 1}
    assert RunDir(tmp_path).stage("a", make_stage(calls, "a")) == {"value": 1}
    assert calls == ["a"]


@pytest.mark.parametrize("damage", ["truncate", "delete", "edit"])
def test_corrupted_output_is_recomputed(tmp_path, damage):
    calls: list[str] = []
    RunDir(tmp_path).stage("a", make_stage(calls, "a", "x" * 100))
    path = tmp_path / "a.txt"
    if damage == "truncate":
        path.write_text("x" * 10)
    elif damage == "delete":
        path.unlink()
    else:
        path.write_text("y" * 100)
    RunDir(tmp_path).stage("a", make_stage(calls, "a", "x" * 100))
    assert calls == ["a", "a"]


def test_crash_inside_a_stage_leaves_it_unfinished(tmp_path):
    def crash(run: RunDir):
        write_text_atomic(run.file("half.txt"), "partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        RunDir(tmp_path).stage("b", crash)
    calls: list[str] = []
    RunDir(tmp_path).stage("b", make_stage(calls, "b"))
    assert calls == ["b"]


def test_corrupted_manifest_means_rerun(tmp_path):
    calls: list[str] = []
    RunDir(tmp_path).stage("a", make_stage(calls, "a"))
    (tmp_path / "manifest.json").write_text("{not json")
    RunDir(tmp_path).stage("a", make_stage(calls, "a"))
    assert calls == ["a", "a"]


def test_other_configuration_is_refused(tmp_path):
    RunDir(tmp_path, config={"seed": 0})
    with pytest.raises(UserError, match="different configuration"):
        RunDir(tmp_path, config={"seed": 1})
