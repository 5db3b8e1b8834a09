"""Search: Pareto utilities, the design space's encoding, algorithms, run store and resumption, parallel
evaluation and device selection, on a small space with an analytic synthetic objective."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitformer.errors import UserError
from fitformer.search import (
    DesignSpace,
    DeviceLimits,
    EncoderShape,
    EvolutionConfig,
    NSGA2Config,
    Problem,
    RunStore,
    Session,
    SpaceConfig,
    crowding_distance,
    dominates,
    evolution_front,
    hypervolume,
    non_dominated_sort,
    nsga2,
    optuna_nsga2,
    random_search,
)
from fitformer.search.parallel import make_executor
from fitformer.search.random_search import exhaustive
from fitformer.search.select import select_device

HERE = Path(__file__).resolve().parent
SHAPE = EncoderShape(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=128)


def small_space(**overrides) -> DesignSpace:
    config = dict(depths=(1, 2), heads=(2, 4), ffn_sizes=(32, 64), ranks=(2, 4, 8), tt_cores=2, max_tt_shapes=2,
                  bits=(32, 8, 4), sparsities=(0.0, 0.5), embedding=False)
    config.update(overrides)
    return DesignSpace(SHAPE, SpaceConfig(**config))


def synthetic_cost(spec, speed: float = 1.0) -> dict[str, float]:
    """Latency from stored weight bits plus per-layer overhead; a device runs ``speed`` times faster."""
    work = sum(x.params * max(x.bits, 8) / 32 + 50 * (2 if x.format == "tt" else 1) for x in spec.layers)
    return {"latency_ms": work / 1000 / speed, "size_bytes": float(spec.weight_bytes())}


def synthetic_loss(spec) -> float:
    """A loss that grows with compression: fewer parameters, fewer bits and more zeros cost accuracy."""
    loss = 0.05 * (2 - spec.arch.num_layers)
    for x in spec.layers:
        dense = x.in_features * x.out_features
        loss += 0.3 * (1 - min(1.0, x.params / dense)) ** 2 + {32: 0.0, 8: 0.01, 4: 0.08}[x.bits]
        loss += 0.1 * x.sparsity ** 2
    return loss


def synthetic_metrics(spec, speed: float = 1.0) -> dict[str, float]:
    loss = synthetic_loss(spec)
    return {**synthetic_cost(spec, speed), "proxy_loss": loss, "accuracy": 0.9 - 0.1 * loss}


def problem(space: DesignSpace | None = None, evaluate=synthetic_metrics, **kw) -> Problem:
    return Problem(space or small_space(), synthetic_cost, evaluate, **kw)


# ------------------------------------------------------------------------------------------------ pareto
points_2d = st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.floats(0, 10, allow_nan=False)),
                     min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(points_2d)
def test_fronts_partition_and_order(points):
    fronts = non_dominated_sort(points)
    assert sorted(i for f in fronts for i in f) == list(range(len(points)))
    rank = {i: r for r, f in enumerate(fronts) for i in f}
    for i in range(len(points)):
        for j in range(len(points)):
            if dominates(points[i], points[j]):
                assert rank[i] < rank[j]
    for f in fronts:  # members of one front never dominate each other
        assert not any(dominates(points[i], points[j]) for i in f for j in f)


@settings(max_examples=60, deadline=None)
@given(points_2d, st.tuples(st.floats(0, 10), st.floats(0, 10)))
def test_hypervolume_matches_optuna_and_grows(points, extra):
    optuna_hv = pytest.importorskip("optuna._hypervolume").compute_hypervolume
    ref = np.array([11.0, 11.0])
    arr = np.array(points)
    assert hypervolume(arr, ref) == pytest.approx(optuna_hv(arr, ref), rel=1e-9, abs=1e-9)
    assert hypervolume(np.vstack([arr, extra]), ref) >= hypervolume(arr, ref) - 1e-12


def test_hypervolume_hand_example_and_3d():
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [4, 4]) == pytest.approx(6.0)
    assert hypervolume([[5, 5]], [4, 4]) == 0.0
    assert hypervolume([[1, 1, 1]], [2, 3, 4]) == pytest.approx(6.0)


def test_crowding_distance_boundaries_infinite():
    d = crowding_distance([[0, 4], [1, 2], [2, 1], [4, 0]])
    assert np.isinf(d[0]) and np.isinf(d[3]) and np.all(np.isfinite(d[1:3]))


# ------------------------------------------------------------------------------------------------ space
@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_every_gene_decodes_valid_and_variation_keeps_it_valid(seed):
    space = DesignSpace(EncoderShape(6, 384, 12, 1536, 30522),
                        SpaceConfig(depths=(2, 4, 6), hidden_sizes=(192, 384), heads=(4, 8, 12),
                                    ffn_sizes=(384, 768, 1536)))
    rng = np.random.default_rng(seed)
    a, b = space.sample(rng), space.sample(rng)
    for g in (a, space.mutate(a, rng, 0.3), space.crossover(a, b, rng)):
        assert space.canonical(g) == g  # canonical is idempotent
        assert all(0 <= x < c for x, c in zip(g, space.cardinalities, strict=True))
        spec = space.decode(g)
        assert len(spec.layers) == 6 * spec.arch.num_layers
        for x in spec.all_layers():
            if x.format == "tt":
                assert math.prod(x.in_modes) >= x.in_features and math.prod(x.out_modes) >= x.out_features
                assert x.rank >= 1
            if x.format != "dense":
                assert x.sparsity == 0.0
            assert x.params > 0
        assert type(spec).from_dict(spec.to_dict()) == spec
        assert space.decode(g).key() == spec.key()


def test_largest_is_the_dense_model_and_inactive_genes_do_not_matter():
    space = small_space()
    spec = space.decode(space.largest())
    assert spec.arch.num_layers == 2 and all(x.format == "dense" and x.bits == 32 for x in spec.layers)
    assert spec.weight_bytes() == 4 * sum(x.in_features * x.out_features for x in spec.layers)
    g = list(space.largest())
    g[0] = space.depths.index(1)
    changed = list(g)
    changed[5] = 1 - changed[5]  # layer 1's FFN width: inactive at depth 1
    assert space.decode(g).key() == space.decode(changed).key()


def test_device_limits_restrict_choices_and_bad_config_is_user_error():
    space = DesignSpace(SHAPE, SpaceConfig(bits=(32, 8, 4)), DeviceLimits(bits=(32, 8), sparsities=(0.0,)))
    assert space.bits == (32, 8) and space.sparsities == (0.0,)
    with pytest.raises(UserError):
        DesignSpace(SHAPE, SpaceConfig(bits=(4,)), DeviceLimits(bits=(32,)))
    with pytest.raises(UserError):
        SpaceConfig(formats=("cp",)).validate()
    with pytest.raises(UserError):
        DesignSpace(SHAPE, SpaceConfig(depths=(3,)))


# ------------------------------------------------------------------------------------------------ algorithms
ALGORITHMS = {
    "random": lambda s, seed: random_search(s, seed=seed, batch_size=8),
    "nsga2": lambda s, seed: nsga2(s, seed=seed, config=NSGA2Config(population=8)),
    "evolution": lambda s, seed: evolution_front(s, [1.5, 3.0, None], seed=seed,
                                                 config=EvolutionConfig(population=8, parents=3, mutations=3,
                                                                        crossovers=3)),
    "optuna_nsga2": lambda s, seed: optuna_nsga2(s, seed=seed, population=8),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithms_are_deterministic_within_budget_and_never_repeat(name):
    if name == "optuna_nsga2":
        pytest.importorskip("optuna")
    runs = []
    for _ in range(2):
        result = ALGORITHMS[name](Session(problem(), budget=40), 3)
        keys = [c.key for c in result.history]
        assert len(keys) == len(set(keys)) == result.evaluated_now <= 40
        assert len(keys) >= 30
        runs.append(keys)
    assert runs[0] == runs[1]
    other = [c.key for c in ALGORITHMS[name](Session(problem(), budget=40), 4).history]
    assert other != runs[0]


def test_evolution_respects_its_latency_constraint():
    session = Session(problem(), budget=30)
    from fitformer.search import evolution

    evolution(session, max_latency=1.5, seed=0, config=EvolutionConfig(population=6, parents=2, mutations=3,
                                                                       crossovers=3))
    assert session.history and all(c.metrics["latency_ms"] <= 1.5 for c in session.history)


def test_hard_limits_reject_candidates_before_evaluation():
    seen = []

    def evaluate(spec):
        seen.append(spec)
        return synthetic_metrics(spec)

    limit = 0.4 * synthetic_cost(small_space().decode(small_space().largest()))["size_bytes"]
    result = nsga2(Session(problem(evaluate=evaluate, limits={"size_bytes": limit}), budget=30), seed=1,
                   config=NSGA2Config(population=8))
    assert seen and all(synthetic_cost(s)["size_bytes"] <= limit for s in seen)
    assert len(result.history) == len(seen)


def test_front_is_non_dominated_subset():
    result = nsga2(Session(problem(), budget=40), seed=0, config=NSGA2Config(population=8))
    front = result.front
    pts = [c.objectives(result.objectives) for c in result.history]
    for c in front:
        assert not any(dominates(p, c.objectives(result.objectives)) for p in pts)


# ------------------------------------------------------------------------------------------------ store, resume
def test_store_serves_repeats_and_checks_settings(tmp_path):
    calls = []

    def evaluate(spec):
        calls.append(spec.key())
        return synthetic_metrics(spec)

    with RunStore(tmp_path / "run.sqlite") as store:
        store.check_meta({"seed": 0})
        first = random_search(Session(problem(evaluate=evaluate), 20, store=store), seed=0, batch_size=8)
    with RunStore(tmp_path / "run.sqlite") as store:
        again = random_search(Session(problem(evaluate=evaluate), 20, store=store), seed=0, batch_size=8)
        assert len(store) == 20
        with pytest.raises(UserError):
            store.check_meta({"seed": 1})
    assert len(calls) == 20 and again.evaluated_now == 0
    assert [c.key for c in again.history] == [c.key for c in first.history]
    assert [c.metrics for c in again.history] == [c.metrics for c in first.history]


def logged_evaluate(log: str, delay: float):
    """An evaluation that takes ``delay`` seconds and logs each completed candidate (a kill mid-way through
    one loses it, and the resumed run must redo it)."""
    def evaluate(spec):
        time.sleep(delay)
        with open(log, "a") as handle:
            handle.write(spec.key() + "\n")
        return synthetic_metrics(spec)
    return evaluate


def run_logged_search(store_path: str, log: str, delay: float = 0.0) -> list[str]:
    """The search the resume test kills (also run in a child process)."""
    with RunStore(store_path) as store:
        result = nsga2(Session(problem(evaluate=logged_evaluate(log, delay)), 60, store=store), seed=5,
                       config=NSGA2Config(population=10))
    return [c.key for c in result.history]


def test_killed_search_resumes_without_evaluating_anything_twice(tmp_path):
    store, log = tmp_path / "run.sqlite", tmp_path / "calls.log"
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_search as t; "
            f"t.run_logged_search({str(store)!r}, {str(log)!r}, 0.05)")
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(HERE)})
    deadline = time.time() + 300  # generous: the child imports torch, slow on a loaded machine
    while time.time() < deadline and child.poll() is None:
        if store.exists() and len(RunStore(store)) >= 15:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with RunStore(store) as killed:
        stored_before = {row["key"] for row in killed.rows()}
    assert 15 <= len(stored_before) < 60
    calls_before = log.read_text().split()
    resumed = run_logged_search(str(store), str(log))
    calls = log.read_text().split()
    calls_after = calls[len(calls_before):]
    assert not stored_before & set(calls_after)  # nothing committed before the kill is evaluated again
    # every candidate evaluated; the only repeat allowed is the one killed between its evaluation and its commit
    assert len(set(calls)) == 60 and len(calls) - 60 <= 1
    assert resumed == run_logged_search(str(tmp_path / "fresh.sqlite"), str(tmp_path / "fresh.log"))


# ------------------------------------------------------------------------------------------------ parallel
def test_worker_processes_give_the_serial_result():
    serial = nsga2(Session(problem(), 40), seed=2, config=NSGA2Config(population=8))
    executor = make_executor(synthetic_metrics, workers=2)
    try:
        parallel = nsga2(Session(problem(), 40, executor=executor), seed=2, config=NSGA2Config(population=8))
    finally:
        executor.close()
    assert [(c.key, c.metrics) for c in parallel.history] == [(c.key, c.metrics) for c in serial.history]


def test_ray_backend_gives_the_serial_result():
    ray = pytest.importorskip("ray")
    serial = random_search(Session(problem(), 16), seed=2, batch_size=8)
    # a local instance whose workers can import this test module (the evaluator lives here)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}})
    executor = make_executor(synthetic_metrics, workers=2, backend="ray")
    try:
        parallel = random_search(Session(problem(), 16, executor=executor), seed=2, batch_size=8)
    finally:
        ray.shutdown()
    assert [(c.key, c.metrics) for c in parallel.history] == [(c.key, c.metrics) for c in serial.history]


def test_bad_backend_and_workers_are_user_errors():
    with pytest.raises(UserError):
        make_executor(synthetic_metrics, backend="slurm")
    with pytest.raises(UserError):
        make_executor(synthetic_metrics, workers=0)


# ------------------------------------------------------------------------------------------------ device selection
# name -> (relative cost, speed): the cheap devices are slow
DEVICES = {"slow": (1.0, 0.5), "medium": (3.0, 1.0), "fast": (10.0, 4.0)}


def tiny_space() -> DesignSpace:
    """256 genes: heads, FFN width and the bits of six linears of a one-layer model."""
    return small_space(depths=(1,), formats=("dense",), ranks=(2,), max_tt_shapes=1, bits=(32, 8),
                       sparsities=(0.0,))


def brute_force(max_latency: float, min_accuracy: float) -> str | None:
    space = tiny_space()
    specs = {}
    for genes in np.ndindex(*space.cardinalities):
        spec = space.decode(genes)
        specs[spec.key()] = spec
    ok = []
    for name, (cost, speed) in DEVICES.items():
        metrics = [synthetic_metrics(s, speed) for s in specs.values()]
        if any(m["latency_ms"] <= max_latency and m["accuracy"] >= min_accuracy for m in metrics):
            ok.append((cost, name))
    return min(ok)[1] if ok else None


def exhaustive_search(name: str):
    speed = DEVICES[name][1]
    prob = Problem(tiny_space(), lambda s: synthetic_cost(s, speed), lambda s: synthetic_metrics(s, speed))
    return exhaustive(Session(prob, budget=10**6))


# slow, medium, fast, nothing (accuracy binds), nothing (latency binds)
@pytest.mark.parametrize("max_latency,min_accuracy",
                         [(3.0, 0.889), (3.0, 0.892), (2.0, 0.895), (2.0, 0.898), (0.3, 0.85)])
def test_select_device_matches_brute_force(max_latency, min_accuracy):
    selection = select_device([(n, c) for n, (c, _) in DEVICES.items()], exhaustive_search, max_latency,
                              min_accuracy)
    assert selection.device == brute_force(max_latency, min_accuracy)
    assert len(selection.outcomes) == 3
    for o in selection.outcomes:
        assert o.feasible == (o.reason == "")
    if selection.device is None:
        assert selection.binding in ("latency", "accuracy", "both")
        assert all(o.best is not None and o.reason for o in selection.outcomes)



# ------------------------------------------------------------------------------------------------ select-device
# A small catalog of real device files: cheap and slow, mid-priced, expensive and fast.
CATALOG = ("raspberry-pi-4", "laptop-i7-1185g7", "nvidia-a100-sxm4-80gb")
FULL_BYTES = 4 * 2 * (4 * 32 * 32 + 2 * 32 * 64)  # the dense two-layer model's searched weights


def catalog_space(device) -> DesignSpace:
    """20 dense float candidates: depth 1 or 2, heads and FFN width per layer."""
    from fitformer.search.cost import device_limits

    return DesignSpace(SHAPE, SpaceConfig(depths=(1, 2), heads=(2, 4), ffn_sizes=(32, 64), formats=("dense",),
                                          ranks=(2,), max_tt_shapes=1, bits=(32,), sparsities=(0.0,),
                                          embedding=False), device_limits(device))


def kept_accuracy(spec) -> dict[str, float]:
    """A stand-in accuracy that grows with the weights a candidate keeps."""
    return {"accuracy": 0.6 + 0.3 * math.sqrt(spec.weight_bytes() / FULL_BYTES)}


def catalog_build(model, device, proxy, seq_len, batch, calib_examples):
    """What ``fitformer.commands.search._build`` returns, with the analytic cost of the real device file and
    the stand-in accuracy (so the command runs without a fine-tuned teacher)."""
    from fitformer.hardware import get_device
    from fitformer.search.cost import AnalyticCost
    from fitformer.search.proxy import CombinedEvaluator

    spec = get_device(device)
    cost = AnalyticCost(spec, SHAPE, (batch, seq_len))
    return catalog_space(spec), cost, CombinedEvaluator(cost, kept_accuracy), spec


def catalog_brute_force(paths: list[str], max_latency: float, min_accuracy: float) -> str | None:
    """The cheapest device with any candidate meeting both constraints, by enumerating every gene."""
    ok = []
    for path in paths:
        space, cost, evaluate, spec = catalog_build("tiny", path, "kd", 16, 1, 0)
        specs = {s.key(): s for s in (space.decode(g) for g in np.ndindex(*space.cardinalities))}
        metrics = [evaluate(s) for s in specs.values()]
        if any(m["latency_ms"] <= max_latency and m["accuracy"] >= min_accuracy for m in metrics):
            ok.append((spec.relative_cost.value, path))
    return min(ok)[1] if ok else None


def test_select_device_command_matches_brute_force_on_a_small_catalog(tmp_path, monkeypatch, capsys):
    import shutil

    from fitformer.cli import main
    from fitformer.hardware.spec import CATALOG_DIR

    paths = [str(shutil.copy(CATALOG_DIR / f"{name}.yaml", tmp_path / f"{name}.yaml")) for name in CATALOG]
    monkeypatch.setattr("fitformer.commands.search._build", catalog_build)
    # constraints from the devices' own fronts: for a middle accuracy, each device's fastest latency
    accuracy = 0.6 + 0.3 * math.sqrt(0.5)
    fastest = []
    for path in paths:
        space, cost, evaluate, _ = catalog_build("tiny", path, "kd", 16, 1, 0)
        lats = [evaluate(s)["latency_ms"] for s in (space.decode(g) for g in np.ndindex(*space.cardinalities))
                if kept_accuracy(s)["accuracy"] >= accuracy]
        fastest.append(min(lats))
    pi, laptop, a100 = fastest
    assert pi > laptop > a100  # the price tiers are also speed tiers, so each case below picks another device
    cases = [(pi * 1.01, accuracy), ((pi + laptop) / 2, accuracy), ((laptop + a100) / 2, accuracy),
             (a100 / 2, accuracy), (pi * 10, 0.95)]
    answers = []
    for i, (max_latency, min_accuracy) in enumerate(cases):
        expected = catalog_brute_force(paths, max_latency, min_accuracy)
        answers.append(expected)
        with pytest.raises(SystemExit) as exit_info:
            main(["select-device", *[x for p in paths for x in ("-d", p)], "--max-latency-ms", str(max_latency),
                  "--min-accuracy", str(min_accuracy), "--algorithm", "random", "--budget", "40", "--seq-len", "16",
                  "--run-dir", str(tmp_path / f"run{i}"), "--json"])
        out = capsys.readouterr().out
        selection = json.loads(out[out.index("{"):])
        assert selection["device"] == expected
        assert exit_info.value.code == (0 if expected else 3)
        assert [d["evaluated"] for d in selection["devices"]] == [20, 20, 20]  # every candidate, each once
        if expected is None:
            assert selection["binding"] in ("latency", "accuracy")
            assert all(d["reason"].startswith(selection["binding"]) for d in selection["devices"])
    assert answers == [*paths, None, None]  # the cases cover every device and both ways of failing


def test_nsga2_starts_from_the_given_genes():
    """Seeded genes (e.g. the whole model in int8) are evaluated first, before random ones."""
    from fitformer.hardware import get_device
    from fitformer.search import DesignSpace, EncoderShape, NSGA2Config, Problem, Session, SpaceConfig, nsga2
    from fitformer.search.cost import AnalyticCost, device_limits

    shape = EncoderShape(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=100)
    device = get_device("laptop-i7-1185g7")
    space = DesignSpace(shape, SpaceConfig(depths=(1, 2), formats=("dense",), bits=(32, 8), embedding=False),
                        device_limits(device))
    cost = AnalyticCost(device, shape, (1, 16))
    problem = Problem(space, cost, lambda spec: {"proxy_loss": 0.0, **cost(spec)},
                      objectives=("proxy_loss", "latency_ms"))
    start = space.full_model(8)
    result = nsga2(Session(problem, 10), seed=0, config=NSGA2Config(population=4), start=[start])
    first = result.history[0]
    assert first.genes == start
    assert all(x.bits == 8 for x in space.decode(first.genes).layers)
    assert space.decode(first.genes).arch.num_layers == 2


def test_reference_is_the_float_model_whatever_is_searched():
    """Gains are measured against the uncompressed model even when only int8 is searched."""
    from fitformer.hardware import get_device
    from fitformer.search import DesignSpace, EncoderShape, SpaceConfig
    from fitformer.search.cost import device_limits

    shape = EncoderShape(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=100)
    space = DesignSpace(shape, SpaceConfig(depths=(1, 2), formats=("dense",), bits=(8,), embedding=True),
                        device_limits(get_device("laptop-i7-1185g7")))
    ref = space.reference()
    assert all(x.bits == 32 and x.format == "dense" for x in ref.all_layers())
    assert ref.arch.num_layers == 2 and ref.weight_bytes() == 4 * space.decode(space.largest()).weight_bytes()


def test_side_weights_follow_a_quantized_word_embedding():
    """Position/token-type tables and the pooler are stored at 8 bits once the word embedding is quantized:
    counted in the size, and built by the plan (else a 50x size target is out of reach)."""
    from dataclasses import replace

    from transformers import BertForSequenceClassification

    from fitformer.compress import apply_plan
    from fitformer.compress.quant import is_quantized
    from fitformer.hardware import get_device
    from fitformer.layers.quant import QuantEmbedding, QuantLinear
    from fitformer.models import tiny_bert_config
    from fitformer.search.cost import device_limits, spec_to_plan

    config = tiny_bert_config()
    shape = EncoderShape.from_config(config)
    h = config.hidden_size
    assert shape.side_params == (config.max_position_embeddings + config.type_vocab_size) * h + h * h
    limits = device_limits(get_device("laptop-i7-1185g7"))
    assert 4 in limits.bits  # 4-bit codes run widened on the laptop's int8 kernels
    space = DesignSpace(shape, SpaceConfig(formats=("dense",), bits=(32, 8), embedding=True), limits)
    dense = space.decode(space.largest())
    int8 = space.decode(space.full_model(8))
    assert dense.side_bits == 32 and int8.side_bits == 8
    assert dense.weight_bytes() - int8.weight_bytes() == sum(
        x.params * 3 for x in dense.all_layers()) + shape.side_params * 3
    float_embedding = replace(int8, embedding=replace(int8.embedding, bits=32))
    assert replace(int8, embedding=replace(int8.embedding, bits=4)).side_bits == 4  # they follow it, down to 4
    assert replace(int8, embedding=replace(int8.embedding, bits=2)).side_bits == 4
    assert float_embedding.side_bits == 32 and type(int8).from_dict(int8.to_dict()) == int8
    model = apply_plan(BertForSequenceClassification(config).eval(), spec_to_plan(int8, shape))
    assert is_quantized(model)
    assert isinstance(model.bert.embeddings.position_embeddings, QuantEmbedding)
    assert isinstance(model.bert.embeddings.token_type_embeddings, QuantEmbedding)
    assert isinstance(model.bert.pooler.dense, QuantLinear)
    assert "position_embeddings" not in str(spec_to_plan(float_embedding, shape).to_dict())


def test_badly_factoring_dimensions_are_padded_balanced():
    from fitformer.search.space import default_tt_shapes

    vocab = default_tt_shapes(30522, 384, 3, 4)
    assert vocab[0] == ((30, 32, 32), (6, 8, 8))  # 30522 = 2 x 3 x 5087 pads to 30720 (0.6%)
    assert all(30522 <= math.prod(i) <= 30522 * 1.1 and math.prod(o) == 384 for i, o in vocab)
    assert default_tt_shapes(384, 1536, 3, 4)[0] == ((6, 8, 8), (6, 16, 16))  # factors well: not padded
    assert all(97 < math.prod(i) <= 106 for i, _ in default_tt_shapes(97, 64, 3, 4))  # prime: padded


def test_most_compressed_is_the_full_architecture_at_its_fewest_bytes():
    space = DesignSpace(SHAPE, SpaceConfig(ranks=(4, 8), bits=(32, 8, 4), sparsities=(0.0,)))
    small = space.decode(space.most_compressed())
    assert small.arch == space.decode(space.largest()).arch and all(x.bits == 4 for x in small.all_layers())
    rng = np.random.default_rng(0)
    others = [space.decode(space.sample(rng)) for _ in range(50)]
    full_arch = [o for o in others if o.arch == small.arch]
    assert all(small.weight_bytes() <= o.weight_bytes() for o in full_arch)


def test_uniform_models_cover_every_factorised_format_shape_and_rank_at_full_depth():
    """One start per (format, shape, rank): the full architecture, every searched weight alike at the lowest
    bit width, all distinct, spread over sizes (the search starts near any size limit)."""
    space = DesignSpace(SHAPE, SpaceConfig(ranks=(4, 8), bits=(32, 4), sparsities=(0.0,), max_tt_shapes=2))
    starts = space.uniform_models()
    specs = [space.decode(g) for g in starts]
    assert len(set(starts)) == len(starts) == 2 * (1 + 2 + 2)  # ranks x (low rank + balanced + factor shapes)
    full = space.decode(space.largest()).arch
    for spec in specs:
        sites = spec.all_layers()
        assert spec.arch == full and len({(x.format, x.bits) for x in sites}) == 1
        assert {x.format for x in sites} <= {"lowrank", "tt"} and sites[0].bits == (32 if sites[0].format ==
                                                                                 "lowrank" else 4)
    assert {(x.layers[0].format, x.layers[0].rank) for x in specs} >= {("lowrank", 4), ("lowrank", 8)}
    sizes = sorted(s.weight_bytes() for s in specs)
    assert sizes[-1] > 3 * sizes[0]
    dense_only = DesignSpace(SHAPE, SpaceConfig(formats=("dense",), bits=(32, 8), sparsities=(0.0,)))
    assert dense_only.uniform_models() == []


def _every_site(space: DesignSpace, genes: tuple[int, ...], fmt: str, shape: int, bits: int) -> tuple[int, ...]:
    """``genes`` with every searched weight in format ``fmt``, TT shape index ``shape`` and ``bits``."""
    g = list(genes)
    for k in range(len(space._site_names)):
        base = space._arch_len + 5 * k
        g[base], g[base + 2], g[base + 3] = space.formats.index(fmt), shape, space.bits.index(bits)
    return space.canonical(g)


def test_factor_shapes_offer_quantized_low_rank_and_the_fewest_flop_shape():
    """Beside the balanced shapes every layer may take the lopsided fewest-FLOP shape and the 2-core low rank,
    as (quantizable) TT layers; ``factor_shapes=False`` leaves the balanced ones only."""
    from fitformer.layers import choose_tensorization

    space = DesignSpace(SHAPE, SpaceConfig(ranks=(4,), bits=(32, 4), sparsities=(0.0,), max_tt_shapes=2))
    low = space.decode(_every_site(space, space.largest(), "tt", 3, 4))
    flop = space.decode(_every_site(space, space.largest(), "tt", 2, 4))
    for x, y in zip(low.all_layers(), flop.all_layers(), strict=True):
        assert (x.in_modes, x.out_modes) == ((x.in_features, 1), (1, x.out_features))
        assert x.params == 4 * (x.in_features + x.out_features) and x.bits == 4
        cheapest = choose_tensorization(y.in_features, y.out_features, 32, (3,), 128)
        assert (y.in_modes, y.out_modes) == (cheapest.in_modes, cheapest.out_modes)
    plain = DesignSpace(SHAPE, SpaceConfig(ranks=(4,), bits=(32, 4), sparsities=(0.0,), max_tt_shapes=2,
                                           factor_shapes=False))
    assert plain.cardinalities.sum() < space.cardinalities.sum()
    assert all(len(x.in_modes) == 3 for x in plain.decode(_every_site(plain, plain.largest(), "tt", 1, 4)).layers)


@pytest.mark.parametrize("seed", range(8))
def test_predicted_file_bytes_match_the_saved_file(tmp_path, seed):
    """What the search calls a candidate's size is the file ``export`` writes: the same tensors, and bytes
    within 1% (biases, norms, step sizes, zero points and the safetensors index included; a quantized file's
    codes and fp16 vectors in two blobs; the classifier as ``rest``)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_model
    from transformers import BertForSequenceClassification

    from fitformer.compress import apply_plan
    from fitformer.compress.quant import freeze, is_quantized
    from fitformer.export.quantized import save_quantized
    from fitformer.models import tiny_bert_config
    from fitformer.search.cost import spec_to_plan

    torch.manual_seed(seed)
    config = tiny_bert_config()
    shape = EncoderShape.from_config(config, max_length=40)  # candidates drop position rows 40..63
    assert shape.candidate_side_params == shape.side_params - 24 * config.hidden_size
    space = DesignSpace(shape, SpaceConfig(ranks=(2, 4, 8), bits=(32, 8, 4), sparsities=(0.0,)))
    genes = [space.largest(), space.full_model(8), space.most_compressed()] + [
        space.sample(np.random.default_rng(s)) for s in range(3)] + [  # 4-bit low rank; the fewest-FLOP shape
        _every_site(space, space.largest(), "tt", space.config.max_tt_shapes + k, 4) for k in (1, 0)]
    spec = space.decode(genes[seed])
    teacher = BertForSequenceClassification(config).eval()
    rest = space.reference().rest_bytes(sum(p.numel() for p in teacher.parameters()))
    student = apply_plan(teacher, spec_to_plan(spec, shape))
    assert student.bert.embeddings.position_embeddings.num_embeddings == 40
    assert space.reference().side_params == shape.side_params  # gains are measured against the whole teacher
    path = tmp_path / "model.safetensors"
    if is_quantized(student):
        with torch.no_grad():
            student(input_ids=torch.randint(0, config.vocab_size, (2, 8)))  # initialise activation quantizers
        save_quantized(freeze(student), path)
    else:
        save_model(student, str(path))
    with safe_open(str(path), framework="pt") as handle:
        saved = set(handle.keys())  # noqa: SIM118 (not a dict)
        dtypes = {k: handle.get_tensor(k).dtype for k in saved}
    assert dtypes["bert.embeddings.LayerNorm.bias"] == torch.float32
    for x in spec.layers:  # a float layer's bias by name in fp32, a quantized one's in the fp16 blob
        assert dtypes.get(f"{x.name}.bias") == (None if x.bits < 32 else torch.float32)
    assert dtypes.get("__vectors__", torch.float16) == torch.float16
    names, _ = spec.stored_tensors()
    assert set(names) == saved and len(names) == len(saved)
    assert spec.file_bytes() + rest == pytest.approx(path.stat().st_size, rel=0.01)


@given(st.integers(1, 400), st.integers(1, 200))
def test_largest_rank_within_is_the_last_rank_that_fits(limit, high):
    from types import SimpleNamespace

    from fitformer.search.space import largest_rank_within

    def build(rank):  # a plan whose file grows with its rank, as every plan's does
        return SimpleNamespace(file_bytes=lambda: 3 * rank + 10)

    rank = largest_rank_within(build, limit, high)
    assert 1 <= rank <= high
    if build(rank).file_bytes() <= limit:
        assert rank == high or build(rank + 1).file_bytes() > limit
    else:
        assert rank == 1
