"""Bad input across every command: exit 2 (3 for infeasible constraints), one line naming the problem and the
fix, no traceback, no file left behind. The cases of ``tests/test_cli.py::BAD_INPUTS`` are not repeated here."""

from __future__ import annotations

import json

import pytest

from fitformer.cli import main


@pytest.fixture()
def inputs(tmp_path, tiny_model_dir):
    """Bad (and a few good) input files in ``tmp_path/in``; ``{name}`` in a case's arguments is replaced by a path."""
    d = tmp_path / "in"
    d.mkdir()
    texts = {
        "ok.csv": "text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)),
        "notes.txt": "text,label\na,0\n",
        "empty.csv": "text,label\n",
        "badjson.jsonl": '{"text": "a", "label": 1}\n{"text": \n',
        "array.jsonl": "[1, 2]\n",
        "empty_text.csv": "text,label\na,0\n ,1\nb,1\nc,0\n",
        "empty_label.csv": "text,label\na,0\nb,\nb,1\nc,0\n",
        "stray.csv": "text,label\na,0\nb,1\nc,1\nd,0\ne,O\n",
        "bad.yaml": "devices: [raspberry-pi-4\n",
        "list.yaml": "- raspberry-pi-4\n",
        "intkey.yaml": "2024-01-01: x\n",
        "deep.yaml": "devices: " + "[" * 5000 + "]" * 5000 + "\n",
        "nokind.yaml": "layers: {'*': [{kind: nope}]}\n",
        "spec.json": "{not json",
        "afile": "x",
    }
    for name, text in texts.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (d / "config_latin1.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
    (d / "dir.csv").mkdir()
    paths = {name.replace(".", "_"): str(d / name) for name in [*texts, "latin1.yaml", "config_latin1.yaml", "dir.csv"]}
    return {**paths, "in": str(d), "tiny": str(tiny_model_dir), "missing": str(d / "missing")}


QUANT = ["quantize", "-m", "{tiny}", "-o", "q.safetensors"]
SEARCH = ["search", "--proxy", "weights", "--model", "{tiny}"]
DISTILL = ["distill", "--plan", "{missing}.yaml"]

BAD_INPUTS = [
    # data
    (["data", "inspect", "{notes_txt}"], "unknown file type '.txt'"),
    (["data", "inspect", "{dir_csv}"], "is a directory"),
    (["data", "inspect", "{empty_csv}"], "no data rows"),
    (["data", "inspect", "{badjson_jsonl}"], "line 2 is not valid JSON"),
    (["data", "inspect", "{array_jsonl}"], "line 1 is not a JSON object"),
    (["data", "inspect", "{empty_text_csv}"], "line 3: empty text in column 'text'"),
    (["data", "inspect", "{empty_label_csv}"], "line 3: empty label in column 'label'"),
    (["data", "inspect", "{stray_csv}"], "line 6: label 'O' in column 'label' appears only 1 time"),
    (["data", "inspect", "{ok_csv}", "--text-col", "a", "--text-col", "b", "--text-col", "c"], "given 3 times"),
    # finetune
    (["finetune", "--batch-size", "0"], "batch size 0"),
    (["finetune", "--max-length", "4"], "max length 4"),
    (["finetune", "--max-train-examples", "1"], "max train examples 1"),
    (["finetune", "--out", "{afile}"], "is a file; pass a directory"),
    # compress: the config file, each field's range, the resources it names
    (["compress", "--config", "{missing}.yaml"], "no such file; `fitformer config example > run.yaml`"),
    (["compress", "--config", "{bad_yaml}"], "not valid YAML"),
    (["compress", "--config", "{list_yaml}"], "expected a mapping of settings"),
    (["compress", "--config", "{intkey_yaml}"], "is not a name"),
    (["compress", "--config", "{config_latin1_yaml}"], "not UTF-8 text"),
    (["compress", "--config", "{deep_yaml}"], "nested too deeply"),
    (["compress", "--max-accuracy-drop", "101"], "max_accuracy_drop: Input should be less than or equal to 100"),
    (["compress", "--candidates", "0"], "candidates: Input should be greater than or equal to 1"),
    (["compress", "--candidates", "17"], "candidates: Input should be less than or equal to 16"),
    (["compress", "--search-budget", "0"], "search_budget"),
    (["compress", "--max-latency-ms", "0"], "max_latency_ms: Input should be greater than 0"),
    (["compress", "--max-size-mb", "-3"], "max_size_mb"),
    (["compress", "--teacher-epochs", "0"], "teacher_epochs"),
    (["compress", "--threads", "0"], "threads"),
    (["compress", "--task", "rotten-tomatoes", "--data", "{ok_csv}"], "give either task or data"),
    (["compress", "--out", "{afile}"], "is a file; pass a directory for the run"),
    (["compress", "--model", "{missing}"], "is not a local directory"),
    (["compress", "--model", "{in}"], "no config.json"),
    (["compress", "-d", "raspberry-pi-4", "-d", "raspberry-pi-4"], "repeat a device"),
    (["compress", "--text-col", "a", "--text-col", "b", "--text-col", "c"], "text_col takes one column"),
    # search and select-device
    ([*SEARCH, "--device", "nope"], "device 'nope' is not in the catalog"),
    ([*SEARCH, "--proxy", "bad"], "--proxy bad"),
    ([*SEARCH, "--algorithm", "bad"], "--algorithm bad"),
    ([*SEARCH, "--budget", "0"], "budget 0"),
    ([*SEARCH, "--workers", "0"], "--workers 0"),
    ([*SEARCH, "--backend", "foo"], "--backend foo"),
    (["select-device", "-d", "nope", "--max-latency-ms", "1", "--min-accuracy", "0.5"], "not in the catalog"),
    # distill: its settings, then the plan file
    ([*DISTILL, "--schedule", "bad"], "schedule 'bad'"),
    ([*DISTILL, "--lr", "-1"], "learning rate -1.0"),
    ([*DISTILL, "--hidden-loss", "foo"], "hidden loss 'foo'"),
    ([*DISTILL, "--word-dropout", "0.7"], "word dropout 0.7"),
    ([*DISTILL, "--batch-size", "0"], "batch size 0"),
    ([*DISTILL, "--budget-minutes", "0"], "budget 0.0 minutes"),
    ([*DISTILL, "--max-steps", "0"], "max steps 0"),
    ([*DISTILL, "--epochs", "0"], "epochs=0.0"),
    ([*DISTILL, "--temperature", "0"], "temperature 0.0"),
    (DISTILL, "--plan {missing}.yaml: no such file"),
    (["distill", "--plan", "{bad_yaml}"], "not valid YAML/JSON"),
    (["distill", "--plan", "{list_yaml}"], "must be a mapping with 'layers'"),
    (["distill", "--plan", "{nokind_yaml}"], "unknown plan kind 'nope'"),
    # quantize
    (["quantize", "-m", "{tiny}", "-o", "q.bin"], "use a file name ending in .safetensors"),
    ([*QUANT, "--calibration-batches", "0"], "--calibration-batches 0"),
    ([*QUANT, "--weight-bits", "9"], "weight_bits=9"),
    ([*QUANT, "--act-bits", "1"], "act_bits=1"),
    ([*QUANT, "--spec", "{missing}.json"], "no such file"),
    ([*QUANT, "--spec", "{spec_json}"], "spec.json"),
    (["quantize", "-m", "{missing}", "-o", "q.safetensors"], "is not a local directory"),
    # prune
    (["prune", "-m", "{missing}", "-o", "pruned"], "is not a local directory"),
    (["prune", "-m", "{tiny}", "--heads", "1.5", "-o", "pruned"], "prune_heads must be a fraction"),
    (["prune", "-m", "{tiny}", "--ffn", "-0.1", "-o", "pruned"], "prune_ffn must be a fraction"),
    (["prune", "-m", "{tiny}", "--drop-layer", "99", "-o", "pruned"], "drop_layers [99]"),
    (["prune", "-m", "{tiny}", "--nm", "2:x", "-o", "pruned"], "--nm '2:x'"),
    (["prune", "-m", "{tiny}", "--nm", "5:4", "-o", "pruned"], "N:M sparsity needs integers"),
    # devices, profile, calibrate
    (["devices", "show", "nope"], "device 'nope' is not in the catalog"),
    (["devices", "show", "{notes_txt}"], "a device file must be a YAML mapping"),
    (["devices", "show", "{latin1_yaml}"], "latin1.yaml"),
    (["profile", "--model", "{missing}"], "is not a local directory"),
    (["profile", "--model", "{tiny}", "--backend", "foo"], "backend 'foo'"),
    (["profile", "--model", "{tiny}", "--batch", "0"], "batch and seq-len must be >= 1"),
    (["calibrate", "--clock", "foo"], "--clock must be wall or cpu"),
    (["calibrate", "--out", "{in}"], "is a directory; pass a file path ending in .json"),
]


def _id(case) -> str:
    args = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(args)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def check_one_line(err: str, message: str, after_work: bool = False) -> str:
    """The error is one line (the last one, when the command had started work and logged progress)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and (after_work or len(lines) == 1), err
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err
    return lines[-1]


def test_table_is_large_and_covers_every_command():
    assert len(BAD_INPUTS) >= 30
    commands = {_id(case).split()[0] for case in BAD_INPUTS}
    assert commands >= {"data", "finetune", "compress", "search", "select-device", "distill", "quantize", "prune",
                        "devices", "profile", "calibrate"}


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[_id(c) for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(args, message, inputs, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"  # relative outputs (pruned/, q.safetensors, runs/...) would land here
    work.mkdir()
    monkeypatch.chdir(work)
    args = [a.format(**inputs) for a in args]
    message = message.format(**inputs)
    before = set(tmp_path.rglob("*"))
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    check_one_line(err, message)
    assert set(tmp_path.rglob("*")) == before, "a failed command left files behind"


def test_infeasible_constraint_exits_3_naming_it_and_keeps_the_front(tmp_path, tiny_model_dir, sentiment_data,
                                                                      capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": sentiment_data.label_names[y]}) + "\n"
                            for t, y in zip(sentiment_data.texts, sentiment_data.labels, strict=True)))
    base = ["compress", "--model", str(tiny_model_dir), "--data", str(data), "-d", "raspberry-pi-4",
            "--search-budget", "12", "--teacher-epochs", "1"]
    # a modelled limit is checked on the front: the run names it and keeps the front it searched
    code, _, err = run_cli([*base, "--max-latency-ms", "1e-6", "--out", str(tmp_path / "run")], capsys)
    assert code == 3, err
    line = check_one_line(err, "no searched plan meets max_latency_ms", after_work=True)
    assert "relax max_latency_ms" in line
    front = json.loads((tmp_path / "run" / "search" / "raspberry-pi-4.json").read_text())["front"]
    assert front, "the front found before the constraint failed is kept"
    # a size limit is a hard limit of the search: no plan of the space meets it, so the search stops first
    code, _, err = run_cli([*base, "--max-size-mb", "1e-6", "--out", str(tmp_path / "small")], capsys)
    assert code == 3, err
    line = check_one_line(err, "no plan of the search space meets max_size_mb 1e-06: the smallest is",
                          after_work=True)
    assert "relax max_size_mb" in line
