"""Plan kind ``positions``: keep only the position-table rows a model is ever run with.

A BERT-style encoder stores ``max_position_embeddings`` rows (512 in MiniLM), but fitformer runs every model
at ``max_length`` tokens or fewer (training, evaluation, export and ``predict`` all truncate there), so the
rows beyond it are never read. Dropping them changes no output for inputs of at most ``rows`` tokens and
saves ``(512 - 128) x 384`` weights in MiniLM-L6 at 128 tokens: 147 KB of an 8-bit side table, 10% of a
1.5 MB 50x model. The handler also shortens the position-id buffers and the config, so a longer input fails
in the position lookup instead of reading a row that is not there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UserError
from .plan import ModelPlan, register_handler, register_plan


@register_plan
@dataclass(frozen=True)
class PositionTrimPlan(ModelPlan):
    """Keep the first ``rows`` rows of the position table (the model then takes at most ``rows`` tokens)."""

    kind: ClassVar[str] = "positions"
    rows: int


@register_handler(PositionTrimPlan)
@torch.no_grad()
def _trim_positions(model: nn.Module, plan: PositionTrimPlan) -> nn.Module:
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        raise UserError(f"plan step 'positions': {type(model).__name__} has no BERT-style position table "
                        "(embeddings.position_embeddings); drop the step from the plan")
    if not 1 <= plan.rows <= table.num_embeddings:
        raise UserError(f"plan step 'positions': rows={plan.rows}, but the table has {table.num_embeddings} rows; "
                        f"choose 1..{table.num_embeddings}")
    trimmed = nn.Embedding(plan.rows, table.embedding_dim, dtype=table.weight.dtype, device=table.weight.device)
    trimmed.weight.copy_(table.weight[: plan.rows])
    trimmed.weight.requires_grad_(table.weight.requires_grad)
    embeddings.position_embeddings = trimmed
    for name in ("position_ids", "token_type_ids"):
        buffer = getattr(embeddings, name, None)
        if isinstance(buffer, torch.Tensor) and buffer.dim() == 2:
            setattr(embeddings, name, buffer[:, : plan.rows].clone())
    if getattr(model, "config", None) is not None:
        model.config.max_position_embeddings = plan.rows
    return model
