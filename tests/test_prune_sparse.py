"""Fine-grained balanced sparsity: N:M masks, the HP format and its byte accounting, sparse execution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertForSequenceClassification

from fitformer.compress import CompressionPlan, apply_plan
from fitformer.compress.prune import BalancedSparsityPlan, load_hp_state, model_sparsity, save_hp_state
from fitformer.errors import UserError
from fitformer.layers.sparse import (
    SparseLinear,
    bank_balanced_mask,
    decode_hp,
    encode_hp,
    format_bytes,
    hp_from_dense,
    hp_nbytes,
    index_bits,
    load_hp,
    measure_sparse_crossover,
    nm_holds,
    nm_mask,
    save_hp,
)
from fitformer.models.tiny import tiny_bert_config

nm_pairs = st.sampled_from([(1, 1), (1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 16), (5, 7), (0, 4)])
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), nm=nm_pairs, seed=st.integers(0, 2**16))
def test_nm_mask_holds_for_every_bank_and_keeps_the_largest(rows, cols, nm, seed):
    n, m = nm
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(w, n, m)
    assert mask.shape == w.shape and nm_holds(mask, n, m)
    for r in range(rows):
        for start in range(0, cols, m):
            bank = w[r, start : start + m].abs()
            kept = mask[r, start : start + m]
            if kept.any() and (~kept).any():
                assert bank[kept].min() >= bank[~kept].max()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), nm=nm_pairs, dtype=dtypes, seed=st.integers(0, 2**16))
def test_hp_round_trips_and_counts_its_bytes_exactly(rows, cols, nm, dtype, seed):
    n, m = nm
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    w = w * nm_mask(w, n, m)
    t = hp_from_dense(w, n, m)
    data = encode_hp(t)
    assert len(data) == hp_nbytes(rows, cols, n, m, dtype) == t.nbytes()
    back = decode_hp(data)
    assert back.values.dtype == dtype
    assert torch.equal(back.to_dense(), w)
    assert torch.equal(back.indices, t.indices)


def test_hp_file_size_equals_byte_accounting(tmp_path):
    w = torch.randn(48, 96)
    w = w * nm_mask(w, 2, 4)
    t = hp_from_dense(w, 2, 4)
    path = save_hp(tmp_path / "w.hp", t)
    assert path.stat().st_size == t.nbytes() == 22 + 48 * 24 * 2 * 4 + 48 * 24 * 2 * 2 // 8
    assert torch.equal(load_hp(path).to_dense(), w)


def test_hp_uses_as_few_index_bits_as_the_bank_needs():
    assert [index_bits(m) for m in (1, 2, 4, 5, 8, 16, 17)] == [0, 1, 2, 3, 3, 4, 5]


def test_hp_rejects_unbalanced_or_damaged_input():
    with pytest.raises(UserError):
        hp_from_dense(torch.ones(2, 8), 2, 4)  # 4 of 4 non-zeros per bank
    data = encode_hp(hp_from_dense(torch.zeros(2, 8), 2, 4))
    with pytest.raises(UserError):
        decode_hp(data[:-1])
    with pytest.raises(UserError):
        decode_hp(b"XXXX" + data[4:])
    with pytest.raises(UserError):
        nm_mask(torch.ones(2, 8), 5, 4)


@pytest.mark.parametrize("sparsity,bank", [(0.5, 4), (0.75, 4), (0.75, 16)])
def test_hp_is_smaller_than_csr_and_bsr(sparsity, bank):
    w = torch.randn(384, 1536)
    w = w * bank_balanced_mask(w, sparsity, bank)
    n = round(bank * (1 - sparsity))
    sizes = format_bytes(w, n, bank)
    nnz = int((w != 0).sum())
    assert sizes["dense"] == w.numel() * 4
    assert sizes["csr"] == nnz * 8 + (384 + 1) * 4
    assert sizes["hp"] < 0.7 * sizes["csr"] and sizes["hp"] < sizes["bsr"]


@pytest.mark.parametrize("kernel", ["dense", "csr", "bsr"])
def test_sparse_linear_kernels_agree_with_the_masked_dense_layer(kernel):
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48)
    mask = nm_mask(linear.weight, 2, 4)
    layer = SparseLinear(linear, mask, 2, 4, kernel).eval()
    x = torch.randn(3, 5, 32)
    want = torch.nn.functional.linear(x, linear.weight * mask, linear.bias)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.train()
    y = layer(x)  # training runs the dense masked path and keeps pruned weights at zero gradient
    y.sum().backward()
    assert torch.all(layer.weight.grad[~mask] == 0)


def tiny_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


def test_balanced_plan_applies_saves_and_reloads(tmp_path):
    model = tiny_model()
    plan = CompressionPlan(layers={"*.intermediate.dense": [BalancedSparsityPlan(2, 4, kernel="auto", tokens=64)],
                                   "*.output.dense": [BalancedSparsityPlan(2, 4, kernel="csr")]})
    assert CompressionPlan.from_dict(plan.to_dict()).layers == plan.layers
    sparse = apply_plan(model, plan)
    layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 6 and model_sparsity(sparse) == pytest.approx(0.5)
    assert all(nm_holds(m.mask, 2, 4) for m in layers)
    sizes = save_hp_state(sparse, tmp_path / "hp")
    assert sizes["sparse.hp"] == sum(10 + len(n) + m.to_hp().nbytes() for n, m in sparse.named_modules()
                                     if isinstance(m, SparseLinear))
    again = apply_plan(tiny_model().apply(lambda m: None), plan)
    for p in again.parameters():
        torch.nn.init.normal_(p)
    load_hp_state(again, tmp_path / "hp")
    ids = torch.randint(5, 100, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(again(input_ids=ids).logits, sparse(input_ids=ids).logits)


def test_balanced_plan_rejects_non_linear_layers():
    with pytest.raises(UserError):
        apply_plan(tiny_model(), CompressionPlan(layers={"*.LayerNorm": [BalancedSparsityPlan()]}))


def test_sparse_linear_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    layer = SparseLinear(linear, nm_mask(linear.weight, 1, 4), 1, 4, "csr").eval()
    x = torch.randn(4, 16)
    torch.onnx.export(layer, (x,), str(tmp_path / "s.onnx"), input_names=["x"])
    got = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(got[0], layer(x).numpy(), rtol=1e-5, atol=1e-6)


def test_crossover_is_plain_data_for_the_cost_model():
    rows = measure_sparse_crossover([(32, 64)], [0.5, 0.9], tokens=(16,), repeats=3)
    assert len(rows) == 2
    for row in rows:
        keys = {"out_features", "in_features", "sparsity", "tokens", "dense_ms", "csr_ms", "best", "speedup"}
        assert keys <= set(row)
        assert row["speedup"] >= 1.0 and row[f"{row['best']}_ms"] == min(v for k, v in row.items() if k.endswith("_ms"))


def test_crossover_speedup_reads_the_nearest_measured_case():
    from fitformer.layers.sparse import crossover_speedup

    rows = [{"out_features": 64, "in_features": 64, "sparsity": s, "tokens": 128, "speedup": x}
            for s, x in ((0.5, 1.0), (0.9, 1.0), (0.95, 2.0))]
    assert crossover_speedup(rows, 64, 64, 0.97, 128) == 2.0
    assert crossover_speedup(rows, 64, 64, 0.92, 128) == 1.0
    assert crossover_speedup(rows, 64, 64, 0.3, 128) == 1.0
