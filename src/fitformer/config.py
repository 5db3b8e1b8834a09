"""The configuration of one ``fitformer compress`` run: a pydantic model, presets, and a commented example.

A run is described by the same fields whether it comes from command-line flags, a YAML file
(``--config run.yaml``) or the Python API. Presets fill in the fields the user did not set; explicit values
always win. Everything is validated before any work starts, so a typo fails in a second, not after an hour.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError
from .io import without_later_defaults

# settings added after run directories were made, with the value that leaves results as before
# (refit_fisher_weighs "rows": what refit_fisher_examples > 0 did before the field)
_ADDED_LATER = {"distill_neighbour_swap": 0.0, "distill_temperature": 1.0, "refit_fisher_examples": 0,
                "refit_fisher_weighs": "rows", "distill_hidden_loss": "mse",
                "refit_inputs": "teacher"}
OBJECTIVE_METRICS = {"latency": "latency_ms", "energy": "energy_mj", "edp": "edp_mjs", "size": "size_bytes"}

PRESETS: dict[str, dict[str, Any]] = {
    # The demo: a small search, two candidates, a short distillation; a 1-epoch teacher on a fresh machine.
    # Structured sub-networks (depth, heads, FFN) of int8 layers and an int8 embedding, run on integer kernels:
    # they distil well in minutes.
    "quick": {"teacher_epochs": 1, "search_budget": 150, "candidates": 2, "budget_minutes": 4.0,
              "distill_max_train_examples": 4000, "latency_repeats": 10, "formats": ["dense"], "bits": [8],
              "embedding": True, "distill_schedule": "logits_kd"},
    # A longer search over every format and more, longer-distilled candidates.
    "thorough": {"teacher_epochs": 3, "search_budget": 600, "candidates": 4, "budget_minutes": 60.0,
                 "distill_max_train_examples": None, "latency_repeats": 30},
}


class RunConfig(BaseModel):
    """Everything ``fitformer compress`` needs; every field is documented and validated."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("minilm-l6", description="Built-in model name or local Hugging Face model directory.")
    task: str | None = Field(None, description="Built-in task (default: rotten-tomatoes); or give `data`.")
    data: Path | None = Field(None, description="CSV, TSV or JSONL file of labelled texts (instead of `task`).")
    text_col: list[str] = Field(["text"], description="Text column(s) of `data`; two for sentence pairs.")
    label_col: str = Field("label", description="Label column of `data`.")
    devices: list[str] = Field(["laptop-i7-1185g7"], min_length=1,
                               description="Target devices (catalog names or device YAML files): searched "
                                           "each; latency/size limits hold on all; the first is primary.")
    max_latency_ms: float | None = Field(None, gt=0, description="Modelled latency limit on the target device "
                                                                 "(batch `latency_batch`, `seq_len` tokens).")
    max_accuracy_drop: float = Field(1.0, ge=0, le=100,
                                     description="Largest test-accuracy loss against the teacher, in points.")
    max_size_mb: float | None = Field(None, gt=0, description="Largest predicted model size in MB (1e6 bytes).")
    objective: Literal["latency", "energy", "edp", "size"] = Field(
        "latency", description="What the chosen model minimises on the primary device (modelled).")
    budget_minutes: float = Field(10.0, gt=0, description="Wall-clock minutes of training (refit, then "
                                  "distillation), split equally among the candidates found; a refit takes at most "
                                  "a third of a candidate's share, distillation the rest.")
    out: Path = Field(Path("runs/compress"), description="Run directory; rerunning the same config resumes it.")
    teacher_epochs: int = Field(3, ge=1, description="Fine-tuning epochs of the teacher (cached per machine).")
    max_length: int = Field(128, ge=8, le=512, description="Tokens per example (teacher, students, export).")
    search_budget: int = Field(200, ge=1, description="Candidates scored by the search on each device.")
    population: int = Field(32, ge=4, description="NSGA-II population size.")
    candidates: int = Field(3, ge=1, le=16, description="Plans distilled and measured (lowest proxy first).")
    min_gain: float = Field(1.5, ge=1.0, description="A candidate must beat the teacher's objective on its "
                                                     "device by at least this factor.")
    formats: list[Literal["dense", "lowrank", "tt"]] = Field(
        ["dense", "lowrank", "tt"], min_length=1, description="Layer formats the search may choose per layer.")
    ranks: list[int] = Field([32, 64, 128], min_length=1, description="Low-rank and TT ranks the search may "
                                                                       "choose (higher keeps more accuracy).")
    bits: list[Literal[2, 3, 4, 5, 6, 7, 8, 32]] = Field([32, 8], min_length=1, description="Weight bit "
                                                          "widths the search may choose (2 to 8 run with 8-bit "
                                                          "activations on int8 kernels, stored packed).")
    sparsities: list[float] = Field([0.0], min_length=1, description="Balanced (N:4) weight sparsities the "
                                                                     "search may choose, e.g. [0.0, 0.5].")
    embedding: bool = Field(False, description="Also search the word embedding's format (TT embedding, bits): "
                                               "needed for large size reductions, costs accuracy.")
    distill_max_train_examples: int | None = Field(None, ge=2, description="Training examples used by "
                                                                           "distillation (None: all).")
    distill_schedule: Literal["progressive", "two_stage", "logits_kd", "finetune_only"] = Field(
        "logits_kd", description="Distillation schedule (docs/distillation.md); logits_kd measured best.")
    distill_batch_size: int = Field(32, ge=1, description="Distillation batch size.")
    distill_epochs: float = Field(3.0, gt=0, description="Most passes over the training data per candidate; "
                                  "distillation ends there or at its share of the budget, whichever is first.")
    distill_learning_rate: float = Field(1e-4, gt=0, lt=1, description="Peak AdamW learning rate of "
                                         "distillation; 4e-4 measured better for float TT students "
                                         "(bench_distill) but collapses 4-bit QAT TT ones (docs/distillation.md).")
    distill_word_dropout: float = Field(0.0, ge=0, lt=0.5, description="Augmentation: each training token "
                                        "(not [CLS]/[SEP]) is dropped with this probability per step, so the "
                                        "student sees new inputs with the teacher's label for each (0.1 "
                                        "measured better in bench_distill); teacher logits are then not cached.")
    distill_temperature: float = Field(1.0, gt=0, description="Temperature of the teacher's soft targets in "
                                       "distillation (the KL term is scaled by its square); above 1 the targets "
                                       "say how sure the teacher is, not only what it picks.")
    distill_neighbour_swap: float = Field(0.0, ge=0, le=1, description="Augmentation: this share of training "
                                          "examples has its words swapped (each with probability 0.4) for one of "
                                          "their 15 nearest neighbours in the teacher's embedding space, new "
                                          "inputs learnt from the teacher's soft labels alone (TinyBERT's "
                                          "augmentation); teacher logits are then not cached.")
    distill_hidden_loss: Literal["mse", "cosine", "fisher"] = Field(
        "mse", description="How the layered schedules (two_stage, progressive) match each hidden state: mse; "
        "cosine (blind to scale); fisher: mse measured in the directions the teacher's task loss reads there, "
        "from its gradients on 1,024 training examples (docs/distillation.md).")
    distill_ema_decay: float = Field(0.99, ge=0, lt=1, description="In (0, 1): the exponential moving average "
                                     "of the weights with this decay is validated and its best evaluation "
                                     "ships (less of a lucky draw among noisy evaluations; 0.99 measured best, "
                                     "docs/distillation.md); 0: the raw weights.")
    sensitivity_examples: int = Field(64, ge=0, description="Training examples that measure each layer's "
                                      "sensitivity, the weight of its error in the search's proxy "
                                      "(0: every layer weighs the same and is scored on its weights, not its outputs).")
    refit_steps: int = Field(200, ge=0, description="Adam steps fitting each factorized (TT, low-rank) layer "
                             "to the teacher's outputs on calibration tokens before distillation (0: TT-SVD only).")
    refit_inputs: Literal["student", "teacher"] = Field(
        "student", description="What each factorized layer is fed while it is refit: 'student' fits the layers "
        "in order, each on the inputs the student gives it once the layers before it are refit (it also corrects "
        "the error that reaches it); 'teacher' fits each on the teacher's inputs, independently "
        "(docs/tensorized.md).")
    refit_fisher_examples: int = Field(1024, ge=0, description="Training examples on which the teacher's "
                                       "gradients steer the refit of a TT word embedding (its Fisher information, "
                                       "docs/tensorized.md); 0: rows weighed by token counts, errors in the plain "
                                       "metric.")
    refit_fisher_weighs: Literal["directions", "rows", "both"] = Field(
        "directions", description="What that Fisher information steers: 'directions' measures each row's "
        "error in the directions the task loss reads, 'rows' weighs each row by how much the loss depends on "
        "it, 'both' does both.")
    seq_len: int = Field(128, ge=1, description="Tokens per example of the cost model.")
    latency_batch: int = Field(1, ge=1, description="Batch size of the cost model.")
    latency_repeats: int = Field(20, ge=3, description="Timed calls per host latency measurement.")
    threads: int | None = Field(None, ge=1, description="PyTorch threads for host timing (None: leave as is).")
    onnx: bool = Field(True, description="Also export RUN/model.onnx.")
    seed: int = Field(0, description="Seed of the search and of distillation.")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.task is not None and self.data is not None:
            raise ValueError("give either task or data, not both")
        if not 1 <= len(self.text_col) <= 2:
            raise ValueError("text_col takes one column, or two for sentence pairs")
        if min(self.ranks) < 1:
            raise ValueError(f"ranks {self.ranks}: use positive integers")
        if any(not 0.0 <= x < 1.0 for x in self.sparsities):
            raise ValueError(f"sparsities {self.sparsities}: use fractions in [0, 1)")
        if 32 not in self.bits and ("lowrank" in self.formats or any(self.sparsities)):
            raise ValueError("low-rank and sparse layers run in float: add 32 to bits, or drop them from "
                             "formats/sparsities")
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"devices {self.devices} repeat a device; list each once")
        return self

    @property
    def objective_metric(self) -> str:
        return OBJECTIVE_METRICS[self.objective]

    def identity(self) -> dict[str, Any]:
        """The settings that decide the run's results (what the run directory's manifest compares)."""
        settings = self.model_dump(mode="json", exclude={"out", "threads", "latency_repeats"})
        if not self.refit_fisher_examples:  # no Fisher information, so nothing for it to steer
            settings.pop("refit_fisher_weighs")
        return without_later_defaults(settings, _ADDED_LATER)

    def check_resources(self) -> None:
        """Check what the model cannot: the devices exist, the files are there, the run directory is usable."""
        from .hardware import get_device
        from .models import resolve_model_dir

        for device in self.devices:
            get_device(device)
        if self.data is not None and not self.data.is_file():
            raise UserError(f"data {self.data}: no such file; pass a CSV, TSV or JSONL file of labelled texts")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"out {self.out} is a file; pass a directory for the run")
        resolve_model_dir(self.model)


def build_config(preset: str | None = None, file: str | Path | None = None, **overrides: Any) -> RunConfig:
    """A validated config: preset defaults, then the YAML ``file``, then ``overrides`` that are not None."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"preset '{preset}': choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if file is not None:
        values.update(_read_yaml(Path(file)))
    values.update({k: v for k, v in overrides.items() if v is not None and v != []})
    try:
        config = RunConfig(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise UserError(f"{where}: {err['msg']} (see `fitformer config example`)") from None
    config.check_resources()
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"--config {path}: no such file; `fitformer config example > run.yaml` writes one")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"--config {path}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None
    except RecursionError:
        raise UserError(f"--config {path}: nested too deeply; settings are flat, see `fitformer config example`") \
            from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of settings, e.g. 'devices: [raspberry-pi-4]'")
    odd = [key for key in data if not isinstance(key, str)]
    if odd:
        raise UserError(f"--config {path}: setting name {odd[0]!r} is not a name; see `fitformer config example`")
    data.pop("preset", None)
    return data


def example_yaml() -> str:
    """A commented YAML file with every field at its default (loads back as the default config)."""
    lines = ["# fitformer compress --config run.yaml", "# Every field is optional; unset fields take the "
             "default (or the preset's value with --preset)."]
    for name, field in RunConfig.model_fields.items():
        default = field.default
        value = json.dumps(str(default) if isinstance(default, Path) else default)  # JSON is valid YAML
        lines += ["", f"# {field.description}", f"{name}: {value}"]
    return "\n".join(lines) + "\n"
