"""Data-aware refit of factorized layers: fit each one to what its dense original computes on real inputs.

TT-SVD minimises the error of the *weights*; what matters is the error of the *outputs* on the inputs the
layer actually sees, which live in a small part of the input space. At the ranks that make a Transformer
10x smaller, a TT-SVD student of MiniLM predicts one class for every input, and distillation spends most of
its budget getting back to where a better start would have put it. :func:`refit_factorized` runs the dense
teacher over a few calibration batches, records what every linear layer the student has factorized outputs
there (real tokens only), and fits each factorized layer to those outputs (Adam on the relative squared
error), in order, on the inputs the student itself gives it once the layers before it are refit. A word
embedding stored as a TT-matrix is refit first, to the rows the calibration tokens use, weighted by how often
they occur (:meth:`~fitformer.layers.TTEmbedding.fit_rows`), or by how much the task loss depends on them, and
measured in the directions the task loss reads (:func:`embedding_fisher`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import UserError
from ..layers.lowrank import LowRankLinear
from ..layers.tt import TTEmbedding, TTLinear
from ..models.activations import record_layer_inputs
from ..models.gradients import DIRECTION_DAMPING, direction_metric, task_loss_gradients

FACTORIZED = (TTLinear, LowRankLinear)


@dataclass
class RefitReport:
    """Relative output error of each refit layer before and after (embedding: weighted row error)."""

    before: dict[str, float]
    after: dict[str, float]
    tokens: int

    def summary(self) -> str:
        if not self.after:
            return "no factorized layer to refit"
        return (f"refit {len(self.after)} layers on {self.tokens} tokens: mean relative output error "
                f"{statistics.fmean(self.before.values()):.3f} -> {statistics.fmean(self.after.values()):.3f}")


@dataclass
class EmbeddingFisher:
    """What the teacher's task loss reads from its word embedding, measured by :func:`embedding_fisher`.

    ``rows`` ``(vocab,)``: per token id, the squared norm of the loss's gradient with respect to the looked-up
    row, summed over the id's occurrences (its empirical Fisher information); ``occurrences`` ``(vocab,)``: how
    many occurrences that is; ``directions`` ``(hidden, hidden)``: the gradients' second moment over all
    occurrences, ``sum g g^T``, which says which directions of the hidden space the loss is sensitive to.
    """

    rows: torch.Tensor
    occurrences: torch.Tensor
    directions: torch.Tensor

    def row_weights(self, token_counts: torch.Tensor) -> torch.Tensor:
        """Row weights for the embedding refit: each id's count in the task's text times its Fisher
        information per occurrence, shrunk towards the sample's mean per occurrence by one pseudo-occurrence,
        so that an id the sample missed weighs its count times the mean rather than nothing. Zero exactly
        where the count is zero."""
        if token_counts.shape != self.rows.shape:
            raise UserError(f"token_counts has shape {tuple(token_counts.shape)}; the Fisher information has "
                            f"one entry per id, {tuple(self.rows.shape)}")
        total = float(self.occurrences.sum())
        mean = float(self.rows.sum()) / total if total else 1.0
        return token_counts.double() * (self.rows + mean) / (self.occurrences + 1.0)

    def metric(self, damping: float = DIRECTION_DAMPING) -> torch.Tensor:
        """The ``(hidden, hidden)`` matrix ``M`` in which the refit measures a row's error, ``||(e - e') M||``:
        the symmetric square root of ``directions`` scaled to a mean eigenvalue of 1, plus ``damping`` times
        the identity so that no direction is ignored outright.

        Why: a task reads a few directions of a 384-wide embedding; measured in this metric, a rank-32 TT of
        MiniLM's table keeps what the classifier uses (put into the dense teacher untrained, it scores 0.78
        against 0.62 when fitted in the plain metric, docs/tensorized.md)."""
        return direction_metric(self.directions, damping)


def embedding_fisher(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> EmbeddingFisher:
    """The empirical Fisher information of ``model``'s word embedding on labelled ``batches`` (which carry
    ``labels``): per token id and per hidden direction (:class:`EmbeddingFisher`), from the gradient of the task
    loss with respect to each looked-up row at real (unmasked) tokens. ``model`` is left as it was (no
    gradients are accumulated into it).

    Why: a task reads a few of its tokens far more than their counts say (FWSVD, Hsu et al. 2022), and a few
    directions of each row; a compressed table fitted to what the task reads keeps more of it.
    """
    embedding = model.get_input_embeddings()
    vocab, hidden = embedding.num_embeddings, embedding.embedding_dim
    fisher = torch.zeros(vocab, dtype=torch.float64)
    seen = torch.zeros(vocab, dtype=torch.float64)
    directions = torch.zeros(hidden, hidden, dtype=torch.float64)
    for step in task_loss_gradients(model, batches, "embedding_fisher"):
        ids, grads = step.ids[step.mask], step.rows[step.mask].double()
        fisher.index_add_(0, ids, grads.pow(2).sum(-1))
        seen.index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))
        directions += grads.T @ grads
    return EmbeddingFisher(fisher, seen, directions)


def _collect_inputs(teacher: nn.Module, names: list[str], batches: Iterable[dict[str, torch.Tensor]],
                    max_tokens: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs of the teacher's layers ``names`` at real (unmasked) tokens, at most ``max_tokens`` of each,
    and every calibration token id."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    ids = record_layer_inputs(teacher, names, batches, lambda name, rows: seen[name].append(rows))
    if not ids:
        raise UserError("refit got no calibration batches; pass at least one batch of inputs")

    def sample(rows: torch.Tensor) -> torch.Tensor:  # the same seed: the same tokens for every per-token layer
        return rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]]

    return {n: sample(torch.cat(v)) for n, v in seen.items()}, torch.cat(ids)


def _fit_linear(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
                batch_tokens: int, generator: torch.Generator, max_seconds: float | None = None) -> tuple[float, float]:
    """Adam on ``||layer(x) - y||^2 / ||y||^2`` over minibatches of tokens, stopping early after
    ``max_seconds``; returns the error before and after (the starting weights are kept if the fit
    ends worse than it began)."""
    scale = y.pow(2).sum().clamp_min(1e-30)
    start = {k: v.detach().clone() for k, v in layer.state_dict().items()}

    def error() -> float:
        with torch.no_grad():
            return float(((layer(x) - y).pow(2).sum() / scale).sqrt())

    before = error()
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    n = x.shape[0]
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    for _ in range(steps):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        idx = torch.randint(0, n, (min(batch_tokens, n),), generator=generator)
        loss = (layer(x[idx]) - y[idx]).pow(2).sum() / y[idx].pow(2).sum().clamp_min(1e-30)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = error()
    if after > before:
        layer.load_state_dict(start)
        return before, before
    return before, after


def refit_factorized(student: nn.Module, teacher: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                     steps: int = 200, lr: float = 1e-3, max_tokens: int = 8192, batch_tokens: int = 1024,
                     embedding_steps: int = 300, token_counts: torch.Tensor | None = None,
                     row_weights: torch.Tensor | None = None, embedding_metric: torch.Tensor | None = None,
                     inputs: Literal["student", "teacher"] = "student", seed: int = 0,
                     max_seconds: float | None = None) -> RefitReport:
    """Fit every factorized layer of ``student`` (made by ``apply_plan`` from ``teacher``, so layer names
    match) to what the teacher's dense layer outputs on the teacher's inputs from ``batches``; in place. Layers
    whose sizes differ from the teacher's (pruned, or in a narrower sub-network) are left as they are.

    ``inputs`` says what each layer is fed while it is fitted. ``"student"`` (the default) fits the layers in
    order, the word embedding first, each on the inputs the student computes with the layers before it already
    refit, so a layer also corrects the error that reaches it (as GPTQ quantizes layer by layer); ``"teacher"``
    fits every layer on the teacher's own inputs, independently. Why: fitted independently, MiniLM's size plan
    (50x smaller) starts distillation at 0.712 validation accuracy, because each layer is fitted to inputs the
    student never gives it; in order, at 0.795 (docs/tensorized.md). It costs one pass of the student over
    ``batches`` per layer.

    ``steps`` Adam steps of ``batch_tokens`` tokens per layer, on at most ``max_tokens`` recorded tokens;
    ``embedding_steps`` for a TT word embedding (0 leaves it as it is), fitted to the rows in
    ``token_counts`` (how often each id occurs in the task's training text, e.g.
    ``EncodedDataset.token_counts``; default: the calibration tokens), which should cover the vocabulary
    the task uses, since rows left out drift as the shared cores change; ``row_weights`` (one non-negative
    number per id, e.g. :meth:`EmbeddingFisher.row_weights`) weighs those rows instead of their counts, and
    ``embedding_metric`` (``(hidden, hidden)``, e.g. :meth:`EmbeddingFisher.metric`) measures their error in the
    directions the task reads instead of the plain one (:meth:`~fitformer.layers.TTEmbedding.fit_rows`). Run it before
    quantization and distillation: it starts them from outputs close to the teacher's instead of from TT-SVD's.

    ``max_seconds`` bounds the fitting time (recording the teacher's inputs not included; the student's, with
    ``inputs="student"``, are): each layer gets an equal share of what is left when it starts, so a slow
    machine fits every layer for fewer steps rather than some not at all.
    """
    if steps < 0 or embedding_steps < 0 or max_tokens < 1 or batch_tokens < 1:
        raise UserError("refit needs steps >= 0, embedding_steps >= 0, max_tokens >= 1 and batch_tokens >= 1")
    if max_seconds is not None and max_seconds <= 0:
        raise UserError(f"refit max_seconds={max_seconds}: must be > 0 (or None for no limit)")
    if inputs not in ("student", "teacher"):
        raise UserError(f"refit inputs={inputs!r}: use 'student' (layers in order, on the student's inputs) "
                        "or 'teacher'")
    dense = dict(teacher.named_modules())
    # only layers that compute the same function as the teacher's (a pruned or narrower sub-network's do not)
    linears = {n: m for n, m in student.named_modules()
               if isinstance(m, FACTORIZED) and isinstance(dense.get(n), nn.Linear)
               and (m.in_features, m.out_features) == (dense[n].in_features, dense[n].out_features)}
    embeddings = {n: m for n, m in student.named_modules()
                  if isinstance(m, TTEmbedding) and isinstance(dense.get(n), nn.Embedding)
                  and tuple(dense[n].weight.shape) == (m.num_embeddings, m.embedding_dim)}
    if not linears and not embeddings:
        return RefitReport({}, {}, 0)
    for name, emb in embeddings.items():
        for what, given in (("token_counts", token_counts), ("row_weights", row_weights)):
            if given is not None and given.numel() != emb.num_embeddings:
                raise UserError(f"{what} has {given.numel()} entries; layer '{name}' has a vocabulary "
                                f"of {emb.num_embeddings}")
    if row_weights is not None and bool((row_weights < 0).any()):
        raise UserError("row_weights must be non-negative")
    batches = list(batches)  # passed over once per layer with inputs="student"
    teacher_inputs, ids = _collect_inputs(teacher, list(linears), batches, max_tokens, seed)
    generator = torch.Generator().manual_seed(seed)
    end = None if max_seconds is None else time.perf_counter() + max_seconds
    jobs = len(linears) + (len(embeddings) if embedding_steps else 0)

    def share(done: int) -> float | None:
        """Seconds for the next layer: an equal part of what is left of the budget."""
        return None if end is None else max(0.0, end - time.perf_counter()) / (jobs - done)

    before, after = {}, {}
    was_training = student.training
    student.train()  # recording the student's inputs puts it back in this mode after each pass
    with torch.enable_grad():
        done = 0
        if embedding_steps:  # first: with inputs="student", every layer after it sees the refit embedding
            for name, emb in embeddings.items():
                counts = torch.bincount(ids, minlength=emb.num_embeddings) if token_counts is None else token_counts
                used = counts.nonzero().squeeze(1)
                weights = (counts if row_weights is None else row_weights)[used].double()
                target = dense[name].weight
                before[name] = emb.fit_rows(target, used, weights, steps=0, metric=embedding_metric)
                after[name] = emb.fit_rows(target, used, weights, steps=embedding_steps, max_seconds=share(done),
                                           metric=embedding_metric)
                done += 1
        for name, layer in linears.items():  # in module order: each layer after those that feed it
            x = teacher_inputs.pop(name)
            with torch.no_grad():
                y = dense[name](x)
            if inputs == "student":  # the same tokens as the teacher's rows: the same batches and sampling seed
                x = _collect_inputs(student, [name], batches, max_tokens, seed)[0][name]
            before[name], after[name] = _fit_linear(layer, x, y, steps, lr, batch_tokens, generator, share(done))
            done += 1
    student.train(was_training)
    return RefitReport(before, after, min(max_tokens, int(ids.numel())))
