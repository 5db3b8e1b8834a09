"""fitformer: fit a pretrained Transformer to the hardware it must run on."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

from .export import load

__version__ = "0.1.0"
__all__ = ["__version__", "compress", "load", "run_compress"]


def run_compress(
    model: str | Path | None = None,
    task: str | None = None,
    data: Any = None,
    device: str | list[str] | None = None,
    constraints: dict[str, float] | None = None,
    out: str | Path | None = None,
    preset: str | None = None,
    config: str | Path | None = None,
    log: Any = None,
    **settings: Any,
):
    """The Python form of ``fitformer compress``; returns a :class:`fitformer.pipeline.CompressResult`.

    ``data`` is a file path or a :class:`fitformer.data.TextDataset`; ``constraints`` holds any of
    ``max_latency_ms``, ``max_accuracy_drop``, ``max_size_mb``; ``settings`` are other ``RunConfig`` fields.
    """
    from .config import build_config
    from .data import TextDataset
    from .pipeline import Pipeline

    dataset = data if isinstance(data, TextDataset) else None
    devices = [device] if isinstance(device, str) else device
    run_config = build_config(preset, config, model=None if model is None else str(model), task=task,
                              data=None if dataset is not None else data, devices=devices, out=out,
                              **(constraints or {}), **settings)
    return Pipeline(run_config, log, dataset=dataset).execute()


class _CompressPackage(types.ModuleType):
    """``fitformer.compress`` is the package of compression plans; calling it runs the whole pipeline, so
    ``fitformer.compress(model=..., device=..., constraints=...)`` mirrors the ``fitformer compress`` command."""

    def __call__(self, *args: Any, **kwargs: Any):
        return run_compress(*args, **kwargs)


compress = sys.modules[f"{__name__}.compress"]  # imported by .export
compress.__class__ = _CompressPackage
