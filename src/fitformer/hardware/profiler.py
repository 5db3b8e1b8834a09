"""Host profiler: real latency of a model and of each of its layers, in PyTorch eager or onnxruntime.

Every figure comes from :func:`fitformer.hardware.timing.measure` at a fixed thread count (warm-up,
repetitions, trimmed mean and spread). Per-layer figures time each layer in isolation on the inputs it
received during one forward pass of the whole model. Profiles are cached as JSON under
``<cache>/profiles``, keyed by the model's structure and weights, the shape, threads and backend.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..io import cache_root, read_json, sha256_json, write_json_atomic
from .calibrate import host_key
from .timing import measure, random_token_inputs

BACKENDS = ("eager", "onnxruntime")


@dataclass
class Profile:
    """Whole-model timing plus per-layer rows (name, type, parameters, timing dict, share of total)."""

    backend: str
    batch: int
    seq_len: int
    threads: int
    total: dict[str, float]
    layers: list[dict[str, Any]] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "batch": self.batch, "seq_len": self.seq_len, "threads": self.threads,
                "total": self.total, "layers": self.layers, "host": self.host}


def model_fingerprint(model: nn.Module) -> str:
    """Hash of module types, parameter names/shapes and a sample of each parameter's values."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__name__};".encode())
    for name, p in model.state_dict().items():
        if isinstance(p, torch.Tensor):
            flat = p.detach().reshape(-1)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[:: max(1, flat.numel() // 64)].float().numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def default_layers(model: nn.Module) -> list[str]:
    """Embeddings, each encoder layer, pooler and classifier of a BERT-style model; else top-level children."""
    names = []
    for name, _module in model.named_modules():
        tail = name.rsplit(".", 1)[-1]
        if tail in ("embeddings", "pooler", "classifier") or (name.count(".") >= 1 and
                                                              name.rsplit(".", 2)[-2] == "layer" and tail.isdigit()):
            names.append(name)
    return names or [n for n, _ in model.named_children()]


def _inputs(model: nn.Module, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2)
    return random_token_inputs(batch, seq_len, vocab, token_type_ids=False)


def _eager_layers(model: nn.Module, inputs: dict[str, torch.Tensor], names: list[str], repeats: int,
                  total_s: float) -> list[dict[str, Any]]:
    captured: dict[str, tuple[tuple, dict]] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, kwargs, n=n: captured.setdefault(n, (args, kwargs)), with_kwargs=True) for n in names]
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for n in names:
        if n not in captured:
            continue
        module, (args, kwargs) = model.get_submodule(n), captured[n]

        def run(module: nn.Module = module, args: tuple = args, kwargs: dict = kwargs) -> object:
            with torch.inference_mode():
                return module(*args, **kwargs)

        t = measure(run, warmup=2, repeats=repeats).to_dict()
        rows.append({"name": n, "type": type(module).__name__,
                     "params": sum(p.numel() for p in module.parameters()), "timing": t,
                     "share": t["mean_ms"] / 1e3 / total_s if total_s > 0 else 0.0})
    return rows


def _onnx_timing(model: nn.Module, inputs: dict[str, torch.Tensor], threads: int, repeats: int) -> dict[str, float]:
    import onnxruntime as ort

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            return out.logits if hasattr(out, "logits") else out[0]

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.onnx")
        try:
            torch.onnx.export(Wrapped(model).eval(), (inputs["input_ids"], inputs["attention_mask"]), path,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamo=False)
        except Exception as exc:  # export failures are about the model, not the user: report clearly
            raise UserError(f"cannot export this model to ONNX ({type(exc).__name__}: {exc}); "
                            "profile it with --backend eager") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {k: v.numpy() for k, v in inputs.items()}
        return measure(lambda: session.run(None, feed), warmup=3, repeats=repeats).to_dict()


def profile_model(model: nn.Module, batch: int = 1, seq_len: int = 128, threads: int | None = None,
                  backend: str = "eager", per_layer: bool = True, repeats: int = 20,
                  use_cache: bool = True) -> Profile:
    """Measure ``model`` on token ids of shape (batch, seq_len); per-layer rows for the eager backend."""
    if backend not in BACKENDS:
        raise UserError(f"backend '{backend}' is unknown; use one of {', '.join(BACKENDS)}")
    if batch < 1 or seq_len < 1:
        raise UserError(f"batch and seq-len must be >= 1, got {batch} and {seq_len}")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model.eval()
    key = {"model": model_fingerprint(model), "batch": batch, "seq_len": seq_len, "threads": threads,
           "backend": backend, "per_layer": per_layer, "repeats": repeats, "host": host_key(threads)}
    path = cache_root() / "profiles" / f"{sha256_json(key)[:24]}.json"
    if use_cache and path.exists():
        data = read_json(path)
        return Profile(**data, cached=True)
    inputs = _inputs(model, batch, seq_len)
    if backend == "onnxruntime":
        total = _onnx_timing(model, inputs, threads, repeats)
        layers: list[dict[str, Any]] = []
    else:
        def run() -> object:
            with torch.inference_mode():
                return model(**inputs)

        total = measure(run, warmup=3, repeats=repeats).to_dict()
        layers = _eager_layers(model, inputs, default_layers(model), repeats, total["mean_ms"] / 1e3) \
            if per_layer else []
    profile = Profile(backend, batch, seq_len, threads, total, layers, host_key(threads))
    write_json_atomic(path, profile.to_dict())
    return profile
