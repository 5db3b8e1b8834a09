"""The search's bridge to real models: candidate -> CompressionPlan -> apply_plan, and the proxies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fitformer.compress import apply_plan
from fitformer.errors import UserError
from fitformer.hardware import get_device
from fitformer.layers.tensorize import balanced_modes
from fitformer.models import load_classifier
from fitformer.search import DesignSpace, EncoderShape, SpaceConfig
from fitformer.search.cost import AnalyticCost, device_limits, spec_to_plan
from fitformer.search.proxy import KDProxy, WeightErrorProxy, _rel_quant_error, site_sensitivity
from fitformer.search.space import EMBEDDING_NAME, LayerSpec


def test_candidates_build_and_proxies_rank_the_dense_model_first(tiny_model_dir):
    net, _ = load_classifier(tiny_model_dir, num_labels=2)
    shape = EncoderShape.from_config(net.config)
    space = DesignSpace(shape, SpaceConfig(depths=(1, 2), heads=(2, 4), ffn_sizes=(32, 64), ranks=(2, 4),
                                           tt_cores=2, max_tt_shapes=2, bits=(32, 8), sparsities=(0.0, 0.5),
                                           embedding=False))
    ids = torch.randint(5, net.config.vocab_size, (8, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 2}
    kd, weights = KDProxy(net, shape, [batch]), WeightErrorProxy.from_model(net, shape)
    dense = space.decode(space.largest())
    assert kd(dense)["proxy_loss"] < 1e-6 and weights(dense)["proxy_loss"] == 0.0
    rng = np.random.default_rng(0)
    for _ in range(4):
        spec = space.decode(space.sample(rng))
        plan = spec_to_plan(spec, shape)
        quant = [(x, s) for x in spec.layers for s in plan.layers.get(x.name, []) if s.kind == "quant"]
        assert all(s.intermediates == (x.format != "tt") for x, s in quant)  # TT: float intermediates
        model = apply_plan(net, plan)
        assert model.bert.config.num_hidden_layers == spec.arch.num_layers or len(model.bert.encoder.layer) == \
            spec.arch.num_layers
        assert kd(spec)["proxy_loss"] >= 0.0 and 0.0 < weights(spec)["proxy_loss"] <= 1.0
    cost = AnalyticCost(get_device("raspberry-pi-4"), shape, (1, 16))
    assert cost(dense)["latency_ms"] > 0 and device_limits(get_device("raspberry-pi-4")).bits[0] == 32


def test_weight_proxy_scores_a_quantized_tt_layer_on_its_rounded_cores(tiny_model_dir):
    """4-bit cores lose more than 8-bit ones, which lose more than float ones; at full rank the float TT is
    exact and the rounded one is not, and the 4-bit TT's error exceeds the dense weight's 4-bit rounding."""
    net, _ = load_classifier(tiny_model_dir, num_labels=2)
    shape = EncoderShape.from_config(net.config)
    proxy = WeightErrorProxy.from_model(net, shape)
    name, weight = next((n, w) for n, w in proxy.weights.items() if n.startswith(shape.prefix))
    out_features, in_features = weight.shape
    in_modes, out_modes = balanced_modes(in_features, 2), balanced_modes(out_features, 2)
    full_rank = min(in_modes[0] * out_modes[0], in_modes[1] * out_modes[1])

    def error(bits: int, rank: int) -> float:
        layer = LayerSpec(name, in_features, out_features, "tt", rank, in_modes, out_modes, bits)
        return proxy._factor_error(layer, weight)

    assert error(32, full_rank) < 1e-10 < error(8, full_rank) < error(4, full_rank)
    assert error(32, 2) < error(8, 2) < error(4, 2) <= 1.0 + error(32, 2)
    assert error(4, full_rank) > _rel_quant_error(weight, 4)


def test_weight_proxy_weights_the_embedding_by_token_counts(tiny_model_dir):
    """With token counts, rows the task never uses do not count: two embeddings equal on the used rows
    score the same whatever the unused rows hold (and differ without counts); equal counts change nothing;
    counts of the wrong length are a user error."""
    net, _ = load_classifier(tiny_model_dir, num_labels=2)
    shape = EncoderShape.from_config(net.config)
    table = net.bert.embeddings.word_embeddings.weight
    vocab, hidden = table.shape
    counts = torch.zeros(vocab, dtype=torch.long)
    counts[: vocab // 3] = torch.randint(1, 50, (vocab // 3,), generator=torch.Generator().manual_seed(0))
    in_modes, out_modes = balanced_modes(vocab, 2), balanced_modes(hidden, 2)
    spec = LayerSpec(f"bert.{EMBEDDING_NAME}", vocab, hidden, "tt", 2, in_modes, out_modes, 4)

    def error(model, token_counts=None) -> float:
        return WeightErrorProxy.from_model(model, shape, token_counts)._layer_error(spec)

    noisy, _ = load_classifier(tiny_model_dir, num_labels=2)
    with torch.no_grad():
        noisy.bert.embeddings.word_embeddings.weight[vocab // 3:] *= 50.0
    assert abs(error(net, counts) - error(noisy, counts)) < 1e-6
    assert abs(error(net) - error(noisy)) > 1e-3
    assert abs(error(net, torch.full((vocab,), 7)) - error(net)) < 1e-6
    with pytest.raises(UserError, match="token_counts"):
        error(net, counts[:-1])


def _calibration_batches(net, count: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(5, net.config.vocab_size, (count, 12), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(count) % 2}]


def test_site_sensitivity_is_first_order_and_leaves_the_model_as_it_was(tiny_model_dir):
    """Per unit of error, the loss of a small perturbation barely depends on its size (the first-order
    regime the weighted proxy relies on); the weights are restored bit for bit; the same seed repeats."""
    torch.manual_seed(0)  # the classifier head is drawn at load: without a seed it depends on the tests run before
    net, _ = load_classifier(tiny_model_dir, num_labels=2)
    shape = EncoderShape.from_config(net.config)
    names = [n for n in WeightErrorProxy.from_model(net, shape).weights]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = _calibration_batches(net)
    small = site_sensitivity(net, names, batches, relative_error=0.01)
    large = site_sensitivity(net, names, batches, relative_error=0.04)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert small == site_sensitivity(net, names, batches, relative_error=0.01)
    assert all(v > 0 for v in small.values()), small
    ratios = [large[n] / small[n] for n in names]
    # a loss not divided by the error would give 4, a quadratic one 16 or 1/4; the tiny random model's
    # nonlinearity spreads the ratios over 0.45-1.26 across head seeds (MiniLM: 0.7-1.4)
    assert min(ratios) > 0.4 and max(ratios) < 2.0, ratios
    with pytest.raises(UserError, match="no layer named"):
        site_sensitivity(net, ["bert.nothing"], batches)


def test_weight_proxy_is_the_sensitivity_weighted_mean(tiny_model_dir):
    """All weight on one layer: the proxy is that layer's error; equal weights: the plain mean; measured
    weights: between the layers' smallest and largest error, and different from the plain mean."""
    net, _ = load_classifier(tiny_model_dir, num_labels=2)
    shape = EncoderShape.from_config(net.config)
    space = DesignSpace(shape, SpaceConfig(depths=(2,), heads=(4,), ffn_sizes=(64,), ranks=(2,), tt_cores=2,
                                           max_tt_shapes=1, formats=("lowrank",), bits=(4,), embedding=False))
    spec = space.decode(space.most_compressed())
    plain = WeightErrorProxy.from_model(net, shape)
    names = [x.name for x in spec.layers]
    errors = {n: plain._layer_error(x) for n, x in zip(names, spec.layers, strict=True)}
    one = WeightErrorProxy(plain.weights, shape, sensitivity={n: float(n == names[0]) for n in plain.weights})
    assert one(spec)["proxy_loss"] == pytest.approx(errors[names[0]])
    even = WeightErrorProxy(plain.weights, shape, sensitivity=dict.fromkeys(plain.weights, 3.0))
    assert even(spec)["proxy_loss"] == pytest.approx(plain(spec)["proxy_loss"])
    measured = WeightErrorProxy.from_model(net, shape, batches=_calibration_batches(net))
    assert set(measured.sensitivity) == set(plain.weights)
    output_errors = [measured._layer_error(x) for x in spec.layers]
    assert min(output_errors) <= measured(spec)["proxy_loss"] <= max(output_errors)
    unweighted = WeightErrorProxy(measured.weights, shape, moments=measured.moments)
    assert measured(spec)["proxy_loss"] != pytest.approx(unweighted(spec)["proxy_loss"], rel=1e-6)
    with pytest.raises(UserError, match="sensitivity"):
        WeightErrorProxy(plain.weights, shape, sensitivity=dict.fromkeys(plain.weights, 0.0))


def test_weight_proxy_scores_a_sub_network_layer_as_the_full_model_layer_it_keeps():
    """Depth 2 of 3 keeps the full model's layers 0 and 2 (the ``subnet`` plan's rule), so the lost layer is
    layer 1: the proxy of the dense float sub-network is layer 1's share of the weight (scoring the
    sub-network's layer k as the full model's k would make it layer 2's share, 0.89 here)."""
    from transformers import BertForSequenceClassification

    from fitformer.models import tiny_bert_config

    torch.manual_seed(0)
    net = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=3)).eval()
    shape = EncoderShape.from_config(net.config)
    space = DesignSpace(shape, SpaceConfig(depths=(2, 3), formats=("dense",), bits=(32,), sparsities=(0.0,),
                                           embedding=False))
    full = space.decode(space.largest())
    shallow = next(s for s in (space.decode(space.sample(np.random.default_rng(i))) for i in range(100))
                   if s.arch.num_layers == 2)
    base = WeightErrorProxy.from_model(net, shape)
    weight = {n: 1.0 + 10.0 * (".layer.1." in n) + 100.0 * (".layer.2." in n) for n in base.weights}
    proxy = WeightErrorProxy(base.weights, shape, sensitivity=weight)
    sites = [n for n in base.weights if n.startswith(shape.prefix)]
    lost = sum(weight[n] for n in sites if ".layer.1." in n) / sum(weight[n] for n in sites)
    assert proxy(full)["proxy_loss"] == 0.0
    assert proxy(shallow)["proxy_loss"] == pytest.approx(lost)


def _tiny_net():
    from transformers import BertForSequenceClassification

    from fitformer.models import tiny_bert_config

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


def _padded_batch(net, seed: int = 2) -> dict[str, torch.Tensor]:
    """Eight sequences of 3-12 real tokens padded to 12."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, net.config.vocab_size, (8, 12), generator=g)
    lengths = torch.randint(3, 13, (8,), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.arange(8) % 2}


def _layer_inputs(net, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The real (unpadded) tokens entering layer ``name``, as rows."""
    seen = []
    handle = dict(net.named_modules())[name].register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        net(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    return seen[0][batch["attention_mask"].bool()].double()


def test_input_moments_count_real_tokens_and_give_the_output_error():
    """The moment is the mean of x x^T over real tokens only (padding changes nothing); with it, the proxy's
    rounding and pruning errors are the relative output errors measured on those tokens."""
    from fitformer.search.proxy import _quant_round, _rel_prune_error, input_moments

    net = _tiny_net()
    name = "bert.encoder.layer.0.intermediate.dense"
    batch = _padded_batch(net)
    x = _layer_inputs(net, name, batch)
    moment = input_moments(net, [name], [batch], ridge=0.0)[name]
    assert torch.allclose(moment, x.T @ x / len(x), atol=1e-10)
    garbage = {**batch, "input_ids": torch.where(batch["attention_mask"].bool(), batch["input_ids"], 7)}
    assert torch.allclose(input_moments(net, [name], [garbage], ridge=0.0)[name], moment, atol=1e-10)
    unmasked = {"input_ids": batch["input_ids"]}  # no mask: every position counts
    everything = _layer_inputs(net, name, {**unmasked, "attention_mask": torch.ones_like(batch["input_ids"])})
    assert torch.allclose(input_moments(net, [name], [unmasked], ridge=0.0)[name],
                          everything.T @ everything / len(everything), atol=1e-10)
    w = net.get_submodule(name).weight.detach().double()

    def output_error(approx: torch.Tensor) -> float:
        return float(((x @ (approx - w).T) ** 2).sum() / ((x @ w.T) ** 2).sum())

    assert _rel_quant_error(w, 3, moment) == pytest.approx(output_error(_quant_round(w, 3)), rel=1e-9)
    pruned = w.clone().reshape(w.shape[0], -1, 4)
    pruned.scatter_(-1, pruned.abs().topk(2, dim=-1, largest=False).indices, 0.0)
    assert _rel_prune_error(w, 0.5, moment=moment) == pytest.approx(output_error(pruned.reshape(w.shape)), rel=1e-9)
    assert _rel_prune_error(w, 0.5) != pytest.approx(_rel_prune_error(w, 0.5, moment=moment), rel=1e-3)
    with pytest.raises(UserError, match="no linear layer"):
        input_moments(net, ["bert.embeddings.word_embeddings"], [batch])


def test_output_error_proxy_is_the_weight_proxy_under_white_inputs_and_sees_low_rank_inputs():
    """Identity moments give the weight proxy (to within what fitting the cores of TT layers split over
    several input cores gains on their TT-SVD, never more); inputs confined to k directions make a rank-k
    factorization lossless on the outputs though it loses much of the weight."""
    net = _tiny_net()
    shape = EncoderShape.from_config(net.config)
    plain = WeightErrorProxy.from_model(net, shape)
    white = {n: torch.eye(w.shape[1], dtype=torch.float64) for n, w in plain.weights.items()
             if not n.endswith(EMBEDDING_NAME)}
    whitened = WeightErrorProxy(plain.weights, shape, moments=white)
    space = DesignSpace(shape, SpaceConfig(depths=(1, 2), heads=(2, 4), ffn_sizes=(32, 64), ranks=(2, 4),
                                           tt_cores=2, max_tt_shapes=2, bits=(32, 8, 4), sparsities=(0.0, 0.5),
                                           embedding=False))
    rng = np.random.default_rng(0)
    for _ in range(6):
        spec = space.decode(space.sample(rng))
        white_loss, plain_loss = whitened(spec)["proxy_loss"], plain(spec)["proxy_loss"]
        assert white_loss == pytest.approx(plain_loss, rel=1e-3) and white_loss <= plain_loss + 1e-6

    name = "bert.encoder.layer.0.attention.self.query"
    basis = torch.linalg.qr(torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))[0]
    confined = WeightErrorProxy(plain.weights, shape, moments={name: basis @ basis.T})
    low_rank = LayerSpec(name, 32, 32, "lowrank", 3)
    assert confined._layer_error(low_rank) < 1e-9 < 0.3 < plain._layer_error(low_rank)


def test_a_tt_split_over_several_input_cores_is_scored_by_cores_fitted_to_its_outputs():
    """The score is the output error, on the recorded tokens, of real TT cores of the layer's shape and rank
    (``fit_tt_to_outputs``), rounded per bit width; it is below the TT-SVD's output error (the fit only ever
    improves on it); a TT with a single input core keeps the exact whitened fit."""
    from fitformer.layers.tt import merge_cores, tt_svd
    from fitformer.search.proxy import fit_tt_to_outputs, input_moments

    net = _tiny_net()
    shape = EncoderShape.from_config(net.config)
    name = "bert.encoder.layer.0.intermediate.dense"
    batch = _padded_batch(net)
    x = _layer_inputs(net, name, batch)
    moment = input_moments(net, [name], [batch], ridge=0.0)[name]
    plain = WeightErrorProxy.from_model(net, shape)
    proxy = WeightErrorProxy(plain.weights, shape, moments={name: moment})
    w = plain.weights[name].double()
    out_features, in_features = w.shape
    in_modes, out_modes = balanced_modes(in_features, 3), balanced_modes(out_features, 3)
    assert sum(m > 1 for m in in_modes) > 1

    def output_error(cores) -> float:
        merged = merge_cores([c.double() for c in cores])
        approx = merged.reshape(merged.shape[1], merged.shape[2])[:in_features, :out_features].T
        return float(((x @ (approx - w).T) ** 2).sum() / ((x @ w.T) ** 2).sum())

    cores = fit_tt_to_outputs(w, in_modes, out_modes, 2, moment)
    assert [c.shape[-1] for c in cores[:-1]] == [2, 2]
    layer = LayerSpec(name, in_features, out_features, "tt", 2, in_modes, out_modes, 32)
    score = proxy._factor_error(layer, plain.weights[name])
    assert score == pytest.approx(output_error(cores), rel=1e-4)
    svd_cores, _ = tt_svd(w.T.contiguous(), in_modes, out_modes, max_rank=2)
    assert score < 0.95 * output_error(svd_cores)
    four_bit = proxy._factor_error(LayerSpec(name, in_features, out_features, "tt", 2, in_modes, out_modes, 4),
                                   plain.weights[name])
    assert four_bit > score
    single = LayerSpec(name, in_features, out_features, "tt", 2, (in_features, 1), (1, out_features), 32)
    s = torch.linalg.svdvals(w @ torch.linalg.cholesky(moment + 1e-9 * torch.eye(in_features, dtype=w.dtype)))
    assert proxy._factor_error(single, plain.weights[name]) == pytest.approx(float((s[2:] ** 2).sum() / (s**2).sum()),
                                                                              rel=1e-4)
