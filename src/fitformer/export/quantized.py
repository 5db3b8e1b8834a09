"""Packed low-bit model files: b-bit integer weights packed densely (int4: two per byte) in safetensors.

A frozen model (see :func:`fitformer.compress.quant.freeze`) is saved as one ``.safetensors`` file:

- each ``<layer>.weight_int`` becomes ``<layer>.weight_int.packed`` (uint8, ``ceil(numel * bits / 8)``
  bytes) — values are offset to unsigned, written most significant bit first, so int4 puts two codes in a
  byte and int8 one;
- the quantized layers' vectors (:func:`fitformer.layers.quant.vector_keys`: biases, step sizes, zero
  points), which :func:`fitformer.compress.quant.freeze` rounded to fp16, are stored as fp16 and read back
  as fp32;
- everything else (float layers, layer norms) is stored as it is;
- the header metadata holds the packing layout, the Hugging Face config and the compression plans that
  rebuild the module structure on load.

:func:`load_quantized` rebuilds the structure from the config and plans, unpacks the codes and returns a
model whose outputs are bit-identical to the saved one. :func:`size_bytes` is the file's size on disk —
the figure reports and the search use, not a parameter count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import UserError
from ..io import atomic_path
from ..layers.quant import LSQQuantizer, quant_modules, quantizers, vector_keys

FORMAT = "fitformer-quant/1"
PACKED = ".packed"


def pack_bits(q: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack integer codes of ``bits`` bits into a flat uint8 tensor of ``ceil(numel * bits / 8)`` bytes."""
    values = q.detach().cpu().reshape(-1).to(torch.int16).numpy()
    if signed:
        values = values + (1 << (bits - 1))
    if values.size and (values.min() < 0 or values.max() >= (1 << bits)):
        raise ValueError(f"codes out of the {bits}-bit range")
    codes = values.astype(np.uint8)
    if bits == 8:
        return torch.from_numpy(codes.copy())
    bitplanes = np.unpackbits(codes[:, None], axis=1)[:, 8 - bits:]  # (n, bits), most significant first
    return torch.from_numpy(np.packbits(bitplanes.reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, signed: bool, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int8 codes (signed) or uint8 codes (unsigned) of the given shape."""
    n = int(np.prod(shape)) if shape else 1
    data = packed.cpu().numpy().astype(np.uint8)
    if bits == 8:
        codes = data[:n]
    else:
        bitplanes = np.unpackbits(data)[: n * bits].reshape(n, bits)
        codes = np.packbits(np.pad(bitplanes, ((0, 0), (8 - bits, 0))), axis=1).reshape(-1)
    if signed:
        return torch.from_numpy((codes.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)).reshape(shape)
    return torch.from_numpy(codes.copy()).reshape(shape)


def _hf_config(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return config.to_json_string() if config is not None and hasattr(config, "to_json_string") else None


def is_frozen_quantized(model: nn.Module) -> bool:
    """Whether ``model`` has quantized layers and all of them hold frozen integer codes."""
    mods = quant_modules(model)
    return bool(mods) and all(m.frozen for _, m in mods)


def freeze_structure(model: nn.Module) -> nn.Module:
    """Turn a freshly built quantized model into the frozen structure saved codes load into (in place)."""
    for q in quantizers(model):
        q.initialized.fill_(True)
    for _, m in quant_modules(model):
        m.freeze()
    return model


def _flag_keys(model: nn.Module) -> set[str]:
    """The ``initialized`` flags of the quantizers: all true in a frozen model, so not stored (151 entries of
    the safetensors index, 20 KB, in a 1.8 MB 4-bit TT MiniLM)."""
    return {f"{n}.initialized" for n, m in model.named_modules() if isinstance(m, LSQQuantizer)}


def save_quantized(model: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> int:
    """Save a frozen quantized model to ``path`` (one packed safetensors file, atomically); returns its size."""
    mods = quant_modules(model)
    if not is_frozen_quantized(model):
        raise UserError("save_quantized needs a frozen model; call freeze(quantize(model, spec)) first")
    layout: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    packed_keys: dict[str, tuple[int, bool, tuple[int, ...]]] = {}
    derived: set[str] = set()
    for name, m in mods:
        prefix = f"{name}." if name else ""
        for local, quantizer in m.int_codes().items():
            codes = getattr(m, local)
            packed_keys[prefix + local] = (quantizer.bits, quantizer.symmetric, tuple(codes.shape))
        derived.update(prefix + k for k in m.derived_keys())
    derived |= _flag_keys(model)
    vectors = set(vector_keys(model))
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        if key in derived:  # recomputed from the integer codes on load
            continue
        if key in packed_keys:
            bits, signed, shape = packed_keys[key]
            tensors[key + PACKED] = pack_bits(value, bits, signed)
            layout[key] = {"bits": bits, "signed": signed, "shape": list(shape)}
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() > 1 and ident in seen:  # tied weights are stored once
            layout[key] = {"alias": seen[ident]}
            continue
        seen[ident] = key
        value = value.detach().cpu().contiguous()
        if key in vectors and value.dtype == torch.float32:
            half = value.to(torch.float16)
            if not torch.equal(half.float(), value):
                raise UserError(f"{key} is not on the fp16 grid; freeze the model with "
                                "fitformer.compress.quant.freeze, which rounds its vectors")
            value = half
        tensors[key] = value
    metadata = {
        "format": FORMAT,
        "layout": json.dumps(layout),
        "plans": json.dumps(getattr(model, "fitformer_plans", [])),
        "meta": json.dumps(meta or {}),
    }
    config = _hf_config(model)
    if config is not None:
        metadata["hf_config"] = config
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return size_bytes(path)


def size_bytes(path: str | os.PathLike[str]) -> int:
    """The size of a saved model on disk (a file, or every file under a directory)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def read_quantized(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The unpacked state dict and the metadata (``plans``, ``hf_config``, ``meta``) of a saved model."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            raw = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path}: cannot read a quantized model ({exc}); "
                        "pass a file written by save_quantized") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path}: not a fitformer quantized model (format {metadata.get('format')!r})")
    layout = json.loads(metadata["layout"])
    state: dict[str, torch.Tensor] = {k: v.float() if v.dtype == torch.float16 else v  # the vectors
                                      for k, v in raw.items() if not k.endswith(PACKED)}
    for key, info in layout.items():
        if "alias" in info:
            continue
        state[key] = unpack_bits(raw[key + PACKED], info["bits"], info["signed"], tuple(info["shape"]))
    for key, info in layout.items():
        if "alias" in info:
            state[key] = state[info["alias"]]
    info = {"plans": json.loads(metadata["plans"]), "meta": json.loads(metadata["meta"]),
            "hf_config": json.loads(metadata["hf_config"]) if "hf_config" in metadata else None}
    return state, info


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load an unpacked state into a frozen model of the same structure (strict)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    mods = quant_modules(model)
    derived = {f"{n}.{k}" if n else k for n, m in mods for k in m.derived_keys()} | _flag_keys(model)
    missing = [k for k in missing if k not in derived]
    if missing or unexpected:
        raise UserError(f"the saved model does not match the structure: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; rebuild it with the same plans")
    for q in quantizers(model):
        q.initialized.fill_(True)
    for _, m in mods:
        m.restore()
    return model


@torch.no_grad()
def load_quantized(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a saved quantized Hugging Face classifier: config -> plans -> freeze -> packed weights."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ..compress import CompressionPlan, apply_plan

    state, info = read_quantized(path)
    if info["hf_config"] is None:
        raise UserError(f"{path}: saved without a Hugging Face config; rebuild the model and use load_into")
    config_dict = dict(info["hf_config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForSequenceClassification.from_config(config)
    for plan in info["plans"]:
        model = apply_plan(model, CompressionPlan.from_dict(plan))
    freeze_structure(model)
    model.fitformer_plans = info["plans"]
    model.eval()
    return load_into(model, state)
