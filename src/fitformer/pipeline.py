"""``fitformer compress`` end to end: teacher -> search -> candidates -> distil -> evaluate -> export -> report.

Every stage runs through :class:`~fitformer.rundir.RunDir`, so its result and the checksums of its files are
in ``RUN/manifest.json`` and a rerun of the same configuration skips it. The teacher is loaded only when a
stage that needs it runs, so rerunning a finished run is instant.

Semantics (see ``docs/compress.md``): the search is NSGA-II on each target device over (weight-error proxy,
objective) with the analytic cost model; latency and size constraints must hold on every target device
(modelled); the accuracy constraint is measured on the test split after distillation; the chosen model is the
feasible candidate with the lowest objective on the first (primary) device.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import RunConfig
from .errors import InfeasibleError
from .io import read_json, write_json_atomic, write_text_atomic
from .rundir import RunDir

if TYPE_CHECKING:
    from .compress import EmbeddingFisher

Log = Callable[[str], None]
BASELINE = "baseline:"  # evaluation rows of baselines (compared, never chosen)
MOMENT_EXAMPLES = 256  # training examples whose tokens give each layer's input moments (the proxy's output error)
ALLOCATED_STARTS = 8  # per-layer allocated plans (search.allocate) in the search's first population
REFIT_SHARE = 1 / 3  # most of a candidate's training time its refit may take; distillation gets the rest


def is_candidate(key: str) -> bool:
    return key != "teacher" and not key.startswith(BASELINE)


def _device_slug(device: str) -> str:
    return Path(device).stem


def _plan_for(spec_dict: dict[str, Any], shape):
    from .search.cost import spec_to_plan
    from .search.space import CandidateSpec

    return spec_to_plan(CandidateSpec.from_dict(spec_dict), shape)


@dataclass
class CompressResult:
    """What a compress run produced: the run directory, its summary, the chosen model and the fronts."""

    run_dir: Path
    summary: dict[str, Any]
    fronts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def chosen(self) -> dict[str, Any] | None:
        return self.summary.get("chosen")

    def load(self):
        """The exported model, ready to ``predict``."""
        from .export import load

        return load(self.run_dir)


class Pipeline:
    """One run of ``fitformer compress`` in its run directory."""

    def __init__(self, config: RunConfig, log: Log | None = None, dataset: Any = None) -> None:
        self.config = config
        self.log = log or (lambda message: None)
        identity = config.identity()
        if dataset is not None:  # in-memory data (Python API): its content decides the run's identity
            identity["data"] = f"dataset:{dataset.content_hash()}"
        self.run = RunDir(config.out, config=identity)
        self._teacher = None
        self._dataset = dataset
        self._weight_proxy = None
        self._encoder_shape = None
        self._fisher: EmbeddingFisher | None = None

    # ------------------------------------------------------------------ shared pieces
    @property
    def teacher(self):
        if self._teacher is None:
            from .data import load_task
            from .train import FinetuneConfig, get_teacher

            c = self.config
            data = self._dataset if self._dataset is not None else load_task(
                task=c.task, data=c.data, text_cols=c.text_col, label_col=c.label_col)
            self._teacher = get_teacher(c.model, data=data, config=FinetuneConfig(
                epochs=c.teacher_epochs, max_length=c.max_length, seed=c.seed))
        return self._teacher

    @property
    def shape(self):
        """The teacher as the search sees it (``EncoderShape``), candidates run at ``max_length`` tokens."""
        from .search.space import EncoderShape

        if self._encoder_shape is None:
            self._encoder_shape = EncoderShape.from_config(self.teacher.model.config,
                                                           max_length=self.config.max_length)
        return self._encoder_shape

    def _primary_search(self) -> dict[str, Any]:
        """The search result on the first (primary) device: its teacher row, front and rest bytes."""
        return read_json(self.run.file(f"search/{_device_slug(self.config.devices[0])}.json"))

    def _stage(self, name: str, fn: Callable[[RunDir], tuple[Any, list[str]]]) -> Any:
        done = self.run.is_done(name)
        result = self.run.stage(name, fn)
        self.log(f"{name}: {'done earlier, skipped' if done else 'finished'}")
        return result

    # ------------------------------------------------------------------ the run
    def execute(self) -> CompressResult:
        c = self.config
        self._stage("teacher", self._teacher_stage)
        for device in c.devices:
            self._stage(f"search-{_device_slug(device)}", lambda run, d=device: self._search_stage(run, d))
        candidates = self._stage("candidates", self._candidates_stage)
        for i, cand in enumerate(candidates["candidates"]):
            self._stage(f"distill-{cand['key'][:12]}", lambda run, x=cand, k=i: self._distill_stage(run, x, k))
        evaluation = self._stage("evaluate", self._evaluate_stage)
        chosen, reason = choose(evaluation, c)
        if chosen is None:
            self._stage("report", lambda run: self._report_stage(run, evaluation, None))
            raise InfeasibleError(f"{reason}; report: {self.run.file('report.html')}")
        uniform = self.uniform_baseline(chosen)
        evaluation = {**evaluation, f"{BASELINE}uniform": uniform}
        self._stage("export", lambda run: self._export_stage(run, chosen))
        summary = self._stage("report", lambda run: self._report_stage(run, evaluation, chosen))
        fronts = {d: read_json(self.run.file(f"search/{_device_slug(d)}.json"))["front"] for d in c.devices}
        return CompressResult(self.run.path, summary, fronts)

    def uniform_baseline(self, key: str) -> dict[str, Any]:
        """The uniform heuristic baseline at the size of candidate ``key`` (a stage: kept in the run)."""
        return self._stage("baseline-uniform", lambda run: self._uniform_stage(run, key))

    # ------------------------------------------------------------------ stages
    def _teacher_stage(self, run: RunDir) -> tuple[Any, list[str]]:
        t = self.teacher
        test = t.evaluate("test")
        return {"model_dir": str(t.model_dir), "validation_accuracy": t.result.validation_accuracy,
                "test_accuracy": test.accuracy, "label_names": t.label_names}, []

    def _search_stage(self, run: RunDir, device: str) -> tuple[Any, list[str]]:
        from .hardware import get_device
        from .search import DesignSpace, NSGA2Config, Problem, RunStore, Session, SpaceConfig, nsga2
        from .search.allocate import allocate
        from .search.cost import AnalyticCost, device_limits
        from .search.proxy import CombinedEvaluator

        c = self.config
        spec = get_device(device)
        shape = self.shape
        h, heads, ffn = shape.hidden_size, shape.num_heads, shape.intermediate_size
        space_config = SpaceConfig(depths=tuple(range(max(1, shape.num_layers // 2), shape.num_layers + 1)),
                                   hidden_sizes=(h,), heads=tuple(sorted({max(1, heads // 2), heads})),
                                   ffn_sizes=tuple(sorted({ffn // 4, ffn // 2, ffn})), embedding=c.embedding,
                                   formats=tuple(c.formats), ranks=tuple(c.ranks), bits=tuple(c.bits),
                                   sparsities=tuple(c.sparsities))
        space = DesignSpace(shape, space_config, device_limits(spec))
        cost = AnalyticCost(spec, shape, (c.latency_batch, c.seq_len))
        teacher_spec = space.reference()
        rest = teacher_spec.rest_bytes(sum(p.numel() for p in self.teacher.model.parameters()))
        smallest = cost(space.decode(space.most_compressed()))["size_bytes"]
        limits = {"size_bytes": min(spec.dram_bytes.value,
                                    self._size_limit(teacher_spec.file_bytes() + rest, rest, smallest))}
        proxy = self._proxy()
        evaluator = CombinedEvaluator(cost, proxy)
        problem = Problem(space, cost, evaluator, objectives=("proxy_loss", c.objective_metric), limits=limits)
        slug = _device_slug(device)
        run.file("search").mkdir(exist_ok=True)
        with RunStore(run.file(f"search/{slug}.sqlite")) as store:
            store.check_meta({"device": spec.name, "genes": len(space), "seed": c.seed, "proxy": "output-error",
                              "starts": "allocated"})
            self.log(f"allocating formats, ranks and bits per layer on {device}")
            allocated = allocate(space, evaluator, space.largest(), c.objective_metric,
                                 limits.get(c.objective_metric), points=ALLOCATED_STARTS)
            result = nsga2(Session(problem, c.search_budget, store=store), seed=c.seed,
                           config=NSGA2Config(population=c.population),
                           start=allocated + [space.full_model(b) for b in space.bits if b < 32]
                           + [space.most_compressed()] + space.uniform_models())
        on_front = {x.key for x in result.front}
        history = [{**x.to_dict(), "front": x.key in on_front,
                    "model_bytes": x.metrics["size_bytes"] + rest} for x in result.history]
        out = {"device": device, "objectives": list(problem.objectives), "rest_bytes": rest,
               "sensitivity": proxy.sensitivity,
               "teacher": {**cost(teacher_spec), "proxy_loss": 0.0, "model_bytes": teacher_spec.file_bytes() + rest,
                           "spec": teacher_spec.to_dict()},
               "history": history, "front": [h for h in history if h["front"]]}
        write_json_atomic(run.file(f"search/{slug}.json"), out)
        return {"device": device, "evaluated": len(history), "front": len(out["front"])}, [f"search/{slug}.json"]

    def _size_limit(self, teacher_bytes: float, rest: float, smallest: float) -> float:
        """The most bytes (searched weights, as the cost model's ``size_bytes``) a candidate may have: the size
        constraints are hard limits of the search, since the cost model predicts the file within 1%, so the
        whole search budget goes to plans that can be picked (at 50x on MiniLM only a few of 150 unconstrained
        plans were). Raises InfeasibleError when even the smallest plan of the space is over it."""
        c, limit, binding, value = self.config, float("inf"), "", 0.0
        if c.objective_metric == "size_bytes":
            limit, binding, value = teacher_bytes / c.min_gain - rest, "min_gain", c.min_gain
        if c.max_size_mb is not None and c.max_size_mb * 1e6 - rest < limit:
            limit, binding, value = c.max_size_mb * 1e6 - rest, "max_size_mb", c.max_size_mb
        if smallest > limit:
            raise InfeasibleError(f"no plan of the search space meets {binding} {value:g}: the smallest is "
                                  f"{(smallest + rest) / 1e6:.3g} MB, the limit "
                                  f"{(limit + rest) / 1e6:.3g} MB; relax {binding} or search lower ranks and bit "
                                  "widths (--ranks, --bits)")
        return limit

    def _proxy(self):
        """The search's weight-error proxy: token-count weighted embedding, layers weighted by their sensitivity
        on the first ``sensitivity_examples`` training rows. Built once per run, so every device's search
        weighs the layers alike and shares the proxy's cache."""
        from .search.proxy import WeightErrorProxy

        if self._weight_proxy is None:
            train = self.teacher.encoded("train")
            n = min(self.config.sensitivity_examples, len(train))
            if n:
                self.log(f"measuring each layer's sensitivity on {n} training examples")
            moments = train.select(range(min(MOMENT_EXAMPLES, len(train)))).batches(32)
            self._weight_proxy = WeightErrorProxy.from_model(
                self.teacher.model, self.shape, train.token_counts(self.teacher.model.config.vocab_size),
                batches=list(train.select(range(n)).batches(32)) if n else None, seed=self.config.seed,
                moment_batches=list(moments))
        return self._weight_proxy

    def _modelled(self, spec_dict: dict[str, Any]) -> dict[str, dict[str, float]]:
        """Modelled cost of a candidate on every target device (cheap)."""
        from .hardware import get_device
        from .search.cost import AnalyticCost
        from .search.space import CandidateSpec

        c, shape, spec = self.config, self.shape, CandidateSpec.from_dict(spec_dict)
        return {d: AnalyticCost(get_device(d), shape, (c.latency_batch, c.seq_len))(spec) for d in c.devices}

    def _violations(self, modelled: dict[str, dict[str, float]], rest: float) -> dict[str, float]:
        """Constraint name -> worst ratio of value to limit over the devices (> 1 means broken)."""
        c, out = self.config, {}
        if c.max_latency_ms is not None:
            out["max_latency_ms"] = max(m["latency_ms"] for m in modelled.values()) / c.max_latency_ms
        if c.max_size_mb is not None:
            size = next(iter(modelled.values()))["size_bytes"] + rest
            out["max_size_mb"] = size / (c.max_size_mb * 1e6)
        return out

    def _candidates_stage(self, run: RunDir) -> tuple[Any, list[str]]:
        c = self.config
        metric = c.objective_metric
        per_device: list[list[dict[str, Any]]] = []
        closest: tuple[float, str, dict[str, float]] | None = None
        for device in c.devices:
            found = read_json(run.file(f"search/{_device_slug(device)}.json"))
            rest = found["rest_bytes"]
            whole = metric == "size_bytes"  # a size gain counts the whole model (biases, norms too), as on disk
            limit = (found["teacher"]["model_bytes"] if whole else found["teacher"][metric]) / c.min_gain
            ok = []
            for x in sorted(found["front"], key=lambda x: x["metrics"]["proxy_loss"]):
                modelled = self._modelled(x["spec"])
                violations = self._violations(modelled, rest)
                violations["min_gain"] = (x["model_bytes"] if whole else x["metrics"][metric]) / limit
                worst = max(violations.values())
                if worst <= 1.0:
                    ok.append({"key": x["key"], "device": device, "spec": x["spec"], "metrics": x["metrics"],
                               "model_bytes": x["model_bytes"], "modelled": modelled})
                elif closest is None or worst < closest[0]:
                    closest = (worst, device, violations)
            per_device.append(ladder(ok, metric, c.candidates))
        picked: list[dict[str, Any]] = []
        for row in _interleave(per_device):
            if row["key"] not in {p["key"] for p in picked} and len(picked) < c.candidates:
                picked.append(row)
        if not picked:
            worst, device, violations = closest or (float("inf"), c.devices[0], {})
            binding = max(violations, key=violations.get) if violations else "search"
            raise InfeasibleError(f"no searched plan meets {binding} (the closest, on {device}, is at "
                                  f"{worst:.2f}x the limit); relax {binding} or raise --search-budget; "
                                  f"the fronts are in {run.file('search')}")
        for p in picked:
            p["plan"] = _plan_for(p["spec"], self.shape).to_dict()
        write_json_atomic(run.file("candidates.json"), picked)
        return {"candidates": [{k: p[k] for k in ("key", "device")} for p in picked]}, ["candidates.json"]

    def _candidate(self, key: str) -> dict[str, Any]:
        return next(p for p in read_json(self.run.file("candidates.json")) if p["key"] == key)

    def _student(self, cand: dict[str, Any], weights: Path | None,
                 refit_seconds: float | None = None) -> torch.nn.Module:
        from safetensors.torch import load_file

        from .compress import CompressionPlan, apply_plan, refit_factorized
        from .layers import TTEmbedding

        plan = CompressionPlan.from_dict(cand["plan"])
        if weights is not None or not self.config.refit_steps:
            student = apply_plan(self.teacher.model, plan)
            if weights is not None:
                student.load_state_dict(load_file(str(weights)))
            return student.eval()
        # refit the factorized layers in float, then quantize them: a fake-quantized TT chain refits ~60x
        # slower, and its activation scales are not calibrated yet
        factorize, quantize = _split_quant(plan)
        student = apply_plan(self.teacher.model, factorize)
        train = self.teacher.encoded("train")
        calibration = train.select(range(min(256, len(train)))).batches(32)
        counts = train.token_counts(self.teacher.model.config.vocab_size)
        has_tt_embedding = any(isinstance(m, TTEmbedding) for m in student.modules())
        report = refit_factorized(student, self.teacher.model, calibration, steps=self.config.refit_steps,
                                  token_counts=counts, inputs=self.config.refit_inputs, seed=self.config.seed,
                                  max_seconds=refit_seconds,
                                  **(self._embedding_fit(counts) if has_tt_embedding else {}))
        if report.after:
            self.log(report.summary())
        if quantize.layers:
            student = apply_plan(student, quantize)
        return student.eval()

    def _embedding_fit(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """How the refit weighs a TT word embedding's rows and measures their error: the teacher's Fisher
        information on ``refit_fisher_examples`` seeded training rows (computed once a run), as row weights
        and/or a direction metric (``refit_fisher_weighs``); empty (rows by counts, plain metric) when that is 0."""
        from .compress import embedding_fisher

        n = self.config.refit_fisher_examples
        if not n:
            return {}
        if self._fisher is None:
            started = time.perf_counter()
            train = self.teacher.encoded("train")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.config.seed))
            self._fisher = embedding_fisher(self.teacher.model, train.select(order[:n]).batches(32))
            self.log(f"Fisher information of the word embedding on {min(n, len(train))} training "
                     f"examples in {time.perf_counter() - started:.0f} s")
        weighs = self.config.refit_fisher_weighs
        fit = {}
        if weighs in ("rows", "both"):
            fit["row_weights"] = self._fisher.row_weights(counts)
        if weighs in ("directions", "both"):
            fit["embedding_metric"] = self._fisher.metric()
        return fit

    def _distill_stage(self, run: RunDir, cand: dict[str, Any], index: int) -> tuple[Any, list[str]]:
        out = f"distill/{cand['key'][:12]}"
        result = self._train(self._candidate(cand["key"]), out)
        return {"key": cand["key"], **{k: v for k, v in result.to_dict().items() if k != "history"}}, \
            [f"{out}/best/model.safetensors"]

    def _train(self, cand: dict[str, Any], out: str):
        """Build, refit and distil one candidate's student into ``RUN/out`` within its share of the budget: the
        refit may use up to ``REFIT_SHARE`` of it and distillation gets what the first build left (its time is
        kept in ``RUN/out/build.json``, so a resumed distillation sees the budget it started with)."""
        from .train import DistillConfig, DistillData, distill

        c = self.config
        share = c.budget_minutes / len(read_json(self.run.file("candidates.json")))  # those picked, not asked
        started = time.perf_counter()
        student = self._student(cand, None, refit_seconds=60 * REFIT_SHARE * share)
        build = self.run.file(out) / "build.json"
        if not build.exists():
            build.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(build, {"seconds": time.perf_counter() - started})
        build_minutes = min(read_json(build)["seconds"] / 60, REFIT_SHARE * share)
        data = DistillData.from_teacher(self.teacher, max_train_examples=c.distill_max_train_examples, seed=c.seed)
        config = DistillConfig(schedule=c.distill_schedule, budget_minutes=share - build_minutes,
                               epochs=c.distill_epochs, batch_size=c.distill_batch_size,
                               learning_rate=c.distill_learning_rate, word_dropout=c.distill_word_dropout,
                               neighbour_swap=c.distill_neighbour_swap, temperature=c.distill_temperature,
                               ema_decay=c.distill_ema_decay, hidden_loss=c.distill_hidden_loss,
                               seed=c.seed)
        return distill(student, self.teacher.model, data, config, self.run.file(out))

    def _uniform_stage(self, run: RunDir, key: str) -> tuple[Any, list[str]]:
        """Baseline (HEAT's heuristic): every encoder linear as a 3-core TT-matrix with one rank and one bit
        width (the width that holds most of the chosen model's linear weights), at the largest rank not above
        the chosen model's predicted file bytes, with the chosen model's word embedding (so the two differ
        only in how the encoder is compressed), trained with the same budget as one candidate."""
        from collections import Counter
        from dataclasses import replace

        from .search.space import CandidateSpec, default_tt_shapes, largest_rank_within

        shape = self.shape
        first = self._primary_search()
        dense = CandidateSpec.from_dict(first["teacher"]["spec"])
        chosen = CandidateSpec.from_dict(self._candidate(key)["spec"])
        target = chosen.file_bytes()
        held = Counter()
        for x in chosen.layers:
            held[x.bits] += x.params
        bits = held.most_common(1)[0][0]

        def uniform(rank: int) -> CandidateSpec:
            layers = []
            for x in dense.layers:
                in_modes, out_modes = default_tt_shapes(x.in_features, x.out_features, 3, 1)[0]
                layers.append(replace(x, format="tt", rank=rank, in_modes=in_modes, out_modes=out_modes, bits=bits))
            return replace(dense, layers=tuple(layers), embedding=chosen.embedding, side_params=chosen.side_params)

        low = largest_rank_within(uniform, target, max(shape.hidden_size, shape.intermediate_size))
        spec = uniform(low).to_dict()
        cand = {"key": "uniform", "spec": spec, "plan": _plan_for(spec, shape).to_dict()}
        self._train(cand, "distill/uniform")
        student = self._student(cand, run.file("distill/uniform/best/model.safetensors"))
        deployed = self._deploy(student, cand, run.file("baselines/uniform"))
        row = {**deployed, "model_bytes": CandidateSpec.from_dict(spec).file_bytes() + first["rest_bytes"],
               "rank": low, "bits": bits, "spec": spec, **self._predicted_host(spec), "modelled": self._modelled(spec)}
        return row, ["baselines/uniform/model.safetensors", "distill/uniform/best/model.safetensors"]

    def _measure(self, model: torch.nn.Module, session: Any = None) -> dict[str, float]:
        """Host latency (ms) at batch 1 and 32 of ``max_length`` tokens (fewer if the model has fewer
        positions): median of wall-clock calls (robust to a busy neighbour), of ``session`` (onnxruntime) if
        given, else of ``model``."""
        from .hardware.timing import measure, random_token_inputs

        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        vocab = int(model.config.vocab_size)
        tokens = min(c.max_length, int(getattr(model.config, "max_position_embeddings", c.max_length)))
        out = {}
        for batch in (1, 32):
            call = forward_call(model, session, random_token_inputs(batch, tokens, vocab))
            repeats = c.latency_repeats if batch == 1 else max(5, c.latency_repeats // 2)
            out[f"latency_ms_b{batch}"] = measure(call, warmup=2, repeats=repeats, max_seconds=30).median_ms
        return out

    def deployed(self, key: str) -> tuple[torch.nn.Module | None, Any]:
        """A model of this finished run as it ships, to time it beside others: ``(model, session)``, the
        onnxruntime session of a quantized model (model None) or the PyTorch model of a float one (session
        None). ``key``: "teacher", "uniform" (the baseline) or a candidate's key."""
        from .export.onnx_quant import ort_session

        if key == "teacher":
            return self.teacher.model.eval(), None
        if key == "uniform":
            spec, out, weights = self.run.result("baseline-uniform")["spec"], "baselines/uniform", "distill/uniform"
            cand = {"key": key, "spec": spec, "plan": _plan_for(spec, self.shape).to_dict()}
        else:
            cand, short = self._candidate(key), key[:12]
            out, weights = f"candidates/{short}", f"distill/{short}"
        onnx_path = self.run.file(f"{out}.onnx")
        if onnx_path.exists():
            return None, ort_session(onnx_path, self.config.threads or torch.get_num_threads())
        return self._student(cand, self.run.file(f"{weights}/best/model.safetensors")), None

    def _deploy(self, student: torch.nn.Module, cand: dict[str, Any], out: Path) -> dict[str, Any]:
        """Save a model as it ships and measure it as it runs. A quantized model is frozen, saved with packed
        integer weights and run in onnxruntime on integer kernels (its accuracy is the onnxruntime model's);
        a float model runs in PyTorch. ``size_bytes`` is the weights file on disk."""
        from .compress.quant import freeze, is_quantized
        from .export.model import WEIGHTS_FILE

        t = self.teacher
        if not is_quantized(student):
            accuracy = t.evaluate("test", model=student).accuracy
            saved = self._save(student, cand, out, accuracy)
            return {"runtime": "pytorch", "test_accuracy": accuracy,
                    "size_bytes": (saved / WEIGHTS_FILE).stat().st_size, **self._measure(student)}
        from .export.onnx_quant import export_quantized_onnx, ort_predict, ort_session

        frozen = freeze(student)
        onnx_path = out.with_suffix(".onnx")
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        export_quantized_onnx(frozen, onnx_path, "integer")
        session = ort_session(onnx_path, self.config.threads or torch.get_num_threads())
        test = t.encoded("test")
        predictions = ort_predict(session, test).argmax(dim=-1)
        accuracy = float((predictions == test.labels).float().mean())
        saved = self._save(frozen, cand, out, accuracy)
        return {"runtime": "onnxruntime-int8", "test_accuracy": accuracy,
                "size_bytes": (saved / WEIGHTS_FILE).stat().st_size, "onnx_bytes": onnx_path.stat().st_size,
                **self._measure(frozen, session)}

    def _predicted_host(self, spec_dict: dict[str, Any]) -> dict[str, float]:
        """Modelled latency on the primary device at the measured shapes (predicted against measured)."""
        from .hardware import get_device
        from .search.cost import AnalyticCost
        from .search.space import CandidateSpec

        c, shape, spec = self.config, self.shape, CandidateSpec.from_dict(spec_dict)
        device = get_device(c.devices[0])
        return {f"predicted_ms_b{b}": AnalyticCost(device, shape, (b, c.max_length))(spec)["latency_ms"]
                for b in (1, 32)}

    def evaluate_teacher(self) -> dict[str, Any]:
        """The dense teacher as an evaluation row: test accuracy, host latency, file size, modelled cost."""
        t = self.teacher
        first = self._primary_search()
        teacher_spec = first["teacher"]["spec"]
        return {"runtime": "pytorch", "test_accuracy": t.evaluate("test").accuracy,
                "size_bytes": (t.model_dir / "model.safetensors").stat().st_size,
                "model_bytes": first["teacher"]["model_bytes"], **self._measure(t.model),
                **self._predicted_host(teacher_spec), "modelled": self._modelled(teacher_spec)}

    def _evaluate_stage(self, run: RunDir) -> tuple[Any, list[str]]:
        first = self._primary_search()
        teacher_spec = first["teacher"]["spec"]
        rows = {"teacher": self.evaluate_teacher()}
        rows[f"{BASELINE}dynamic_int8"] = self._dynamic_int8(run, teacher_spec, first["rest_bytes"])
        files = ["baselines/dynamic_int8.pt"]
        for cand in read_json(run.file("candidates.json")):
            short = cand["key"][:12]
            student = self._student(cand, run.file(f"distill/{short}/best/model.safetensors"))
            deployed = self._deploy(student, cand, run.file(f"candidates/{short}"))
            files.append(f"candidates/{short}/model.safetensors")
            rows[cand["key"]] = {**deployed, "model_bytes": cand["model_bytes"], "device": cand["device"],
                                 **self._predicted_host(cand["spec"]), "modelled": cand["modelled"]}
        write_json_atomic(run.file("evaluate.json"), rows)
        return rows, ["evaluate.json", *files]

    def _dynamic_int8(self, run: RunDir, teacher_spec: dict[str, Any], rest: float) -> dict[str, Any]:
        """Baseline: PyTorch dynamic int8 quantization of every Linear of the teacher, no training."""
        from dataclasses import replace

        from .search.space import CandidateSpec

        with warnings.catch_warnings():  # torch.ao is deprecated upstream but still the standard peer
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(self.teacher.model), {torch.nn.Linear},
                                                           dtype=torch.qint8)
        path = run.file("baselines/dynamic_int8.pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        spec = CandidateSpec.from_dict(teacher_spec)
        spec = replace(spec, layers=tuple(replace(x, bits=8) for x in spec.layers)).to_dict()
        return {"runtime": "pytorch", "test_accuracy": self.teacher.evaluate("test", model=model).accuracy,
                "size_bytes": path.stat().st_size, "model_bytes": CandidateSpec.from_dict(spec).file_bytes() + rest,
                **self._measure(model), **self._predicted_host(spec), "modelled": self._modelled(spec)}

    def _save(self, student: torch.nn.Module, cand: dict[str, Any], out: Path, accuracy: float) -> Path:
        """``save_compressed`` with the dense base's config: loading rebuilds the base and re-applies the
        whole plan, sub-network extraction included."""
        from .export import save_compressed

        meta = {"label_names": self.teacher.label_names, "max_length": self.config.max_length,
                "test_accuracy": accuracy, "base_model": self.config.model}
        return save_compressed(student, _plan(cand), self.teacher.tokenizer, out, meta,
                               base_config=self.teacher.model.config)

    def _export_stage(self, run: RunDir, key: str) -> tuple[Any, list[str]]:
        """Copy the chosen candidate's saved model (and its integer ONNX) to ``RUN/model``; float models are
        exported to ONNX here."""
        cand = self._candidate(key)
        evaluation = self.run.result("evaluate")
        source = run.file(f"candidates/{key[:12]}")
        target = run.file("model")
        with tempfile.TemporaryDirectory(dir=run.path) as tmp:
            shutil.copytree(source, Path(tmp) / "model")
            if target.exists():
                shutil.rmtree(target)
            (Path(tmp) / "model").rename(target)
        files = [f"model/{p.name}" for p in sorted(target.iterdir()) if p.is_file()]
        onnx_status = "skipped (onnx: false)"
        if self.config.onnx:
            quantized_onnx = source.with_suffix(".onnx")
            try:
                if quantized_onnx.exists():
                    shutil.copyfile(quantized_onnx, run.file("model.onnx.part"))
                    os.replace(run.file("model.onnx.part"), run.file("model.onnx"))
                else:
                    from .export.onnx_quant import export_onnx

                    student = self._student(cand, run.file(f"distill/{key[:12]}/best/model.safetensors"))
                    export_onnx(student, run.file("model.onnx"), seq_len=16)
                files.append("model.onnx")
                onnx_status = "model.onnx (integer kernels)" if quantized_onnx.exists() else "model.onnx"
            except Exception as exc:  # an operator the exporter cannot handle: record it, keep the run
                onnx_status = f"not exported: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        write_text_atomic(run.file("MODEL_CARD.md"), model_card(self.config, cand, evaluation, onnx_status))
        files.append("MODEL_CARD.md")
        return {"key": key, "onnx": onnx_status}, files

    def _report_stage(self, run: RunDir, evaluation: dict[str, Any], key: str | None) -> tuple[Any, list[str]]:
        from .report.html import write_report

        c = self.config
        summary = build_summary(c, evaluation, key, run)
        fronts = {d: read_json(run.file(f"search/{_device_slug(d)}.json")) for d in c.devices}
        cands = read_json(run.file("candidates.json"))
        write_json_atomic(run.file("summary.json"), summary)
        write_report(run.file("report.html"), c, summary, fronts, cands, evaluation)
        return summary, ["summary.json", "report.html"]


def forward_call(model: torch.nn.Module | None, session: Any, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One forward pass on ``inputs``, of ``session`` (onnxruntime) if given, else of ``model``: what every
    host latency times."""
    from .export.onnx_quant import ort_logits

    def call() -> None:
        if session is not None:
            ort_logits(session, inputs)
            return
        with torch.inference_mode():
            model(**inputs)
    return call


def _split_quant(plan):
    """``plan`` as (everything but the trailing ``quant`` step of each layer, those ``quant`` steps alone):
    applied one after the other they build the same model as ``plan``."""
    from .compress import CompressionPlan
    from .compress.quant import QuantPlan

    first, last = {}, {}
    for name, chain in plan.layers.items():
        if chain and isinstance(chain[-1], QuantPlan):
            first[name], last[name] = chain[:-1], chain[-1:]
        else:
            first[name] = chain
    first = {n: c for n, c in first.items() if c}
    return CompressionPlan(layers=first, model_steps=plan.model_steps), CompressionPlan(layers=last)


def _plan(cand: dict[str, Any]):
    from .compress import CompressionPlan

    return CompressionPlan.from_dict(cand["plan"])


def ladder(rows: list[dict[str, Any]], metric: str, n: int, step: float = 0.85) -> list[dict[str, Any]]:
    """Up to ``n`` rows (sorted by proxy, best first) walking down the front: the most accurate by proxy, then
    each next one at least ``1 / step`` times better on ``metric`` than the last, so candidates differ in how
    hard they compress; rows skipped on the way fill any places left."""
    picked: list[dict[str, Any]] = []
    for x in rows:
        if len(picked) < n and (not picked or x["metrics"][metric] <= step * picked[-1]["metrics"][metric]):
            picked.append(x)
    picked += [x for x in rows if x not in picked][: n - len(picked)]
    return picked


def _interleave(lists: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def choose(evaluation: dict[str, Any], config: RunConfig) -> tuple[str | None, str]:
    """The feasible candidate with the lowest objective on the primary device, or None and the reason."""
    teacher = evaluation["teacher"]["test_accuracy"]
    metric, primary = config.objective_metric, config.devices[0]
    rows = {k: v for k, v in evaluation.items() if is_candidate(k)}
    drops = {k: 100 * (teacher - v["test_accuracy"]) for k, v in rows.items()}
    ok = [k for k in rows if drops[k] <= config.max_accuracy_drop + 1e-9]  # float noise of 100 * (a - b)
    if ok:
        return min(ok, key=lambda k: (rows[k]["modelled"][primary][metric], k)), "feasible"
    closest = min(drops, key=drops.get)
    return None, (f"no candidate keeps max_accuracy_drop {config.max_accuracy_drop:g} points: the closest "
                  f"({closest[:12]}) loses {drops[closest]:.2f} points; raise --budget-minutes or "
                  f"--max-accuracy-drop, or relax the latency/size limits (the fronts are kept in the run)")


def build_summary(config: RunConfig, evaluation: dict[str, Any], key: str | None, run: RunDir) -> dict[str, Any]:
    """The headline numbers: teacher, every candidate, the chosen one, constraints and whether each is met."""
    teacher = evaluation["teacher"]

    def entry(row: dict[str, Any]) -> dict[str, Any]:
        return {"runtime": row.get("runtime", "pytorch"), "test_accuracy": row["test_accuracy"],
                "latency_ms_b1": row["latency_ms_b1"],
                "latency_ms_b32": row["latency_ms_b32"], "size_bytes": row["size_bytes"],
                "predicted_model_bytes": row["model_bytes"],
                "predicted_ms_b1": row["predicted_ms_b1"], "predicted_ms_b32": row["predicted_ms_b32"],
                "edp": {d: m["edp_mjs"] for d, m in row["modelled"].items()},
                "modelled": row["modelled"]}

    summary: dict[str, Any] = {"status": "chosen" if key else "infeasible", "run_dir": str(run.path),
                               "objective": config.objective, "devices": config.devices,
                               "teacher": entry(teacher),
                               "candidates": {k: entry(v) for k, v in evaluation.items() if is_candidate(k)},
                               "baselines": {k[len(BASELINE):]: entry(v) for k, v in evaluation.items()
                                             if k.startswith(BASELINE)},
                               "chosen": None, "constraints": []}
    if key is not None:
        row = evaluation[key]
        chosen = {"key": key, **entry(row),
                  "accuracy_drop_points": 100 * (teacher["test_accuracy"] - row["test_accuracy"]),
                  "speedup_b1": teacher["latency_ms_b1"] / row["latency_ms_b1"],
                  "speedup_b32": teacher["latency_ms_b32"] / row["latency_ms_b32"],
                  "size_ratio": teacher["size_bytes"] / row["size_bytes"]}
        uniform = evaluation.get(f"{BASELINE}uniform")
        if uniform is not None:
            chosen["beats_uniform_baseline"] = bool(row["test_accuracy"] > uniform["test_accuracy"])
        summary["chosen"] = chosen
        summary["export"] = run.result("export") if run.is_done("export") else None
        summary["constraints"] = constraint_rows(config, chosen)
    else:
        summary["reason"] = choose(evaluation, config)[1]
    return summary


def constraint_rows(config: RunConfig, chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """Each constraint, its limit, the chosen model's value and whether it is met."""
    rows = [{"name": "max_accuracy_drop", "limit": config.max_accuracy_drop,
             "value": chosen["accuracy_drop_points"], "unit": "points (measured)"}]
    if config.max_latency_ms is not None:
        rows.append({"name": "max_latency_ms", "limit": config.max_latency_ms,
                     "value": max(m["latency_ms"] for m in chosen["modelled"].values()),
                     "unit": "ms (modelled, worst target device)"})
    if config.max_size_mb is not None:
        rows.append({"name": "max_size_mb", "limit": config.max_size_mb,
                     "value": chosen["predicted_model_bytes"] / 1e6, "unit": "MB (predicted)"})
    for r in rows:
        r["met"] = bool(r["value"] <= r["limit"] + 1e-9)
    return rows


def model_card(config: RunConfig, cand: dict[str, Any], evaluation: dict[str, Any], onnx_status: str) -> str:
    """A markdown model card: what the model is, its plan, its numbers, and how to load it."""
    teacher, row = evaluation["teacher"], evaluation[cand["key"]]
    arch = cand["spec"]["arch"]
    lines = [
        f"# Compressed {config.model}", "",
        f"Made by `fitformer compress` from `{config.model}` on `{config.data or config.task or 'rotten-tomatoes'}`, "
        f"searched for `{cand['device']}` (objective: {config.objective}).", "",
        "| | teacher | this model |", "| --- | --- | --- |",
        f"| runtime measured | {teacher.get('runtime', 'pytorch')} | {row.get('runtime', 'pytorch')} |",
        f"| test accuracy | {teacher['test_accuracy']:.4f} | {row['test_accuracy']:.4f} |",
        f"| host latency, batch 1 (ms) | {teacher['latency_ms_b1']:.2f} | {row['latency_ms_b1']:.2f} |",
        f"| host latency, batch 32 (ms) | {teacher['latency_ms_b32']:.2f} | {row['latency_ms_b32']:.2f} |",
        f"| weights on disk (bytes) | {teacher['size_bytes']} | {row['size_bytes']} |", "",
        f"Architecture: {arch['num_layers']} layers, hidden {arch['hidden_size']}, heads {arch['heads']}, "
        f"FFN {arch['ffn']}.", "",
        "## Load", "", "```python", "import fitformer", "", f"model = fitformer.load({str(config.out)!r})",
        "print(model.predict(['a fine film']))", "```", "",
        f"ONNX: {onnx_status}.", "",
        *(["The weights are int8 codes packed in `model/model.safetensors` (with their step sizes); "
           "`model.onnx` runs them on onnxruntime's integer GEMMs, as measured above:", "", "```python",
           "import onnxruntime", "", "session = onnxruntime.InferenceSession('model.onnx')",
           "# inputs: input_ids, attention_mask, token_type_ids (int64, batch x tokens); output: logits", "```", ""]
          if row.get("runtime") == "onnxruntime-int8" else []),
        "The compression plan is `model/plan.json`; `report.html` has the details.", ""]
    return "\n".join(lines)


def compress(config: RunConfig, log: Log | None = None) -> CompressResult:
    """Run (or resume) a compress run; raises InfeasibleError (exit code 3) when no candidate qualifies."""
    return Pipeline(config, log).execute()
