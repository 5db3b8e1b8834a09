"""End to end: ``fitformer compress`` on a tiny random model and tiny synthetic data, its rerun, bad configs."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import fitformer
from fitformer.cli import main
from fitformer.config import RunConfig, build_config, example_yaml
from fitformer.errors import UserError


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code)


def _write_csv(path, data) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for text, label in zip(data.texts, data.labels, strict=True):
            writer.writerow([text, data.label_names[label]])


@pytest.fixture(scope="module")
def run_args(tmp_path_factory, tiny_model_dir, sentiment_data):
    root = tmp_path_factory.mktemp("compress")
    _write_csv(root / "data.csv", sentiment_data)
    return ["compress", "--model", str(tiny_model_dir), "--data", str(root / "data.csv"),
            "--device", "laptop-i7-1185g7", "--device", "raspberry-pi-4", "--max-accuracy-drop", "100",
            "--budget-minutes", "0.2", "--search-budget", "40", "--candidates", "2", "--teacher-epochs", "1",
            "--out", str(root / "run")], root / "run"


@pytest.fixture(scope="module")
def finished_run(run_args):
    args, run = run_args
    assert _cli(args) == 0
    return run


def test_run_directory_report_and_summary(finished_run):
    run = finished_run
    manifest = json.loads((run / "manifest.json").read_text())
    for stage in ("teacher", "search-laptop-i7-1185g7", "search-raspberry-pi-4", "candidates", "evaluate",
                  "baseline-uniform", "export", "report"):
        assert stage in manifest["stages"], stage
    assert sum(s.startswith("distill-") for s in manifest["stages"]) == 2
    trained = sorted((run / "distill").iterdir())  # the candidates and the uniform baseline
    assert len(trained) == 3 and all(json.loads((t / "build.json").read_text())["seconds"] > 0 for t in trained)
    searches = [json.loads((run / "search" / f"{d}.json").read_text())
                for d in ("laptop-i7-1185g7", "raspberry-pi-4")]
    sensitivity = searches[0]["sensitivity"]  # measured once, shared by both devices' searches
    assert sensitivity == searches[1]["sensitivity"] and all(v >= 0 for v in sensitivity.values())
    assert any(n.endswith("word_embeddings") for n in sensitivity) and len(sensitivity) > 4
    summary = json.loads((run / "summary.json").read_text())
    chosen = summary["chosen"]
    assert summary["status"] == "chosen" and chosen["key"] in summary["candidates"]
    uniform = summary["baselines"]["uniform"]
    assert uniform["predicted_model_bytes"] <= chosen["predicted_model_bytes"]  # at the chosen size or below
    assert chosen["beats_uniform_baseline"] == (chosen["test_accuracy"] > uniform["test_accuracy"])
    for row in (summary["teacher"], chosen, summary["baselines"]["dynamic_int8"], uniform):
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["latency_ms_b1"] > 0 and row["latency_ms_b32"] > 0 and row["size_bytes"] > 0
        assert set(row["edp"]) == {"laptop-i7-1185g7", "raspberry-pi-4"}
    assert all(c["met"] for c in summary["constraints"])
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # one figure per device, inlined
    assert "http://" not in html and "https://" not in html  # readable offline
    assert chosen["key"][:12] in html and "per-layer decisions" in html


def test_export_loads_back_and_predicts(finished_run, sentiment_data):
    model = fitformer.load(finished_run)
    predictions = model.predict(["a fine film", sentiment_data.texts[0]])
    assert len(predictions) == 2 and set(predictions) <= set(sentiment_data.label_names)
    card = (finished_run / "MODEL_CARD.md").read_text()
    assert "fitformer.load" in card
    onnx = json.loads((finished_run / "summary.json").read_text())["export"]["onnx"]
    assert onnx.startswith("model.onnx") and (finished_run / "model.onnx").stat().st_size > 0 \
        or onnx.startswith("not exported")
    evaluation = json.loads((finished_run / "evaluate.json").read_text())
    chosen = json.loads((finished_run / "summary.json").read_text())["chosen"]["key"]
    if evaluation[chosen]["runtime"] == "onnxruntime-int8":  # measured as it ships: packed weights, int8 ONNX
        assert model.meta["weights"] == "packed" and "integer" in onnx


def test_rerun_skips_finished_stages(run_args, finished_run):
    args, run = run_args
    before = json.loads((run / "manifest.json").read_text())["stages"]
    assert _cli(args) == 0
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert {k: v["finished_at"] for k, v in after.items()} == {k: v["finished_at"] for k, v in before.items()}


def test_changed_settings_in_same_run_dir_are_refused(run_args, finished_run):
    args, _ = run_args
    assert _cli([*args, "--seed", "1"]) == 2


def test_a_setting_added_later_counts_in_the_identity_only_when_set():
    """Run directories made before these settings existed hold identities without them: they resume."""
    assert not {"distill_neighbour_swap", "distill_temperature", "distill_hidden_loss"} & set(RunConfig().identity())
    assert RunConfig(distill_neighbour_swap=0.5).identity()["distill_neighbour_swap"] == 0.5
    assert RunConfig(distill_hidden_loss="fisher").identity()["distill_hidden_loss"] == "fisher"
    assert RunConfig(distill_temperature=2.0).identity()["distill_temperature"] == 2.0
    # a run refit on Fisher rows before refit_fisher_weighs existed resumes as rows, not as the new default
    assert "refit_fisher_weighs" not in RunConfig(refit_fisher_weighs="rows").identity()
    assert RunConfig().identity()["refit_fisher_weighs"] == "directions"
    assert "refit_fisher_weighs" not in RunConfig(refit_fisher_examples=0).identity()  # nothing to steer
    # a run refit on the teacher's inputs before refit_inputs existed resumes as that, not as the new default
    assert "refit_inputs" not in RunConfig(refit_inputs="teacher").identity()
    assert RunConfig().identity()["refit_inputs"] == "student"


@pytest.mark.parametrize("bad", [["--device", "no-such-device"], ["--max-accuracy-drop", "-1"],
                                 ["--objective", "speed"], ["--data", "/no/such/file.csv"], ["--preset", "fast"],
                                 ["--budget-minutes", "0"]])
def test_bad_config_exits_2_before_work(tmp_path, bad):
    assert _cli(["compress", *bad, "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_config_file_and_example(tmp_path, capsys):
    assert _cli(["config", "example"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "run.yaml").write_text(text)
    assert build_config(file=tmp_path / "run.yaml") == RunConfig()
    assert example_yaml() == text
    (tmp_path / "bad.yaml").write_text("devices: [raspberry-pi-4]\nmax_size_mb: -3\n")
    with pytest.raises(UserError, match="max_size_mb"):
        build_config(file=tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("max_latency: 3\n")
    with pytest.raises(UserError, match="max_latency"):
        build_config(file=tmp_path / "typo.yaml")


def test_preset_then_file_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("candidates: 4\nsearch_budget: 77\ndevices: [raspberry-pi-4]\n")
    config = build_config("quick", tmp_path / "run.yaml", candidates=5, max_latency_ms=None)
    assert config.teacher_epochs == 1  # from the preset
    assert config.search_budget == 77 and config.devices == ["raspberry-pi-4"]  # the file beats the preset
    assert config.candidates == 5  # a flag beats the file; an unset flag (None) changes nothing


def test_python_api_with_dataset_and_infeasible_exit(tmp_path, tiny_model_dir, sentiment_data):
    from fitformer.errors import InfeasibleError

    # an impossible size limit: the search names it, with the smallest size the space reaches
    with pytest.raises(InfeasibleError, match=r"meets max_size_mb 1e-06: the smallest is [\d.]+ MB"):
        fitformer.compress(model=tiny_model_dir, data=sentiment_data, device="raspberry-pi-4",
                           constraints={"max_size_mb": 1e-6}, out=tmp_path / "run", search_budget=20,
                           teacher_epochs=1)


def test_choose_picks_lowest_objective_within_drop_and_names_closest_otherwise():
    from fitformer.pipeline import choose

    def row(acc, latency):
        return {"test_accuracy": acc, "modelled": {"raspberry-pi-4": {"latency_ms": latency}}}

    evaluation = {"teacher": row(0.90, 10.0), "baseline:dynamic_int8": row(0.90, 1.0),
                  "aaa": row(0.895, 5.0), "bbb": row(0.89, 3.0), "ccc": row(0.80, 1.0)}
    config = RunConfig(devices=["raspberry-pi-4"], max_accuracy_drop=1.0)
    assert choose(evaluation, config) == ("bbb", "feasible")  # ccc is faster but drops 10 points
    key, reason = choose(evaluation, RunConfig(devices=["raspberry-pi-4"], max_accuracy_drop=0.1))
    assert key is None and "aaa" in reason and "0.50 points" in reason  # baselines are never chosen


def test_summary_of_an_infeasible_run_says_why(tmp_path):
    from fitformer.pipeline import build_summary
    from fitformer.rundir import RunDir

    def row(acc):
        return {"runtime": "pytorch", "test_accuracy": acc, "latency_ms_b1": 1.0, "latency_ms_b32": 9.0,
                "size_bytes": 100, "model_bytes": 100, "predicted_ms_b1": 1.0, "predicted_ms_b32": 9.0,
                "modelled": {"raspberry-pi-4": {"edp_mjs": 1.0, "latency_ms": 1.0}}}

    config = RunConfig(devices=["raspberry-pi-4"], max_accuracy_drop=1.0)
    summary = build_summary(config, {"teacher": row(0.9), "aaa": row(0.8)}, None, RunDir(tmp_path / "run"))
    assert summary["status"] == "infeasible" and summary["chosen"] is None
    assert "aaa" in summary["reason"] and "10.00 points" in summary["reason"]


def test_ladder_walks_down_the_front_then_fills():
    from fitformer.pipeline import ladder

    rows = [{"key": k, "metrics": {"latency_ms": v}} for k, v in
            [("a", 10.0), ("b", 9.5), ("c", 8.0), ("d", 7.9), ("e", 6.0)]]
    assert [r["key"] for r in ladder(rows, "latency_ms", 3)] == ["a", "c", "e"]
    assert [r["key"] for r in ladder(rows, "latency_ms", 4)] == ["a", "c", "e", "b"]
    assert [r["key"] for r in ladder(rows[:1], "latency_ms", 3)] == ["a"]


def test_size_objective_searches_only_plans_within_the_gain(tmp_path, tiny_model_dir, sentiment_data):
    """With objective size, min_gain is a hard limit of the search: every evaluated plan can be picked, so the
    whole budget goes to the plans that compete (the cost model's size is the file's within 1%). At 16 tokens
    the shipped model keeps 16 of the 64 position rows, and loads back and predicts."""
    fitformer.compress(model=tiny_model_dir, data=sentiment_data, device="raspberry-pi-4", objective="size",
                       constraints={"max_accuracy_drop": 100}, out=tmp_path / "run", search_budget=20,
                       teacher_epochs=1, budget_minutes=0.1, max_length=16)
    found = json.loads((tmp_path / "run" / "search" / "raspberry-pi-4.json").read_text())
    limit = found["teacher"]["model_bytes"] / RunConfig().min_gain
    assert len(found["history"]) == 20 and all(h["model_bytes"] <= limit for h in found["history"])
    model = fitformer.load(tmp_path / "run")
    assert model.model.bert.embeddings.position_embeddings.num_embeddings == 16
    assert len(model.predict(["a fine film", "a dull film"])) == 2


def test_three_bit_plans_ship_packed_and_run_on_integer_kernels(tmp_path, tiny_model_dir, sentiment_data):
    """Widths below 4 bits are searched like the others: stored packed at their width, run in onnxruntime on
    int8 kernels, and loaded back."""
    fitformer.compress(model=tiny_model_dir, data=sentiment_data, device="laptop-i7-1185g7", objective="size",
                       constraints={"max_accuracy_drop": 100}, out=tmp_path / "run", search_budget=10, bits=[3],
                       formats=["dense", "tt"], teacher_epochs=1, budget_minutes=0.1, max_length=16, candidates=1)
    candidates = json.loads((tmp_path / "run" / "candidates.json").read_text())
    assert {x["bits"] for c in candidates for x in c["spec"]["layers"]} == {3}
    evaluation = json.loads((tmp_path / "run" / "evaluate.json").read_text())
    assert evaluation[candidates[0]["key"]]["runtime"] == "onnxruntime-int8"
    model = fitformer.load(tmp_path / "run")
    assert model.meta["weights"] == "packed" and len(model.predict(["a fine film"])) == 1


def test_quick_preset_ships_an_int8_model_with_packed_weights(run_args, tmp_path):
    """The demo's preset: every searched layer and the word embedding in int8, measured in onnxruntime on
    integer kernels, exported with packed weights that load back."""
    args, _ = run_args
    args = [a if not a.endswith("run") else str(tmp_path / "quick") for a in args] + ["--preset", "quick"]
    assert _cli(args) == 0
    evaluation = json.loads((tmp_path / "quick" / "evaluate.json").read_text())
    candidates = json.loads((tmp_path / "quick" / "candidates.json").read_text())
    assert all(x["bits"] == 8 and x["format"] == "dense" for c in candidates for x in c["spec"]["layers"])
    assert all(c["spec"]["embedding"]["bits"] == 8 for c in candidates)
    assert {evaluation[c["key"]]["runtime"] for c in candidates} == {"onnxruntime-int8"}
    model = fitformer.load(tmp_path / "quick")
    assert model.meta["weights"] == "packed" and len(model.predict(["a fine film"])) == 1


def test_split_quant_builds_the_same_model_in_two_steps():
    """Refit runs between the two halves: float factorized layers first, their quant steps after."""
    from transformers import BertForSequenceClassification

    from fitformer.compress import CompressionPlan, apply_plan
    from fitformer.compress.quant import QuantPlan
    from fitformer.compress.tt import TTPlan
    from fitformer.models import tiny_bert_config
    from fitformer.pipeline import _split_quant

    model = BertForSequenceClassification(tiny_bert_config()).eval()
    name = "bert.encoder.layer.0.intermediate.dense"
    plan = CompressionPlan(layers={name: [TTPlan(max_rank=4, num_cores=2), QuantPlan(4, 8)],
                                   "bert.encoder.layer.0.output.dense": [QuantPlan(8, 8)]})
    factorize, quantize = _split_quant(plan)
    assert all(not isinstance(s, QuantPlan) for c in factorize.layers.values() for s in c)
    assert set(quantize.layers) == set(plan.layers)
    one, two = apply_plan(model, plan), apply_plan(apply_plan(model, factorize), quantize)
    assert type(one.get_submodule(name)) is type(two.get_submodule(name))
    assert {k: v.shape for k, v in one.state_dict().items()} == {k: v.shape for k, v in two.state_dict().items()}


def test_embedding_refit_is_steered_by_the_teachers_fisher_information(finished_run, tmp_path):
    """The refit measures a TT word embedding's rows in the teacher's Fisher metric ('directions', the default)
    and/or weighs every row the training text uses by its count times its Fisher information per occurrence,
    every other row by nothing ('rows'); with refit_fisher_examples 0 neither."""
    from fitformer.pipeline import Pipeline

    config = json.loads((finished_run / "manifest.json").read_text())["config"]
    pipeline = Pipeline(RunConfig(**{**config, "refit_fisher_examples": 64, "refit_fisher_weighs": "both"},
                                  out=tmp_path))
    vocab, hidden = pipeline.teacher.model.config.vocab_size, pipeline.teacher.model.config.hidden_size
    counts = pipeline.teacher.encoded("train").token_counts(vocab)
    fit = pipeline._embedding_fit(counts)
    weights, metric = fit["row_weights"], fit["embedding_metric"]
    assert weights.shape == counts.shape and bool(((weights > 0) == (counts > 0)).all())
    assert not weights.equal(counts.double())
    assert metric.shape == (hidden, hidden) and torch.allclose(metric, metric.T)
    pipeline.config = pipeline.config.model_copy(update={"refit_fisher_weighs": "directions"})
    assert set(pipeline._embedding_fit(counts)) == {"embedding_metric"}
    assert RunConfig(**config, out=tmp_path).refit_fisher_weighs == "directions"  # the default
    off = RunConfig(**{**config, "refit_fisher_examples": 0}, out=tmp_path / "off")
    assert Pipeline(off)._embedding_fit(counts) == {}


def test_deployed_models_of_a_finished_run_run_as_they_ship(finished_run):
    """What the headline benchmark re-times side by side: the teacher, each candidate and the uniform
    baseline, as an onnxruntime session when quantized, else the PyTorch model with its trained weights."""

    from fitformer.export.onnx_quant import ort_logits
    from fitformer.hardware.timing import random_token_inputs
    from fitformer.pipeline import Pipeline, forward_call

    manifest = json.loads((finished_run / "manifest.json").read_text())
    pipeline = Pipeline(RunConfig(**manifest["config"], out=finished_run))
    evaluation = json.loads((finished_run / "evaluate.json").read_text())
    keys = ["teacher", "uniform", *(k for k in evaluation if not k.startswith(("baseline:", "teacher")))]
    inputs = random_token_inputs(2, 16, pipeline.teacher.model.config.vocab_size)
    for key in keys:
        model, session = pipeline.deployed(key)
        assert (model is None) != (session is None), key
        forward_call(model, session, inputs)()
        if session is not None:
            assert evaluation.get(key, {}).get("runtime", "onnxruntime-int8") == "onnxruntime-int8"
            logits = torch.from_numpy(ort_logits(session, inputs))
        else:
            with torch.no_grad():
                logits = model(**inputs).logits
        assert logits.shape == (2, len(pipeline.teacher.label_names)) and torch.isfinite(logits).all()
    # the uniform baseline differs from the chosen model only in its encoder: same word embedding
    chosen = json.loads((finished_run / "summary.json").read_text())["chosen"]["key"]
    spec = next(c["spec"] for c in json.loads((finished_run / "candidates.json").read_text()) if c["key"] == chosen)
    uniform = pipeline.run.result("baseline-uniform")
    assert uniform["spec"]["embedding"] == spec["embedding"]
    assert {x["format"] for x in uniform["spec"]["layers"]} == {"tt"} and len({x["rank"] for x in
                                                                              uniform["spec"]["layers"]}) == 1
