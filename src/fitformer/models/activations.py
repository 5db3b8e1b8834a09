"""What a model's layers see: their inputs at the real tokens of calibration batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import UserError


def record_layer_inputs(model: nn.Module, names: list[str], batches: Iterable[dict[str, torch.Tensor]],
                        record: Callable[[str, torch.Tensor], None]) -> list[torch.Tensor]:
    """Run ``model`` (in eval mode, without gradients) over ``batches`` and call ``record(name, rows)`` with
    each named layer's input as rows: per token (B, L, in) only the real tokens of the attention mask, per
    sequence (a pooler) every row. Returns the real token ids of each batch. The refit fits on these rows and
    the search's proxy takes their second moments; padding would weigh both towards the pad embedding."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise UserError(f"no layer named {missing[0]!r} in the model; give names from model.named_modules()")
    mask: list[torch.Tensor] = []

    def hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def on_input(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            record(name, x[mask[0]] if x.shape[:-1] == mask[0].shape else x.reshape(-1, x.shape[-1]))
        return on_input

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    ids: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in batches:
                given = batch.get("attention_mask")  # without one, every position is a real token
                mask[:] = [given.bool() if given is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)]
                ids.append(batch["input_ids"][mask[0]])
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return ids
