"""Packed low-bit model files: b-bit integer weights packed densely (int4: two per byte) in safetensors.

A frozen model (see :func:`fitformer.compress.quant.freeze`) is saved as one ``.safetensors`` file:

- every integer code tensor (``weight_int``, ``core_int_<k>``) is packed (``ceil(numel * bits / 8)``
  bytes; values offset to unsigned, written most significant bit first, so int4 puts two codes in a byte
  and int8 one) and the packed codes are concatenated into one uint8 tensor, ``__codes__``;
- the quantized layers' vectors (:func:`fitformer.layers.quant.vector_keys`: biases, step sizes, zero
  points), which ``freeze`` rounded to fp16, are concatenated into one fp16 tensor, ``__vectors__``;
- everything else (float layers, layer norms, the classifier) is stored by name as it is;
- the header metadata holds the Hugging Face config and the compression plans that rebuild the module
  structure on load, and the names of tied tensors.

The two blobs carry no names or shapes: the loader rebuilds the structure first and splits them in its
order (:func:`load_into`). One index entry per tensor cost ~130 bytes (the name, dtype, shape and offsets)
and the packing layout ~150 more per code tensor: in a 1.8 MB 4-bit TT MiniLM, 303 entries and 47 KB.
Files of the first format (``fitformer-quant/1``: each tensor by name) still load.

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

FORMAT = "fitformer-quant/2"
FORMAT_V1 = "fitformer-quant/1"  # each code tensor packed under its own name (still read)
CODES = "__codes__"  # every integer code, packed, in one uint8 tensor
VECTORS = "__vectors__"  # every quantized layer's bias, step sizes and zero points, in one fp16 tensor


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
    if not is_frozen_quantized(model):
        raise UserError("save_quantized needs a frozen model; call freeze(quantize(model, spec)) first")
    state, code_keys, vector_names = model.state_dict(), _code_keys(model), vector_keys(model)
    codes = [pack_bits(state[key], q.bits, q.symmetric) for key, q in code_keys]
    vectors = []
    for key in vector_names:
        value = state[key].detach().cpu().reshape(-1).float()
        if not torch.equal(value.half().float(), value):
            raise UserError(f"{key} is not on the fp16 grid; freeze the model with "
                            "fitformer.compress.quant.freeze, which rounds its vectors")
        vectors.append(value.half())
    skip = _derived_keys(model) | {key for key, _ in code_keys} | set(vector_names)
    tensors: dict[str, torch.Tensor] = {CODES: torch.cat(codes), VECTORS: torch.cat(vectors)}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        if key in skip:
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() > 1 and ident in seen:  # tied weights are stored once
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "aliases": json.dumps(aliases),
        "plans": json.dumps(getattr(model, "fitformer_plans", [])),
        "meta": json.dumps(meta or {}),
    }
    config = _hf_config(model)
    if config is not None:
        metadata["hf_config"] = config
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return size_bytes(path)


def _code_keys(model: nn.Module) -> list[tuple[str, LSQQuantizer]]:
    """State keys of the integer codes, in the order the codes blob holds them, with their quantizers."""
    return [(f"{name}.{local}" if name else local, q)
            for name, m in quant_modules(model) for local, q in m.int_codes().items()]


def _derived_keys(model: nn.Module) -> set[str]:
    """State entries recomputed on load: float cores from their codes, the quantizers' set flags."""
    return {f"{n}.{k}" if n else k for n, m in quant_modules(model) for k in m.derived_keys()} | _flag_keys(model)


def size_bytes(path: str | os.PathLike[str]) -> int:
    """The size of a saved model on disk (a file, or every file under a directory)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def read_quantized(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored tensors (the codes and vectors still in their blobs: :func:`load_into` splits them by the
    model's structure) and the metadata (``plans``, ``hf_config``, ``meta``) of a saved model."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path}: cannot read a quantized model ({exc}); "
                        "pass a file written by save_quantized") from None
    if metadata.get("format") == FORMAT_V1:
        state = _unpack_v1(state, json.loads(metadata["layout"]))
    elif metadata.get("format") != FORMAT or CODES not in state or VECTORS not in state:
        raise UserError(f"{path}: not a fitformer quantized model (format {metadata.get('format')!r}); "
                        "pass a file written by save_quantized")
    else:
        for key, alias in json.loads(metadata["aliases"]).items():
            state[key] = state[alias]
    info = {"plans": json.loads(metadata["plans"]), "meta": json.loads(metadata["meta"]),
            "hf_config": json.loads(metadata["hf_config"]) if "hf_config" in metadata else None}
    return state, info


def _unpack_v1(raw: dict[str, torch.Tensor], layout: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The state of a ``fitformer-quant/1`` file: each code tensor packed under its own name."""
    state = {k: v.float() if v.dtype == torch.float16 else v for k, v in raw.items() if not k.endswith(".packed")}
    for key, entry in layout.items():
        if "alias" not in entry:
            state[key] = unpack_bits(raw[f"{key}.packed"], entry["bits"], entry["signed"], tuple(entry["shape"]))
    for key, entry in layout.items():
        if "alias" in entry:
            state[key] = state[entry["alias"]]
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load what :func:`read_quantized` returned into a frozen model of the same structure (strict): the codes
    and vectors are split from their blobs in the structure's order and shapes."""
    state = dict(state)
    if CODES in state:  # a first-format file arrives unpacked by name (read_quantized)
        codes, vectors = state.pop(CODES), state.pop(VECTORS).float()
        structure, code_keys, vector_names = model.state_dict(), _code_keys(model), vector_keys(model)
        code_bytes = [-(-structure[key].numel() * q.bits // 8) for key, q in code_keys]
        vector_sizes = [structure[key].numel() for key in vector_names]
        if sum(code_bytes) != codes.numel() or sum(vector_sizes) != vectors.numel():
            raise UserError(f"the saved model does not match the structure: blob sizes differ ({codes.numel()} "
                            f"bytes of codes and {vectors.numel()} vector values stored, {sum(code_bytes)} and "
                            f"{sum(vector_sizes)} expected); rebuild it with the same plans")
        for (key, q), part in zip(code_keys, codes.split(code_bytes), strict=True):
            state[key] = unpack_bits(part, q.bits, q.symmetric, tuple(structure[key].shape))
        for key, part in zip(vector_names, vectors.split(vector_sizes), strict=True):
            state[key] = part.reshape(structure[key].shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    derived = _derived_keys(model)
    missing = [k for k in missing if k not in derived]
    if missing or unexpected:
        raise UserError(f"the saved model does not match the structure: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; rebuild it with the same plans")
    for q in quantizers(model):
        q.initialized.fill_(True)
    for _, m in quant_modules(model):
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
