"""TT-matrix layers: exactness of TT-SVD, formulas against counted values, every execution equal, gradients."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fitformer.errors import UserError
from fitformer.layers import (
    LowRankLinear,
    Planner,
    TTEmbedding,
    TTLinear,
    bond_ranks,
    choose_tensorization,
    enumerate_shapes,
    full_ranks,
    tt_flops,
    tt_params,
    tt_svd,
)
from fitformer.layers.planner import TTSpec, execution_ops, folded_bias_rows, prepare, run
from fitformer.layers.tensorize import TTShape, batched_result_bytes, chain_ops
from fitformer.layers.tt import lookup_flops

MODEL_PLANNER = Planner(measure=False)


@st.composite
def tt_shapes(draw, max_cores: int = 4, max_mode: int = 4):
    d = draw(st.integers(2, max_cores))
    in_modes = tuple(draw(st.lists(st.integers(1, max_mode), min_size=d, max_size=d)))
    out_modes = tuple(draw(st.lists(st.integers(1, max_mode), min_size=d, max_size=d)))
    inner = draw(st.lists(st.integers(1, 6), min_size=d - 1, max_size=d - 1))
    return in_modes, out_modes, bond_ranks(in_modes, out_modes, inner)


def random_cores(in_modes, out_modes, ranks, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(ranks[k], i, o, ranks[k + 1], generator=g, dtype=dtype)
            for k, (i, o) in enumerate(zip(in_modes, out_modes, strict=True))]


def every_execution(spec, tokens, training=False):
    """The planner's candidates and, for every chain, its twin on the halves of the rows (the planner only
    times twins of its fastest chains, so they are not candidates)."""
    cands = MODEL_PLANNER.candidates(spec, tokens, training)
    return cands + [dataclasses.replace(e, halves=True) for e in cands if e.kind == "chain"]


def dense_of(cores, in_modes, out_modes):
    """Reference: contract all cores with one einsum, independent of the planner's code."""
    w = cores[0]
    for c in cores[1:]:
        w = torch.einsum("aiob,bjpc->aijopc", w, c).reshape(1, w.shape[1] * c.shape[1], w.shape[2] * c.shape[2], -1)
    return w.reshape(math.prod(in_modes), math.prod(out_modes))


@settings(max_examples=15, deadline=None)
@given(tt_shapes(), st.integers(0, 3), st.integers(0, 3))
def test_full_rank_tt_svd_reproduces_dense(shape, pad_in, pad_out):
    in_modes, out_modes, _ = shape
    n_in, n_out = math.prod(in_modes), math.prod(out_modes)
    lin = nn.Linear(max(1, n_in - pad_in), max(1, n_out - pad_out)).double()
    tt = TTLinear.from_linear(lin, in_modes, out_modes, planner=MODEL_PLANNER)
    assert tt.reconstruction_error < 1e-10
    assert tt.ranks[1:-1] <= full_ranks(in_modes, out_modes)[1:-1]
    x = torch.randn(5, lin.in_features, dtype=torch.float64)
    torch.testing.assert_close(tt(x), lin(x), rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(tt(x), lin(x), rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(tt_shapes(), st.integers(1, 9))
def test_every_execution_gives_the_same_output(shape, tokens):
    in_modes, out_modes, ranks = shape
    spec = TTSpec(math.prod(in_modes), math.prod(out_modes), in_modes, out_modes, ranks)
    cores = random_cores(in_modes, out_modes, ranks)
    x = torch.randn(tokens, spec.in_features, dtype=torch.float64)
    expected = x @ dense_of(cores, in_modes, out_modes)
    chosen = MODEL_PLANNER.plan(spec, tokens, torch.float64)
    for training in (False, True):
        for exe in every_execution(spec, tokens, training) + [chosen]:
            y = run(exe, x, prepare(exe, spec, cores), spec)
            torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9, msg=exe.describe())
    # with a bias: inside the last GEMM (addmm, or folded in as rows when that GEMM writes several rows per
    # token), added in the transposing copy, or added in place
    spec_b = dataclasses.replace(spec, bias=True)
    bias = torch.randn(spec.out_features, dtype=torch.float64)
    folds = set()
    for exe in every_execution(spec_b, tokens):
        folds.add(folded_bias_rows(exe, spec_b) > 0)
        for prepared_bias in (bias, None):  # prepared without it, the chain adds it after the GEMMs
            y = run(exe, x, prepare(exe, spec_b, cores, bias=prepared_bias), spec_b, bias=bias)
            torch.testing.assert_close(y, expected + bias, rtol=1e-9, atol=1e-9, msg=exe.describe())
    assert (True in folds) == (math.prod(out_modes[:-1]) > 1)  # left to right the last GEMM writes that many


@settings(max_examples=15, deadline=None)
@given(tt_shapes(), st.integers(1, 7))
def test_param_and_flop_formulas_match_counted_values(shape, tokens):
    in_modes, out_modes, ranks = shape
    tt = TTLinear(math.prod(in_modes), math.prod(out_modes), in_modes, out_modes, ranks, bias=False,
                  planner=MODEL_PLANNER, dtype=torch.float64)
    assert tt_params(in_modes, out_modes, ranks) == sum(p.numel() for p in tt.parameters())
    spec, cores = tt.spec, list(tt.cores)
    x = torch.randn(tokens, spec.in_features, dtype=torch.float64)
    for direction in ("rtl", "ltr"):
        exe = next(e for e in MODEL_PLANNER.candidates(spec, tokens, False)
                   if e.kind == "chain" and e.direction == direction and len(e.groups) == len(in_modes))
        operands = prepare(exe, spec, cores)
        with FlopCounterMode(display=False) as counter:
            run(exe, x, operands, spec)
        assert counter.get_total_flops() == tt_flops(in_modes, out_modes, ranks, tokens, direction)
    # every chain (fused groups, transposed and expanded steps, GEMMs on halves of the rows) counts what it runs
    for exe in every_execution(spec, tokens):
        if exe.kind != "chain":
            continue
        operands = prepare(exe, spec, cores)
        with FlopCounterMode(display=False) as counter:
            run(exe, x, operands, spec)
        run_ops = [op for op in execution_ops(exe, spec, tokens, 8) if op["stage"] == "run"]
        assert sum(op["flops"] for op in run_ops) == counter.get_total_flops(), exe.describe()
    # a folded bias widens the last GEMM by its rows, and the ops count that
    spec_b = dataclasses.replace(spec, bias=True)
    bias = torch.randn(spec.out_features, dtype=torch.float64)
    for exe in every_execution(spec_b, tokens):
        if folded_bias_rows(exe, spec_b):
            operands = prepare(exe, spec_b, cores, bias=bias)
            with FlopCounterMode(display=False) as counter:
                run(exe, x, operands, spec_b, bias=bias)
            run_ops = [op for op in execution_ops(exe, spec_b, tokens, 8) if op["stage"] == "run"]
            assert sum(op["flops"] for op in run_ops) == counter.get_total_flops(), exe.describe()
    # the layer's own report agrees with what its forward counts (core work cached by the first call)
    with torch.no_grad():
        tt(x)
        with FlopCounterMode(display=False) as counter:
            tt(x)
    assert tt.flops(tokens) == counter.get_total_flops()


def test_closed_form_flops_and_enumeration():
    in_modes, out_modes, ranks, t = (4, 6, 8), (8, 8, 12), (1, 5, 7, 1), 3
    closed = 2 * t * sum(math.prod(in_modes[:k]) * ranks[k] * out_modes[k] * in_modes[k] * ranks[k + 1]
                         * math.prod(out_modes[k + 1:]) for k in range(3))
    assert tt_flops(in_modes, out_modes, ranks, t, "rtl") == closed
    shapes = enumerate_shapes(48, 64, 4, num_cores=(2, 3), tokens=16)
    assert shapes and all(math.prod(s.in_modes) == 48 and math.prod(s.out_modes) == 64 for s in shapes)
    assert [s.flops for s in shapes] == sorted(s.flops for s in shapes)
    assert all(s.params == tt_params(s.in_modes, s.out_modes, s.ranks) for s in shapes)
    assert {len(s.in_modes) for s in shapes} == {2, 3}
    for op in chain_ops(in_modes, out_modes, ranks, t):
        assert op["flops"] == 2 * op["batch"] * op["m"] * op["n"] * op["k"]


@settings(max_examples=25, deadline=None)
@given(in_f=st.sampled_from([12, 24, 48, 96]), out_f=st.sampled_from([16, 32, 64, 192]), rank=st.integers(1, 12),
       tokens=st.sampled_from([1, 16, 128]))
def test_a_mirrored_shape_costs_the_same_and_the_choice_writes_least_in_batched_steps(in_f, out_f, rank, tokens):
    """Reversing both mode orders keeps FLOPs, bytes and parameters (the chain runs the other way); among
    such ties choose_tensorization takes the shape whose batched chain steps write the fewest bytes."""
    for shape in enumerate_shapes(in_f, out_f, rank, num_cores=(3,), tokens=tokens)[:6]:
        mirror = TTShape.build(shape.in_modes[::-1], shape.out_modes[::-1], rank, tokens)
        assert (mirror.flops, mirror.bytes, mirror.params) == (shape.flops, shape.bytes, shape.params)
    chosen = choose_tensorization(in_f, out_f, rank, num_cores=(3,), tokens=tokens)
    ties = [s for s in enumerate_shapes(in_f, out_f, rank, num_cores=(3,), tokens=tokens) if s.flops == chosen.flops]
    assert chosen.batched_bytes == min(s.batched_bytes for s in ties)
    assert chosen.batched_bytes == batched_result_bytes(chosen.in_modes, chosen.out_modes, chosen.ranks, tokens,
                                                        chosen.direction)


def test_a_planner_breaks_ties_by_planned_time():
    """With a planner, the tied shape whose plan is fastest wins over the byte rule of thumb; planned_ms is the
    chosen plan's modelled cost when the planner does not measure."""
    in_f, out_f, rank, tokens = 96, 24, 2, 16
    by_bytes = choose_tensorization(in_f, out_f, rank, num_cores=(3,), tokens=tokens)
    ties = [s for s in enumerate_shapes(in_f, out_f, rank, num_cores=(3,), tokens=tokens)[:4]
            if s.flops == by_bytes.flops]
    assert len(ties) > 1

    class Prefers:
        """Stands in for a planner that times the byte rule's first choice slowest."""

        def fastest(self, specs: list[TTSpec], tokens: int) -> int:
            assert all(s.bias and s.ranks == by_bytes.ranks for s in specs) and len(specs) == len(ties)
            return next(i for i, s in enumerate(specs) if s.in_modes != by_bytes.in_modes)

    chosen = choose_tensorization(in_f, out_f, rank, num_cores=(3,), tokens=tokens, planner=Prefers())
    assert chosen in ties and chosen != by_bytes
    planner = Planner(measure=False)
    specs = [TTSpec(in_f, out_f, s.in_modes, s.out_modes, s.ranks, bias=True) for s in ties]
    modelled = [planner.scores(spec, tokens, False)[0][0] * 1e3 for spec in specs]
    assert [planner.planned_ms(spec, tokens) for spec in specs] == pytest.approx(modelled)
    assert planner.fastest(specs, tokens) == modelled.index(min(modelled))
    timed = Planner(measure=True, rounds=1, max_seconds=0.01)
    assert timed.fastest(specs, tokens) in range(len(specs)) and len(timed.cache) == len(specs)


def test_tt_svd_truncation_by_rank_and_error():
    torch.manual_seed(0)
    w = torch.randn(24, 30, dtype=torch.float64)
    cores, err = tt_svd(w, (2, 3, 4), (3, 2, 5), max_rank=3)
    assert max(c.shape[-1] for c in cores) <= 3 and 0 < err < 1
    cores_e, err_e = tt_svd(w, (2, 3, 4), (3, 2, 5), rel_error=0.3)
    assert err_e <= 0.3
    rebuilt = dense_of(cores_e, (2, 3, 4), (3, 2, 5))
    assert abs((rebuilt - w).norm() / w.norm() - err_e) < 1e-9
    _, err_more = tt_svd(w, (2, 3, 4), (3, 2, 5), max_rank=6)
    assert err_more < err
    per_bond, _ = tt_svd(w, (2, 3, 4), (3, 2, 5), max_rank=(2, 5))
    assert [c.shape[-1] for c in per_bond] == [2, 5, 1]


@pytest.mark.parametrize("in_f, out_f, in_modes, out_modes, ranks", [
    (7, 6, (2, 2, 2), (3, 2, 1), (1, 2, 2, 1)),   # input padded 7 -> 8
    (15, 16, (4, 2, 2), (2, 2, 4), (1, 2, 2, 1)),  # has expanded ("e") steps
])
def test_gradcheck_all_executions(in_f, out_f, in_modes, out_modes, ranks):
    spec = TTSpec(in_f, out_f, in_modes, out_modes, ranks, bias=True)
    cores = [c.requires_grad_() for c in random_cores(in_modes, out_modes, ranks)]
    x = torch.randn(2, in_f, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out_f, dtype=torch.float64, requires_grad=True)
    candidates = every_execution(spec, 2, training=True)
    assert in_f != 15 or any("e" in exe.modes for exe in candidates)
    assert any(folded_bias_rows(exe, spec) for exe in candidates)
    for exe in candidates:
        def f(x, b, *cs, exe=exe):  # the bias folded into the last GEMM where the chain allows
            return run(exe, x, prepare(exe, spec, cs, bias=b), spec, bias=b)

        assert torch.autograd.gradcheck(f, (x, bias, *cores), fast_mode=True), exe.describe()


def test_forward_leaves_its_inputs_alone():
    """The bias is added in place to the product, never to the input or the bias itself."""
    tt = TTLinear(16, 16, (4, 2, 2), (2, 2, 4), 2, planner=MODEL_PLANNER, dtype=torch.float64).eval()
    x = torch.randn(3, 16, dtype=torch.float64)
    x0, b0 = x.clone(), tt.bias.detach().clone()
    with torch.no_grad():
        for exe in every_execution(tt.spec, 3):
            run(exe, x, prepare(exe, tt.spec, list(tt.cores), bias=tt.bias), tt.spec, bias=tt.bias)
            assert torch.equal(x, x0) and torch.equal(tt.bias, b0), exe.describe()


def test_layer_gradients_reach_cores_and_bias():
    tt = TTLinear(12, 10, (3, 4), (2, 5), 3, planner=MODEL_PLANNER, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: tt(x), (torch.randn(2, 12, dtype=torch.float64, requires_grad=True),))
    tt(torch.randn(4, 12, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tt.parameters())


def test_embedding_full_rank_lookup_and_gradients():
    emb = nn.Embedding(58, 12, padding_idx=0).double()
    tt = TTEmbedding.from_embedding(emb, (3, 4, 5), (2, 2, 3))  # 60 >= 58: padded vocabulary
    assert tt.reconstruction_error < 1e-10
    ids = torch.tensor([[0, 5, 57, 5], [3, 3, 2, 1]])
    torch.testing.assert_close(tt(ids), emb(ids))
    torch.testing.assert_close(tt.weight, emb.weight)
    tt(ids).pow(2).sum().backward()
    assert all(c.grad is not None for c in tt.cores)
    with pytest.raises(UserError, match="token ids"):
        tt(torch.tensor([58]))
    small = TTEmbedding.from_embedding(emb, (3, 4, 5), (2, 2, 3), max_rank=2)
    assert max(small.ranks) == 2 and small.reconstruction_error > 0


@settings(max_examples=20, deadline=None)
@given(tt_shapes(), st.integers(1, 40))
def test_embedding_lookup_orders_give_the_table_rows_and_gradients(shape, n):
    """First to last and last to first select the same rows of the dense table, with the same core gradients;
    the default order is the one with fewer FLOPs, as :func:`lookup_flops` counts them per product."""
    vocab_modes, hidden_modes, ranks = shape
    tt = TTEmbedding(math.prod(vocab_modes), math.prod(hidden_modes), vocab_modes, hidden_modes, ranks,
                     dtype=torch.float64)
    ids = torch.randint(0, tt.num_embeddings, (n,), generator=torch.Generator().manual_seed(n))
    table = dense_of(list(tt.cores), vocab_modes, hidden_modes)
    grads = []
    for order in (True, False):
        tt.zero_grad()
        rows = tt.rows(ids, left_to_right=order)
        torch.testing.assert_close(rows, table[ids], rtol=1e-10, atol=1e-10)
        (rows * torch.arange(rows.numel(), dtype=torch.float64).reshape(rows.shape)).sum().backward()
        grads.append([c.grad.clone() for c in tt.cores])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    flops = {o: lookup_flops(hidden_modes, tt.ranks, o) for o in (True, False)}
    assert tt.left_to_right() == (flops[True] <= flops[False])
    assert sum(op["flops"] for op in tt.cost_ops(n)) == n * min(flops.values())
    h, r = hidden_modes, tt.ranks  # counted by hand for three cores
    if len(h) == 3:
        assert flops[True] == 2 * (h[0] * r[1] * h[1] * r[2] + h[0] * h[1] * r[2] * h[2])
        assert flops[False] == 2 * (r[1] * h[1] * r[2] * h[2] + h[0] * r[1] * h[1] * h[2])


@pytest.mark.parametrize(("used", "gain"), [([1, 4, 7, 30, 59], 0.5), (list(range(0, 60, 5)), 0.8)],
                         ids=["per-row", "whole-table"])
def test_embedding_fit_rows_spends_rank_on_used_tokens(used, gain):
    """Few ids are fitted through per-row products, many through the merged table: same loss either way."""
    torch.manual_seed(0)
    emb = nn.Embedding(60, 12).double()
    used = torch.tensor(used)
    counts = torch.linspace(50.0, 1.0, len(used), dtype=torch.float64)
    tt = TTEmbedding.from_embedding(emb, (3, 4, 5), (2, 2, 3), max_rank=2)

    def weighted_error(layer: TTEmbedding) -> float:
        with torch.no_grad():
            diff = (layer.rows(used) - emb.weight[used]).pow(2).sum(1)
            return math.sqrt(float((counts * diff).sum() / (counts * emb.weight[used].pow(2).sum(1)).sum()))

    before = weighted_error(tt)
    assert tt.fit_rows(emb.weight, used, counts, steps=0) == pytest.approx(before)
    after = tt.fit_rows(emb.weight, used, counts, steps=400, lr=1e-2)
    assert after == pytest.approx(weighted_error(tt)) and after < gain * before
    with pytest.raises(UserError, match="token ids"):
        tt.fit_rows(emb.weight, torch.tensor([60]))
    with pytest.raises(UserError, match="target table"):
        tt.fit_rows(emb.weight[:10], used)
    with pytest.raises(UserError, match="weights"):
        tt.fit_rows(emb.weight, used, counts[:2])


def test_embedding_fit_rows_in_a_metric_keeps_the_directions_it_reads():
    """Measured in a metric that reads two hidden directions, the fit keeps those (and reports its error in
    that metric); measured plainly, it spreads the rank over all of them."""
    torch.manual_seed(0)
    emb = nn.Embedding(64, 16)
    ids = torch.arange(64)
    metric = torch.full((16,), 0.03)
    metric[:2] = 1.0
    metric = torch.diag(metric)  # reads hidden directions 0 and 1

    def fitted(m: torch.Tensor | None) -> tuple[float, float]:
        tt = TTEmbedding.from_embedding(emb, (4, 4, 4), (2, 2, 4), max_rank=4)
        reported = tt.fit_rows(emb.weight, ids, steps=500, lr=1e-2, metric=m)
        with torch.no_grad():
            read = float((tt.weight[:, :2] - emb.weight[:, :2]).norm() / emb.weight[:, :2].norm())
            m = torch.eye(16) if m is None else m
            assert reported == pytest.approx(float(((tt.weight - emb.weight) @ m).norm() / (emb.weight @ m).norm()),
                                             rel=1e-4)
        return read, reported

    assert fitted(metric)[0] < 0.6 * fitted(None)[0]
    with pytest.raises(UserError, match="metric is"):
        TTEmbedding.from_embedding(emb, (4, 4, 4), (2, 2, 4), max_rank=4).fit_rows(emb.weight, ids, metric=metric[:3])


def test_low_rank_linear():
    lin = nn.Linear(20, 30).double()
    x = torch.randn(4, 20, dtype=torch.float64)
    full = LowRankLinear.from_linear(lin, 20)
    torch.testing.assert_close(full(x), lin(x))
    errs = [LowRankLinear.from_linear(lin, r).reconstruction_error for r in (2, 5, 10)]
    assert errs == sorted(errs, reverse=True)
    low = LowRankLinear.from_linear(lin, 5)
    assert sum(op["flops"] for op in low.cost_ops(7, training=True)) == 2 * 7 * 5 * (20 + 30)
    assert ((lin.weight - low.weight).norm() / lin.weight.norm()).item() == pytest.approx(low.reconstruction_error)


def test_low_rank_folds_the_bias_at_inference():
    low = LowRankLinear.from_linear(nn.Linear(20, 30).double(), 5)
    x = torch.randn(2, 4, 20, dtype=torch.float64)
    ref = low(x)  # the factors need gradients: two F.linear calls
    with torch.no_grad():
        torch.testing.assert_close(low(x), ref)
        with FlopCounterMode(display=False) as counter:
            low(x)
        assert counter.get_total_flops() == sum(op["flops"] for op in low.cost_ops(8))
        low.bias.add_(1.0)  # the folded copy follows the bias
        torch.testing.assert_close(low(x), ref + 1)
        low.intermediate_quant = Counter()
        torch.testing.assert_close(low(x), ref + 1)
    assert low.intermediate_quant.calls == 1


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, t):
        self.calls += 1
        return t


def test_quantization_hooks():
    torch.manual_seed(0)
    tt = TTLinear(24, 24, (2, 3, 4), (4, 3, 2), 3, planner=MODEL_PLANNER)
    x = torch.randn(5, 24)
    ref = tt(x)
    tt.intermediate_quant = Counter()
    torch.testing.assert_close(tt(x), ref)
    assert tt.intermediate_quant.calls >= 1
    tt.intermediate_quant = None

    class Halve(nn.Module):
        def forward(self, c):
            return c * 0.5

    torch.nn.utils.parametrize.register_parametrization(tt.cores, "0", Halve())
    torch.testing.assert_close(tt(x) - tt.bias, (ref - tt.bias) * 0.5)
    with torch.no_grad():  # the inference cache must not hide the parametrization
        torch.testing.assert_close(tt(x) - tt.bias, (ref - tt.bias) * 0.5)

    class Scaled(TTLinear):
        def effective_cores(self):
            return [c * 2 for c in self.cores]

    s = Scaled(24, 24, (2, 3, 4), (4, 3, 2), 3, bias=False, planner=MODEL_PLANNER)
    plain = TTLinear(24, 24, (2, 3, 4), (4, 3, 2), 3, bias=False, planner=MODEL_PLANNER)
    plain.load_state_dict(s.state_dict())
    torch.testing.assert_close(s(x), plain(x) * 8)


def test_inference_cache_follows_weight_updates():
    tt = TTLinear(12, 12, (3, 4), (4, 3), 4, planner=MODEL_PLANNER)
    x = torch.randn(3, 12)
    with torch.no_grad():
        before = tt(x)
        tt.cores[0].mul_(2)
        torch.testing.assert_close(tt(x) - tt.bias, (before - tt.bias) * 2)
        tt.cores[1] = nn.Parameter(tt.cores[1] * 3)  # a new tensor, not an in-place update
        torch.testing.assert_close(tt(x) - tt.bias, (before - tt.bias) * 6)
        tt.intermediate_quant = Counter()  # a hook set after a cached call is honoured
        tt(x)
        assert tt.intermediate_quant.calls >= 1


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="cover"):
        TTLinear(100, 10, (3, 3), (2, 5))
    with pytest.raises(UserError, match="same length"):
        TTLinear(12, 10, (3, 4), (2, 5, 1))
    with pytest.raises(UserError, match="ranks"):
        TTLinear(12, 10, (3, 4), (2, 5), ranks=(2, 2, 2))
    with pytest.raises(UserError, match="features"):
        TTLinear(12, 10, (3, 4), (2, 5))(torch.randn(2, 11))
    with pytest.raises(UserError, match="rel_error"):
        tt_svd(torch.randn(4, 4), (2, 2), (2, 2), rel_error=1.5)


def test_inference_cache_is_per_token_bucket_and_follows_data_swaps_and_planners():
    tt = TTLinear(12, 12, (3, 4), (4, 3), 4, planner=MODEL_PLANNER)
    x = torch.randn(40, 12)
    with torch.no_grad():
        tt(torch.randn(3, 12))
        assert tt._cache is not None and tt._cache.high == 16
        before = tt(x)  # another token bucket: planned again
        assert tt._cache.high == 64
        bias = tt.bias.detach().clone()
        tt.cores[1].data = tt.cores[1].data * 3  # new storage under the same parameter objects
        tt.bias.data = torch.zeros(12)
        torch.testing.assert_close(tt(x), (before - bias) * 3)
        cache = tt._cache
        tt.planner = Planner(measure=False)  # another planner plans again
        torch.testing.assert_close(tt(x), (before - bias) * 3)
        assert tt._cache is not cache and tt._cache.planner is tt.planner
        assert tt(x.reshape(5, 8, 12)).shape == (5, 8, 12)  # leading dimensions kept on a cache hit


def test_a_cache_hit_runs_every_execution_as_planned_on_padded_layers():
    """The prebuilt runner of a cached plan (padding, bias inside the GEMM, folded or added) gives what an
    uncached call gives, for every candidate of a layer whose modes pad both sizes."""
    torch.manual_seed(0)
    tt = TTLinear(22, 23, (4, 6), (8, 3), 2, planner=MODEL_PLANNER, dtype=torch.float64).eval()
    x = torch.randn(6, 22, dtype=torch.float64)
    with torch.no_grad():
        expected = F.linear(x, tt.weight, tt.bias)
        for exe in every_execution(tt.spec, 6):
            class Fixed(Planner):
                def plan(self, spec, tokens, dtype=torch.float32, training=False, exe=exe):
                    return exe
            tt.planner = Fixed(measure=False)
            miss, hit = tt(x), tt(x.reshape(2, 3, 22))
            assert tt._cache is not None and tt._cache.exe == exe
            torch.testing.assert_close(miss, expected, msg=exe.describe())
            torch.testing.assert_close(hit.reshape(6, 23), expected, msg=exe.describe())
