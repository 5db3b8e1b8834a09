"""What a model's task loss reads from its hidden states: second moments of the loss's gradients.

A classifier reads a few directions of each 384-wide hidden state. Measured in those directions (the
empirical Fisher metric), an error that the task cannot see costs nothing, and a compressed model can spend
its capacity on what the task uses: the word-embedding refit (``fitformer.compress.refit``) and the hidden-state
loss of distillation (``hidden_loss="fisher"``, ``fitformer.train.losses``) measure their errors this way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError

# damping of a direction metric: the best of 0.01, 0.1 and 1 for MiniLM's word embedding (docs/tensorized.md)
DIRECTION_DAMPING = 0.01


def direction_metric(second_moment: torch.Tensor, damping: float = DIRECTION_DAMPING) -> torch.Tensor:
    """The ``(d, d)`` matrix ``M`` in which an error ``e`` is measured as ``||e M||``: the symmetric square root
    of ``second_moment`` (``sum g g^T`` of the loss's gradients) scaled to a mean eigenvalue of 1, plus
    ``damping`` times the identity so that no direction is ignored outright. An isotropic error measures
    about as in the plain norm (times ``sqrt(1 + damping)``), so loss weights keep their meaning."""
    if damping <= 0:
        raise UserError(f"damping={damping}: must be > 0 (e.g. 0.01)")
    if second_moment.ndim != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise UserError(f"a direction metric needs a square second moment, got {tuple(second_moment.shape)}")
    f = second_moment.double()
    scale = float(torch.trace(f)) / f.shape[0]
    f = f / scale if scale > 0 else torch.zeros_like(f)
    values, vectors = torch.linalg.eigh(f + damping * torch.eye(f.shape[0], dtype=f.dtype))
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


@dataclass
class LossGradients:
    """One labelled batch's task-loss gradients: ``ids`` and ``mask`` (real tokens) ``(B, L)``, ``rows`` the
    gradient with respect to the looked-up word-embedding rows ``(B, L, hidden)``, and ``hidden_states`` those
    with respect to each hidden state (embedding output first; empty unless asked for)."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] = ()


def task_loss_gradients(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], caller: str,
                        hidden_states: bool = False) -> Iterator[LossGradients]:
    """The gradients of a Hugging Face classifier's cross-entropy (summed over the batch's examples) with
    respect to its looked-up word-embedding rows, and optionally its hidden states, one labelled batch at a
    time; ``model`` is in eval mode meanwhile and left as it was (no gradients accumulate into it).
    ``caller`` names the function in the error for a batch without labels."""
    rows: list[torch.Tensor] = []

    def requires_grad(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        # the loss then depends on a tensor that requires grad, frozen parameters or not
        out = out if out.requires_grad else out.detach().requires_grad_()
        rows.append(out)
        return out

    was_training = model.training
    model.eval()
    hook = model.get_input_embeddings().register_forward_hook(requires_grad)
    try:
        for batch in batches:
            if "labels" not in batch:
                raise UserError(f"{caller} needs labelled batches (a 'labels' entry)")
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            rows.clear()
            with torch.enable_grad():
                out = model(**inputs, output_hidden_states=hidden_states)
                loss = nn.functional.cross_entropy(out.logits, batch["labels"], reduction="sum")
                states = tuple(out.hidden_states) if hidden_states else ()
                grads = torch.autograd.grad(loss, (rows[0], *states))
            mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else \
                torch.ones_like(inputs["input_ids"], dtype=torch.bool)
            yield LossGradients(inputs["input_ids"], mask, grads[0], grads[1:])
    finally:
        hook.remove()
        model.train(was_training)


def hidden_state_fisher(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """``sum g g^T`` over the real (unmasked) tokens of labelled ``batches``, one ``(hidden, hidden)`` float64
    matrix per hidden state of a Hugging Face classifier (embedding output first), where ``g`` is the gradient
    of the task's cross-entropy (summed over examples) with respect to that hidden state at that token.
    ``model`` is left as it was (eval mode during the pass; no gradients accumulate into it)."""
    moments: list[torch.Tensor] = []
    for step in task_loss_gradients(model, batches, "hidden_state_fisher", hidden_states=True):
        if not moments:
            moments = [torch.zeros(g.shape[-1], g.shape[-1], dtype=torch.float64) for g in step.hidden_states]
        for moment, grad in zip(moments, step.hidden_states, strict=True):
            g = grad[step.mask].double()
            moment += g.T @ g
    if not moments:
        raise UserError("hidden_state_fisher got no batches; pass at least one labelled batch")
    return moments
