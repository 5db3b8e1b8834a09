"""``fitformer search`` (joint hardware-aware search) and ``fitformer select-device``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import UserError
from .options import ModelOpt

ALGORITHMS = ("nsga2", "evolution", "random", "optuna_nsga2")


def _build(model: str, device: str, proxy: str, seq_len: int, batch: int, calib_examples: int):
    """(design space, cost, evaluator, shape) for one device."""
    from ..hardware import get_device
    from ..models import load_classifier
    from ..search.cost import AnalyticCost, device_limits
    from ..search.proxy import CombinedEvaluator, KDProxy, WeightErrorProxy
    from ..search.space import DesignSpace, EncoderShape, SpaceConfig

    spec = get_device(device)
    if proxy == "kd":
        from ..train import get_teacher

        teacher = get_teacher(model)
        net = teacher.model
        data = teacher.encoded("validation")
        batches = list(data.batches(32))[: max(1, calib_examples // 32)]
    elif proxy == "weights":
        net, _ = load_classifier(model, num_labels=2)
        batches = []
    else:
        raise UserError(f"--proxy {proxy}: use 'kd' (distillation loss, real) or 'weights' (weight error, fast)")
    shape = EncoderShape.from_config(net.config)
    h, heads, ffn = shape.hidden_size, shape.num_heads, shape.intermediate_size
    config = SpaceConfig(depths=tuple(range(max(1, shape.num_layers // 3), shape.num_layers + 1)),
                         hidden_sizes=tuple(sorted({h // 2, h})), heads=tuple(sorted({max(1, heads // 3), heads})),
                         ffn_sizes=tuple(sorted({ffn // 4, ffn // 2, ffn})))
    space = DesignSpace(shape, config, device_limits(spec))
    cost = AnalyticCost(spec, shape, (batch, seq_len))
    judge = KDProxy(net, shape, batches) if proxy == "kd" else WeightErrorProxy.from_model(net, shape)
    return space, cost, CombinedEvaluator(cost, judge), spec


def _run(space, cost, evaluator, algorithm: str, budget: int, seed: int, workers: int, backend: str,
         address: str | None, store_path: Path | None, max_latency_ms: float | None):
    from ..search import EvolutionConfig, Problem, RunStore, Session, evolution_front, nsga2, optuna_nsga2
    from ..search import random_search as random_search_fn
    from ..search.parallel import make_executor

    if algorithm not in ALGORITHMS:
        raise UserError(f"--algorithm {algorithm}: choose from {', '.join(ALGORITHMS)}")
    if budget < 1:
        raise UserError(f"budget {budget}: evaluate at least one candidate")
    problem = Problem(space, cost, evaluator, objectives=("proxy_loss", "latency_ms"),
                      limits={"size_bytes": cost.device.dram_bytes.value})
    executor = make_executor(evaluator, workers=workers, backend=backend, address=address)  # checks its options
    store = None
    try:
        store = RunStore(store_path) if store_path is not None else None
        if store is not None:
            store.check_meta({"algorithm": algorithm, "seed": seed, "device": cost.device.name,
                              "genes": len(space)})
        session = Session(problem, budget, store=store, executor=executor)
        if algorithm == "nsga2":
            return nsga2(session, seed=seed)
        if algorithm == "random":
            return random_search_fn(session, seed=seed)
        if algorithm == "optuna_nsga2":
            return optuna_nsga2(session, seed=seed)
        dense = cost(space.reference())["latency_ms"]
        bounds = [max_latency_ms] if max_latency_ms else [dense * f for f in (0.25, 0.5, 0.75)]
        return evolution_front(session, bounds, seed=seed, config=EvolutionConfig())
    finally:
        executor.close()
        if store is not None:
            store.close()


def register(app: typer.Typer) -> None:
    @app.command()
    def search(
        device: str = typer.Option("laptop-i7-1185g7", "--device", "-d", help="Catalog device name or YAML file."),
        model: str = ModelOpt,
        algorithm: str = typer.Option("nsga2", help="nsga2, evolution, random or optuna_nsga2."),
        budget: int = typer.Option(200, help="Candidates whose accuracy is estimated."),
        seed: int = typer.Option(0, help="Search seed (same seed, same result)."),
        proxy: str = typer.Option("kd", help="Accuracy proxy: kd (built and measured) or weights (fast)."),
        seq_len: int = typer.Option(128, help="Tokens per example for the cost model."),
        batch: int = typer.Option(1, help="Batch size for the cost model."),
        calib_examples: int = typer.Option(128, help="Calibration examples for the kd proxy."),
        max_latency_ms: float = typer.Option(None, help="Latency constraint (evolution)."),
        workers: int = typer.Option(1, help="Local worker processes evaluating candidates."),
        backend: str = typer.Option("local", help="local or ray."),
        address: str = typer.Option(None, help="Ray cluster address (with --backend ray)."),
        run_dir: Path = typer.Option(Path("runs/search"), "--run-dir", help="Run directory (SQLite store)."),
        as_json: bool = typer.Option(False, "--json", help="Print the Pareto front as JSON."),
    ) -> None:
        """Search architecture, tensorization, bits and sparsity jointly; print the Pareto front.

        Example: fitformer search --device raspberry-pi-4 --algorithm nsga2 --budget 300 --proxy weights
        """
        space, cost, evaluator, _ = _build(model, device, proxy, seq_len, batch, calib_examples)
        result = _run(space, cost, evaluator, algorithm, budget, seed, workers, backend, address,
                      run_dir / "search.sqlite", max_latency_ms)
        front = [{"key": c.key, **{k: c.metrics[k] for k in ("proxy_loss", "latency_ms", "size_bytes")
                                   if k in c.metrics}} for c in result.front]
        from ..io import write_json_atomic

        write_json_atomic(run_dir / "front.json", {"device": cost.device.name, "algorithm": algorithm,
                                                   "evaluated": len(result.history),
                                                   "front": [c.to_dict() for c in result.front]})
        if as_json:
            typer.echo(json.dumps(front, indent=2))
            return
        typer.echo(f"{len(result.history)} candidates ({result.evaluated_now} evaluated now); "
                   f"Pareto front of {len(front)} written to {run_dir / 'front.json'}")
        for row in front:
            typer.echo(f"  proxy_loss {row['proxy_loss']:.4f}  latency {row['latency_ms']:.3f} ms  "
                       f"size {row['size_bytes'] / 1e6:.2f} MB  {row['key'][:12]}")

    @app.command("select-device")
    def select_device_cmd(
        devices: list[str] = typer.Option(..., "--device", "-d", help="Catalog names or YAML files (repeat)."),
        max_latency_ms: float = typer.Option(..., help="Latency constraint in milliseconds."),
        min_accuracy: float = typer.Option(..., help="Accuracy constraint (calibration accuracy of the kd proxy)."),
        model: str = ModelOpt,
        algorithm: str = typer.Option("nsga2", help="Search per device."),
        budget: int = typer.Option(100, help="Candidates per device."),
        seed: int = typer.Option(0),
        seq_len: int = typer.Option(128),
        batch: int = typer.Option(1),
        calib_examples: int = typer.Option(128),
        workers: int = typer.Option(1),
        run_dir: Path = typer.Option(Path("runs/select"), "--run-dir"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Search each device and pick the cheapest one whose best candidate meets both constraints.

        Example: fitformer select-device -d raspberry-pi-4 -d nvidia-t4 --max-latency-ms 20 --min-accuracy 0.8
        """
        from ..errors import InfeasibleError
        from ..search.select import select_device

        built = {name: _build(model, name, "kd", seq_len, batch, calib_examples) for name in devices}

        def run(name: str):
            space, cost, evaluator, _ = built[name]
            return _run(space, cost, evaluator, algorithm, budget, seed, workers, "local", None,
                        run_dir / f"{Path(name).stem}.sqlite", None)

        selection = select_device([(n, built[n][3].relative_cost.value) for n in devices], run, max_latency_ms,
                                  min_accuracy)
        from ..io import write_json_atomic

        write_json_atomic(run_dir / "selection.json", selection.to_dict())
        if as_json:
            typer.echo(json.dumps(selection.to_dict(), indent=2))
        else:
            for o in selection.outcomes:
                m = o.best.metrics if o.best else {}
                typer.echo(f"{o.device:28s} cost {o.relative_cost:8.2f}  "
                           f"{'feasible' if o.feasible else 'infeasible'}  "
                           f"latency {m.get('latency_ms', float('nan')):.3f} ms  "
                           f"accuracy {m.get('accuracy', float('nan')):.3f}  {o.reason}")
        if selection.device is None:
            raise InfeasibleError(f"no device meets both constraints; binding: {selection.binding}")
        if not as_json:
            typer.echo(f"chosen device: {selection.device}")
