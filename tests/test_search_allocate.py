"""Per-layer allocation (search.allocate): the hull, the Lagrangian optimality of its plans, the top-up."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitformer.hardware import get_device
from fitformer.models import load_classifier
from fitformer.search import DesignSpace, EncoderShape, SpaceConfig
from fitformer.search.allocate import Choice, _hull, allocate
from fitformer.search.cost import AnalyticCost
from fitformer.search.proxy import CombinedEvaluator, WeightErrorProxy

SHAPE = EncoderShape(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=128)

points = st.lists(st.tuples(st.integers(0, 50), st.floats(0.0, 1.0, allow_nan=False)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(points)
def test_hull_keeps_every_choice_a_price_can_pick(pts):
    """Cheapest first, each next one costs more and loses less, strictly convex (each is the best at some
    price), and at any price the hull's best choice is as good as the best of all choices."""
    choices = [Choice((i,), proxy, float(cost)) for i, (cost, proxy) in enumerate(pts)]
    hull = _hull(choices)
    assert all(a.cost < b.cost and a.proxy > b.proxy for a, b in zip(hull, hull[1:], strict=False))
    slopes = [(a.proxy - b.proxy) / (b.cost - a.cost) for a, b in zip(hull, hull[1:], strict=False)]
    assert all(s > t for s, t in zip(slopes, slopes[1:], strict=False))
    for price in (0.0, 1e-3, 0.01, 0.1, 1.0, 1e3):
        assert min(c.proxy + price * c.cost for c in hull) == pytest.approx(
            min(c.proxy + price * c.cost for c in choices), abs=1e-12)


def test_site_choices_change_one_weight_only():
    space = DesignSpace(SHAPE, SpaceConfig(depths=(1, 2), ranks=(2, 4), bits=(32, 8), max_tt_shapes=2,
                                           sparsities=(0.0, 0.5)))
    genes = space.largest()
    for site in range(space.site_count):
        lo = space.site_slice(site)
        choices = space.site_choices(genes, site)
        assert genes in choices
        assert all(g[: lo.start] == genes[: lo.start] and g[lo.stop:] == genes[lo.stop:] for g in choices)
        layers = [next(x for x in space.decode(g).all_layers() if x.name == space.decode(genes).all_layers()[
            site].name) for g in choices]
        assert len(set(layers)) == len(layers) > 4  # distinct: dense x bits x sparsity, low rank, TT
    shallow = list(genes)
    shallow[0] = 0  # depth 1: the second layer's weights are not searched
    assert space.site_choices(shallow, 6) == []  # the first weight of the second layer


@pytest.fixture(scope="module")
def tiny_problem(tiny_model_dir):
    net, _ = load_classifier(tiny_model_dir, num_labels=2)
    shape = EncoderShape.from_config(net.config)
    space = DesignSpace(shape, SpaceConfig(depths=(1, 2), ranks=(2, 4, 8), tt_cores=2, max_tt_shapes=2,
                                           bits=(32, 8, 4), sparsities=(0.0,), embedding=True))
    evaluate = CombinedEvaluator(AnalyticCost(get_device("raspberry-pi-4"), shape, (1, 16)),
                                 WeightErrorProxy.from_model(net, shape))
    return space, evaluate


def _random_plans(space: DesignSpace, base: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    """Random plans of ``base``'s architecture (its arch genes, random per-weight genes)."""
    rng, arch = np.random.default_rng(0), space.site_slice(0).start
    return [space.canonical(base[:arch] + space.sample(rng)[arch:]) for _ in range(n)]


def test_allocated_plans_are_optimal_for_their_size_and_the_first_fills_the_limit(tiny_problem):
    """Under an additive proxy and size, no plan of the architecture is smaller and better than an allocated
    hull plan (the Lagrangian bound), every plan meets the limit, and the first one cannot take any single
    upgrade that still fits."""
    space, evaluate = tiny_problem
    base = space.largest()

    def metrics(g):
        return evaluate(space.decode(g))

    small, large = metrics(space.most_compressed())["size_bytes"], metrics(base)["size_bytes"]
    limit = small + 0.3 * (large - small)
    plans = allocate(space, evaluate, base, "size_bytes", limit, points=6)
    assert 2 <= len(plans) <= 6
    scored = [metrics(g) for g in plans]
    assert all(space.decode(g).arch == space.decode(base).arch for g in plans)
    assert all(m["size_bytes"] <= limit for m in scored)
    first = scored[0]
    assert first["proxy_loss"] == min(m["proxy_loss"] for m in scored)
    for site in range(space.site_count):
        for g in space.site_choices(plans[0], site):
            m = metrics(g)
            assert m["size_bytes"] > limit or m["proxy_loss"] >= first["proxy_loss"] - 1e-12
    randoms = [metrics(g) for g in _random_plans(space, base, 300)]
    for hull_plan in scored[1:]:
        assert not any(r["size_bytes"] <= hull_plan["size_bytes"] and r["proxy_loss"] < hull_plan["proxy_loss"]
                       - 1e-12 for r in randoms)
    assert first["proxy_loss"] <= min(r["proxy_loss"] for r in randoms if r["size_bytes"] <= limit) + 1e-12


def test_allocation_without_a_limit_spreads_over_the_front_and_an_impossible_one_gives_nothing(tiny_problem):
    space, evaluate = tiny_problem
    base = space.largest()
    plans = allocate(space, evaluate, base, "size_bytes", points=5)
    sizes = [evaluate(space.decode(g))["size_bytes"] for g in plans]
    assert len(plans) == 5 and sizes == sorted(sizes, reverse=True) and sizes[0] > 3 * sizes[-1]
    assert allocate(space, evaluate, base, "size_bytes", limit=1.0) == []
