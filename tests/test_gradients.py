"""Second moments of the task loss's gradients at a model's hidden states, and the metric made from them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertForSequenceClassification

from fitformer.errors import UserError
from fitformer.models import tiny_bert_config
from fitformer.models.gradients import direction_metric, hidden_state_fisher


def labelled_batches(vocab: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[:2, 8:] = 0  # padding must not count
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.randint(0, 2, (4,), generator=g)})
    return out


@pytest.fixture(scope="module")
def model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(hidden_size=32, intermediate_size=64)).eval()


def test_hidden_state_fisher_sums_the_outer_products_of_the_loss_gradients_at_real_tokens(model):
    data = labelled_batches(model.config.vocab_size)
    moments = hidden_state_fisher(model, data)
    assert len(moments) == model.config.num_hidden_layers + 1
    expected = [torch.zeros_like(m) for m in moments]
    for b in data:  # the same gradients with every parameter trainable, taken by hand
        inputs = {k: v for k, v in b.items() if k != "labels"}
        out = model(**inputs, output_hidden_states=True)
        loss = torch.nn.functional.cross_entropy(out.logits, b["labels"], reduction="sum")
        grads = torch.autograd.grad(loss, out.hidden_states)
        for e, g in zip(expected, grads, strict=True):
            g = g[b["attention_mask"].bool()].double()
            e += g.T @ g
    for got, want in zip(moments, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)
    assert all(float(torch.trace(m)) > 0 for m in moments)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    with pytest.raises(UserError, match="labels"):
        hidden_state_fisher(model, [{k: v for k, v in data[0].items() if k != "labels"}])
    with pytest.raises(UserError, match="no batches"):
        hidden_state_fisher(model, [])


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 12), st.integers(1, 6), st.floats(1e-3, 1.0))
def test_direction_metric_is_symmetric_and_weighs_read_directions_over_unread_ones(width, read, damping):
    g = torch.randn(50, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    g[:, min(read, width - 1):] = 0  # the loss never reads the last directions
    metric = direction_metric(g.T @ g, damping)
    torch.testing.assert_close(metric, metric.T)
    squared = metric @ metric  # the scaled second moment plus the damping
    torch.testing.assert_close(torch.trace(squared) / width, torch.tensor(1 + damping, dtype=torch.float64))
    unread = torch.zeros(width, dtype=torch.float64)
    unread[-1] = 1
    assert float((unread @ metric).norm()) == pytest.approx(damping ** 0.5)  # only the damping sees it
    assert float(torch.linalg.eigvalsh(metric).min()) > 0
    with pytest.raises(UserError, match="damping"):
        direction_metric(g.T @ g, 0.0)
    with pytest.raises(UserError, match="square"):
        direction_metric(g, damping)
