"""The command line: help on every command, and bad input that exits 2 with one line and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fitformer.cli import app, main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _commands(group, prefix=()):
    import typer.main

    click_group = typer.main.get_command(group)
    stack = [(prefix, click_group)]
    while stack:
        path, cmd = stack.pop()
        subs = getattr(cmd, "commands", None)
        if subs:
            stack.extend((path + (name,), sub) for name, sub in subs.items())
        else:
            yield path


@pytest.mark.parametrize("path", sorted(_commands(app)))
def test_every_command_has_help_with_an_example(path, capsys):
    code, out, _ = run_cli([*path, "--help"], capsys)
    assert code == 0
    assert "Example" in out, f"`fitformer {' '.join(path)} --help` shows no example"


@pytest.fixture()
def bad_files(tmp_path):
    files = {}
    files["one_class"] = tmp_path / "one.csv"
    files["one_class"].write_text("text,label\na,x\nb,x\n", encoding="utf-8")
    files["latin1"] = tmp_path / "latin.csv"
    files["latin1"].write_bytes("text,label\ncaf\xe9,1\nthe,0\n".encode("latin-1"))
    files["ok"] = tmp_path / "ok.csv"
    files["ok"].write_text("review,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)), encoding="utf-8")
    files["noconfig"] = tmp_path / "empty_model"
    files["noconfig"].mkdir()
    return files


BAD_INPUTS = [
    (["finetune", "--data", "missing.csv"], "missing.csv: file not found"),
    (["finetune", "--data", "{one_class}"], "has one class"),
    (["finetune", "--data", "{latin1}"], "not valid UTF-8"),
    (["finetune", "--data", "{ok}"], "no column 'text'"),
    (["finetune", "--data", "{ok}", "--text-col", "review", "--label-col", "y"], "no column 'y'"),
    (["finetune", "--model", "{noconfig}", "--data", "{ok}", "--text-col", "review"], "no config.json"),
    (["finetune", "--model", "org/some-model"], "not a local directory"),
    (["finetune", "--task", "imdb"], "unknown task 'imdb'"),
    (["finetune", "--epochs", "0"], "epochs=0"),
    (["finetune", "--lr", "5"], "learning rate 5.0"),
    (["finetune", "--task", "rotten-tomatoes", "--data", "{ok}"], "either --task or --data"),
    (["data", "inspect", "nope.jsonl"], "nope.jsonl: file not found"),
    (["evaluate", "--model", "{noconfig}"], "not a classifier saved by fitformer"),
    (["evaluate", "--model", "{noconfig}", "--split", "dev"], "--split dev"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(args, message, bad_files, capsys, tmp_path):
    args = [a.format(**{k: str(v) for k, v in bad_files.items()}) for a in args]
    before = set(tmp_path.rglob("*"))
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert set(tmp_path.rglob("*")) == before, "a failed command left files behind"


def test_console_script_exit_code_and_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fitformer.cli", "finetune", "--data", str(tmp_path / "x.csv")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_data_inspect_json(bad_files, capsys):
    code, out, _ = run_cli(["data", "inspect", str(bad_files["ok"]), "--text-col", "review", "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["examples"] == 20 and summary["classes"] == {"0": 10, "1": 10}
