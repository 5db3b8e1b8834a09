"""Distillation losses, the layer map, schedules, resume and the step hook, on tiny random BERTs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from transformers import BertForSequenceClassification

from fitformer.data import encode, split_dataset
from fitformer.errors import UserError
from fitformer.io import read_json
from fitformer.models import load_classifier, tiny_bert_config
from fitformer.models.hf import eager_attention
from fitformer.train import DistillConfig, DistillData, LayerMap, LossWeights, build_stages, distill
from fitformer.train.augment import IGNORE_LABEL, NeighbourSwap, word_dropout
from fitformer.train.average import WeightAverage
from fitformer.train.distill import forward_outputs, truncated
from fitformer.train.evaluate import evaluate
from fitformer.train.losses import (
    attention_kl,
    hidden_cosine,
    hidden_mse,
    intermediate_loss,
    logits_kl,
    prediction_loss,
    teacher_layer,
)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, sentiment_data):
    torch.manual_seed(0)
    teacher, tokenizer = load_classifier(tiny_model_dir, num_labels=2)
    splits = split_dataset(sentiment_data, seed=0)
    data = DistillData(encode(tokenizer, splits.train, 32), encode(tokenizer, splits.validation, 32),
                       sentiment_data.label_names)
    return teacher, data


def small_student(teacher, layers=1, width=16, heads=2, seed=1):
    torch.manual_seed(seed)
    config = tiny_bert_config(vocab_size=teacher.config.vocab_size, num_hidden_layers=layers, hidden_size=width,
                              num_attention_heads=heads, intermediate_size=2 * width)
    return BertForSequenceClassification(config)


def outputs(model, batch):
    with eager_attention(model):
        return forward_outputs(model, batch, True, True)


def test_every_loss_is_zero_when_the_student_is_the_teacher(setup):
    teacher, data = setup
    batch = data.train.batch(torch.arange(8))
    t = outputs(teacher, batch)
    s = outputs(copy.deepcopy(teacher), batch)
    mask = batch["attention_mask"]
    assert len(t.attentions) == teacher.config.num_hidden_layers  # eager attention returns probabilities
    layer_map = LayerMap.infer(s, t)
    assert len(layer_map.projections) == 0
    layers = tuple(range(layer_map.student_depth + 1))
    width = teacher.config.hidden_size
    layer_map.measure_in([torch.eye(width)] * (layer_map.teacher_depth + 1))
    for kind in ("mse", "cosine", "fisher"):
        parts = intermediate_loss(s, t, layer_map, mask, layers, LossWeights(hidden_loss=kind))
        assert set(parts) == {"embedding", "hidden", "attention"}
        for name, value in parts.items():
            assert value.item() == pytest.approx(0.0, abs=1e-6), (kind, name)
    for temperature in (1.0, 4.0):
        assert logits_kl(s.logits, t.logits, temperature).item() == pytest.approx(0.0, abs=1e-6)
    # the task loss of a perfect predictor (logits agreeing with the labels by a wide margin) is zero too
    labels = batch["labels"]
    confident = torch.nn.functional.one_hot(labels, 2).float() * 50
    parts = prediction_loss(confident, confident, labels, LossWeights(), True, True)
    assert float(parts["task"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["logits"]) == pytest.approx(0.0, abs=1e-6)


def test_losses_are_positive_for_different_models_and_ignore_padding(setup):
    teacher, data = setup
    batch = data.train.batch(torch.arange(8))
    batch["attention_mask"][:4, -3:] = 0  # pad the end of half the rows
    mask = batch["attention_mask"]
    with torch.no_grad():
        t = outputs(teacher, batch)
        s = outputs(small_student(teacher, layers=2, width=32, heads=4), batch)
    assert float(hidden_mse(s.hidden_states[1], t.hidden_states[1], mask)) > 0
    assert float(hidden_cosine(s.hidden_states[1], t.hidden_states[1], mask)) > 0
    assert float(attention_kl(s.attentions[0], t.attentions[0], mask)) > 0
    # changing padded positions does not change a masked loss
    noisy = s.hidden_states[1] + (1 - mask)[..., None] * 100.0
    assert float(hidden_mse(noisy, t.hidden_states[1], mask)) == pytest.approx(
        float(hidden_mse(s.hidden_states[1], t.hidden_states[1], mask)), rel=1e-5)


def test_the_fisher_hidden_loss_is_the_mse_measured_in_each_teacher_state_metric(setup):
    teacher, data = setup
    batch = data.train.batch(torch.arange(8))
    mask = batch["attention_mask"]
    with torch.no_grad():
        t = outputs(teacher, batch)
        s = outputs(small_student(teacher, layers=1, width=teacher.config.hidden_size, heads=2), batch)
    layer_map = LayerMap.infer(s, t)
    weights = LossWeights(attention=0.0, hidden_loss="fisher")
    with pytest.raises(UserError, match="measure_in"):
        intermediate_loss(s, t, layer_map, mask, (0, 1), weights)
    width = teacher.config.hidden_size
    with pytest.raises(UserError, match="one per hidden state"):
        layer_map.measure_in([torch.eye(width)])
    with pytest.raises(UserError, match="width"):
        layer_map.measure_in([torch.eye(width + 1)] * (layer_map.teacher_depth + 1))
    # the identity metric gives the plain mse; a metric reading one direction, that direction's error alone
    layer_map.measure_in([torch.eye(width)] * (layer_map.teacher_depth + 1))
    plain = intermediate_loss(s, t, layer_map, mask, (0, 1), dataclasses.replace(weights, hidden_loss="mse"))
    for name, value in intermediate_loss(s, t, layer_map, mask, (0, 1), weights).items():
        torch.testing.assert_close(value, plain[name])
    first = torch.zeros(width, width)
    first[0, 0] = 1.0
    layer_map.measure_in([first] * (layer_map.teacher_depth + 1))
    deep = layer_map.teacher_index(1)
    expected = hidden_mse(s.hidden_states[1][..., :1], t.hidden_states[deep][..., :1], mask) / width
    torch.testing.assert_close(intermediate_loss(s, t, layer_map, mask, (1,), weights)["hidden"], expected)


def test_distillation_with_the_fisher_hidden_loss_measures_each_state_in_the_teacher_metric(setup, tmp_path,
                                                                                          monkeypatch):
    import importlib

    distill_module = importlib.import_module("fitformer.train.distill")  # the package exports a function by that name
    teacher, data = setup
    measured = []
    real = distill_module._hidden_metrics
    monkeypatch.setattr(distill_module, "_hidden_metrics", lambda *args: measured.append(real(*args)) or measured[-1])
    student = small_student(teacher, layers=1, width=teacher.config.hidden_size, heads=2)
    config = DistillConfig(schedule="two_stage", max_steps=4, batch_size=8, eval_every_steps=100,
                           hidden_loss="fisher", fisher_examples=16)
    result = distill(student, teacher, data, config, tmp_path / "run")
    assert result.steps == 4 and [s["name"] for s in result.stages] == ["intermediate", "logits"]
    assert len(measured) == 1 and len(measured[0]) == teacher.config.num_hidden_layers + 1
    again = small_student(teacher, layers=1, width=teacher.config.hidden_size, heads=2)
    assert distill(again, teacher, data, config, tmp_path / "run").steps == 4
    assert len(measured) == 1  # a finished run returns at once, without another gradient pass
    with pytest.raises(UserError, match="fisher_examples"):
        DistillConfig(fisher_examples=0).validate()
    # the run's identity holds the loss: the same directory refuses to resume it with the plain mse
    with pytest.raises(UserError, match="other settings"):
        distill(small_student(teacher, layers=1, width=teacher.config.hidden_size, heads=2), teacher, data,
                dataclasses.replace(config, hidden_loss="mse"), tmp_path / "run")


def test_loss_gradients_match_finite_differences():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    s = torch.randn(2, 4, 3, dtype=torch.double, requires_grad=True)
    t = torch.randn(2, 4, 3, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x: hidden_mse(x, t, mask), (s,))
    assert torch.autograd.gradcheck(lambda x: hidden_cosine(x, t, mask), (s,))
    ps = torch.randn(2, 2, 4, 4, dtype=torch.double).softmax(-1).requires_grad_()
    pt = torch.randn(2, 2, 4, 4, dtype=torch.double).softmax(-1)
    assert torch.autograd.gradcheck(lambda x: attention_kl(x, pt, mask), (ps,))
    logits = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
    target = torch.randn(3, 2, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x: logits_kl(x, target, 2.0), (logits,))


def test_layer_map_handles_depth_and_width_mismatch(setup):
    teacher, data = setup
    batch = data.train.batch(torch.arange(8))
    t = outputs(teacher, batch)  # 2 layers, width 32, 4 heads
    student = small_student(teacher, layers=1, width=16, heads=2)
    s = outputs(student, batch)
    layer_map = LayerMap.infer(s, t)
    assert layer_map.pairs == [(0, 0), (1, 2)]  # the single student layer learns the teacher's last layer
    assert len(layer_map.projections) == 2
    assert layer_map.project(1, s.hidden_states[1]).shape == t.hidden_states[2].shape
    parts = intermediate_loss(s, t, layer_map, batch["attention_mask"], (0, 1), LossWeights())
    total = sum(parts.values())
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer_map.parameters())
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    # a deeper student than teacher maps several layers to the same teacher layer
    assert LayerMap(4, 2, 8, 8).pairs == [(0, 0), (1, 1), (2, 1), (3, 2), (4, 2)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24))
def test_teacher_layer_map_is_monotone_and_covers_the_top(student_depth, teacher_depth):
    mapped = [teacher_layer(m, student_depth, teacher_depth) for m in range(student_depth + 1)]
    assert mapped[0] == 0 and mapped[-1] == teacher_depth
    assert all(1 <= x <= teacher_depth for x in mapped[1:])
    assert mapped == sorted(mapped)


def test_schedules_have_the_documented_stages():
    config = DistillConfig(intermediate_share=0.4, final_lr_scale=0.1)
    assert [s.name for s in build_stages("finetune_only", 3, config)] == ["task"]
    two = build_stages("two_stage", 3, config)
    assert two[0].layers == (0, 1, 2, 3) and not two[0].trains_head and two[1].logits and two[1].task
    prog = build_stages("progressive", 3, config)
    assert [s.layers for s in prog[:3]] == [(0, 1), (0, 1, 2), (0, 1, 2, 3)]
    assert prog[-1].logits and prog[-1].lr_scale == 0.1
    assert sum(s.share for s in prog) == pytest.approx(1.0)


def test_truncated_runs_the_first_layers_only(setup):
    teacher, data = setup
    batch = data.train.batch(torch.arange(4))
    full = forward_outputs(teacher, batch, True, False)
    with truncated(teacher, 1):
        part = forward_outputs(teacher, batch, True, False)
    assert len(part.hidden_states) == 2
    torch.testing.assert_close(part.hidden_states[1], full.hidden_states[1])
    assert len(teacher.bert.encoder.layer) == 2


def test_word_dropout_keeps_special_tokens_and_is_seeded(setup):
    _, data = setup
    batch = data.train.batch(torch.arange(16))
    a = word_dropout(batch, 0.3, torch.Generator().manual_seed(0))
    b = word_dropout(batch, 0.3, torch.Generator().manual_seed(0))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lengths = batch["attention_mask"].sum(1)
    new_lengths = a["attention_mask"].sum(1)
    assert (new_lengths <= lengths).all() and (new_lengths < lengths).any() and (new_lengths >= 2).all()
    assert torch.equal(a["input_ids"][:, 0], batch["input_ids"][:, 0])  # [CLS]
    last = batch["input_ids"][torch.arange(16), lengths - 1]
    assert torch.equal(a["input_ids"][torch.arange(16), new_lengths - 1], last)  # [SEP]


SWAP_VOCAB = ["[PAD]", "[CLS]", "[SEP]", "good", "great", "fine", "bad", "awful", "poor", "film", "movie",
              "show", "##s", "a", "1"]


def swap_fixture():
    """A vocabulary with three clusters of words plus non-words; each word's two neighbours are its cluster."""
    torch.manual_seed(0)
    centres = torch.eye(4) * 10
    cluster = {"good": 0, "great": 0, "fine": 0, "bad": 1, "awful": 1, "poor": 1, "film": 2, "movie": 2,
               "show": 2}
    rows = [centres[cluster[t]] if t in cluster else centres[3] for t in SWAP_VOCAB]
    embeddings = torch.stack(rows) + 0.1 * torch.randn(len(SWAP_VOCAB), 4)
    return NeighbourSwap.build(embeddings, SWAP_VOCAB, k=2), cluster


def ids(*tokens):
    return torch.tensor([SWAP_VOCAB.index(t) for t in tokens])


def test_neighbours_are_the_nearest_other_whole_words():
    swap, cluster = swap_fixture()
    for token, group in cluster.items():
        found = {SWAP_VOCAB[i] for i in swap.neighbours[SWAP_VOCAB.index(token)].tolist()}
        assert found == {t for t, g in cluster.items() if g == group and t != token}, token
    for token in ("[PAD]", "[CLS]", "[SEP]", "##s", "a", "1"):  # never swapped
        assert (swap.neighbours[SWAP_VOCAB.index(token)] == -1).all(), token


def test_neighbour_swap_replaces_stand_alone_words_only_and_drops_their_labels():
    swap, cluster = swap_fixture()
    batch = {"input_ids": torch.stack([ids("[CLS]", "a", "good", "film", "##s", "[SEP]", "[PAD]"),
                                       ids("[CLS]", "a", "1", "[SEP]", "[PAD]", "[PAD]", "[PAD]"),
                                       ids("[CLS]", "bad", "show", "[SEP]", "good", "[PAD]", "[PAD]")])}
    batch["attention_mask"] = torch.tensor([[1] * 6 + [0], [1] * 4 + [0] * 3, [1] * 4 + [0] * 3])
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    batch["labels"] = torch.tensor([1, 0, 0])
    out = swap(batch, 1.0, torch.Generator().manual_seed(0), word_rate=1.0)
    before, after = batch["input_ids"], out["input_ids"]
    # row 0: "good" swaps within its cluster; "film" heads "film ##s" and stays, as do [CLS], "a", [SEP]
    assert cluster[SWAP_VOCAB[int(after[0, 2])]] == cluster["good"] and int(after[0, 2]) != int(before[0, 2])
    keep = torch.ones_like(before, dtype=torch.bool)
    keep[0, 2], keep[2, 1], keep[2, 2] = False, False, False
    assert torch.equal(after[keep], before[keep])  # padding ("good" after [SEP] in row 2 is padding) untouched
    assert int(after[2, 1]) in ids("awful", "poor").tolist() and int(after[2, 2]) in ids("film", "movie").tolist()
    # swapped rows learn from the teacher alone; row 1 has no word to swap and keeps its label
    assert out["labels"].tolist() == [IGNORE_LABEL, 0, IGNORE_LABEL]
    assert torch.equal(out["attention_mask"], batch["attention_mask"])
    # seeded, and p=0 changes nothing
    again = swap(batch, 1.0, torch.Generator().manual_seed(0), word_rate=1.0)
    assert torch.equal(again["input_ids"], after)
    none = swap(batch, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(none["input_ids"], before) and torch.equal(none["labels"], batch["labels"])


def test_neighbour_swap_needs_a_matching_vocabulary():
    with pytest.raises(UserError, match="vocabulary has 3 tokens"):
        NeighbourSwap.build(torch.randn(5, 4), ["a", "b", "c"])
    with pytest.raises(UserError, match="whole words"):
        NeighbourSwap.build(torch.randn(3, 4), ["[CLS]", "aa", "bb"], k=2)


def test_task_loss_skips_ignored_labels():
    logits = torch.randn(4, 2, requires_grad=True)
    labels = torch.tensor([1, IGNORE_LABEL, 0, IGNORE_LABEL])
    parts = prediction_loss(logits, None, labels, LossWeights(), False, True)
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(parts["task"], expected)
    none = prediction_loss(logits, None, torch.full((4,), IGNORE_LABEL), LossWeights(), False, True)["task"]
    none.backward()
    assert float(none) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_distillation_with_neighbour_swap_asks_the_teacher_every_step(setup, tiny_model_dir, tmp_path):
    teacher, data = setup
    _, tokenizer = load_classifier(tiny_model_dir, num_labels=2)
    vocab = tokenizer.convert_ids_to_tokens(list(range(teacher.config.vocab_size)))
    with_vocab = DistillData(data.train, data.validation, data.label_names, vocab)
    counting = CountingTeacher(teacher)
    config = DistillConfig(schedule="logits_kd", epochs=2, batch_size=16, eval_every_steps=1000,
                           neighbour_swap=0.5)
    result = distill(copy.deepcopy(teacher), counting, with_vocab, config, tmp_path / "run")
    assert result.steps == 2 * data.train.num_batches(16)
    assert counting.calls == result.steps  # swapped inputs are new: no cached teacher logits
    with pytest.raises(UserError, match="vocabulary"):
        distill(copy.deepcopy(teacher), teacher, data, config, tmp_path / "other")
    # another swap rate is another run: the finished one is not mistaken for it
    with pytest.raises(UserError, match="other settings"):
        distill(copy.deepcopy(teacher), teacher, with_vocab, dataclasses.replace(config, neighbour_swap=0.25),
                tmp_path / "run")


class CountingTeacher(torch.nn.Module):
    """Wraps a classifier and counts forward passes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.inner(**kwargs)

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


def test_teacher_logits_are_cached_across_epochs(setup, tmp_path):
    teacher, data = setup
    counting = CountingTeacher(teacher)
    config = DistillConfig(schedule="logits_kd", epochs=2, batch_size=16, eval_every_steps=1000)
    result = distill(copy.deepcopy(teacher), counting, data, config, tmp_path / "run")
    per_epoch = data.train.num_batches(16)
    assert result.steps == 2 * per_epoch
    assert counting.calls == per_epoch  # the second epoch reads the cache


def test_progressive_distillation_teaches_a_narrower_shallower_student(setup, tmp_path):
    teacher, data = setup
    student = small_student(teacher)
    batch = data.validation.batch(torch.arange(len(data.validation)))
    t = outputs(teacher, batch)

    def gap(model, layer_map):
        with torch.no_grad():
            parts = intermediate_loss(outputs(model, batch), t, layer_map, batch["attention_mask"], (0, 1),
                                      LossWeights(attention=0.0))
        return float(sum(parts.values()))

    before = gap(student, LayerMap.infer(outputs(student, batch), t))
    seen = []
    config = DistillConfig(schedule="progressive", max_steps=40, batch_size=16, learning_rate=3e-3,
                           eval_every_steps=10, patience=100)
    result = distill(student, teacher, data, config, tmp_path / "run", hook=lambda m, s, p: seen.append((s, p)))
    assert [s["name"] for s in result.stages] == ["layers 1..1", "logits"]
    assert result.steps == 40 and 0.0 <= result.validation_accuracy <= 1.0
    assert [s for s, _ in seen] == list(range(1, 41))
    assert all(0 < p <= 1 for _, p in seen) and seen[-1][1] == pytest.approx(1.0)
    # after the layer stage the student's hidden states are closer to the teacher's (identity projections
    # are a fair yardstick: they start as identity and the student learned through them)
    after = gap(student, LayerMap.infer(outputs(student, batch), t))
    assert after < before
    # the returned student holds the best validation weights
    saved = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    torch.testing.assert_close(saved["classifier.weight"], student.classifier.weight)


@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_resume_continues_at_the_same_step_with_the_same_data_order(setup, tmp_path, ema_decay):
    """With a weight average, the checkpoint carries it: the resumed run validates the same averages."""
    teacher, data = setup
    config = DistillConfig(schedule="two_stage", max_steps=8, batch_size=8, checkpoint_every_steps=1,
                           eval_every_steps=4, ema_decay=ema_decay)
    reference = small_student(teacher, layers=2, width=32, heads=4)
    fresh = copy.deepcopy(reference)
    distill(reference, teacher, data, config, tmp_path / "straight")

    class Crash(Exception):
        pass

    def crash_at_5(model, step, progress):
        if step == 5:
            raise Crash

    interrupted = copy.deepcopy(fresh)
    with pytest.raises(Crash):
        distill(interrupted, teacher, data, config, tmp_path / "resumed", hook=crash_at_5)
    state = read_json(tmp_path / "resumed" / "last" / "state.json")
    assert state["global_step"] == 4 and state["stage"] == 1
    resumed = copy.deepcopy(fresh)  # a new process starts from the same initial student
    result = distill(resumed, teacher, data, config, tmp_path / "resumed")
    assert result.steps == 8
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    straight = read_json(tmp_path / "straight" / "result.json")
    assert [h["validation_accuracy"] for h in straight["history"]] == [h["validation_accuracy"]
                                                                        for h in result.history]
    # a finished run is returned as is, with its best weights loaded
    again = copy.deepcopy(fresh)
    assert distill(again, teacher, data, config, tmp_path / "resumed").steps == 8
    torch.testing.assert_close(again.classifier.weight, resumed.classifier.weight)
    with pytest.raises(UserError, match="other settings"):
        distill(copy.deepcopy(fresh), teacher, data, DistillConfig(schedule="two_stage", max_steps=9),
                tmp_path / "resumed")
    # a student of other layer shapes is refused before any weight is copied into it, finished run or not
    with pytest.raises(Crash):
        distill(copy.deepcopy(fresh), teacher, data, config, tmp_path / "crashed", hook=crash_at_5)
    wider = small_student(teacher, layers=2, width=48, heads=4)
    untouched = copy.deepcopy(wider.state_dict())
    for run in ("resumed", "crashed"):
        with pytest.raises(UserError, match="other layer shapes"):
            distill(wider, teacher, data, config, tmp_path / run)
    for name, value in wider.state_dict().items():
        torch.testing.assert_close(value, untouched[name], msg=name)


def test_weight_average_is_exponential_and_applied_for_the_duration_only():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    net.register_buffer("flag", torch.tensor(False))
    start = copy.deepcopy(net.state_dict())
    average = WeightAverage(net, decay=0.75)
    assert average.names == ["weight", "bias"]  # the bool buffer is not averaged
    expected = {k: v.clone() for k, v in start.items() if k != "flag"}
    for step in range(30):
        with torch.no_grad():
            net.weight.add_(step + 1.0)
            net.bias.mul_(-1.1)
        average.update(net)
        d = min(0.75, (1 + step) / (10 + step))  # the warm-up: a short run does not keep its start
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * net.state_dict()[k]
    own = copy.deepcopy(net.state_dict())
    with average.applied(net) as inside:
        for k, v in expected.items():
            torch.testing.assert_close(inside.state_dict()[k], v, msg=k)
    for k, v in own.items():
        assert torch.equal(net.state_dict()[k], v), k
    with pytest.raises(UserError, match="decay"):
        WeightAverage(net, decay=1.0)


def test_with_a_weight_average_the_averaged_weights_are_validated_and_kept(setup, tmp_path):
    teacher, data = setup
    student = small_student(teacher, layers=2, width=32, heads=4)
    result = distill(student, teacher, data, DistillConfig(schedule="logits_kd", max_steps=12, batch_size=8,
                                                           eval_every_steps=4, ema_decay=0.9), tmp_path / "run")
    kept = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    last = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    averaged = {k[len("average."):]: v for k, v in last.items() if k.startswith("average.")}
    raw = {k[len("student."):]: v for k, v in last.items() if k.startswith("student.")}
    assert averaged and not torch.equal(raw["classifier.weight"], averaged["avg" + str(
        list(student.state_dict()).index("classifier.weight"))])
    for k, v in student.state_dict().items():  # the student ends with the kept (averaged) weights
        torch.testing.assert_close(v, kept[k], msg=k)
    assert evaluate(student, data.validation, data.label_names).accuracy == result.validation_accuracy


def test_time_budget_is_split_across_stages(setup, tmp_path):
    teacher, data = setup
    config = DistillConfig(schedule="two_stage", budget_minutes=0.02, max_steps=100000, batch_size=8,
                           eval_every_steps=1000)
    result = distill(small_student(teacher), teacher, data, config, tmp_path / "run")
    assert [s["name"] for s in result.stages] == ["intermediate", "logits"]
    assert all(s["steps"] >= 1 for s in result.stages)
    assert result.steps < 100000


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "magic"}, "schedule"),
    ({"budget_minutes": 0}, "budget"),
    ({"hidden_loss": "l1"}, "hidden loss"),
    ({"word_dropout": 0.9}, "word dropout"),
    ({"neighbour_swap": 1.5}, "neighbour_swap"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"schedule": "two_stage", "hidden_weight": 0, "embedding_weight": 0, "attention_weight": 0}, "weight"),
    ({"schedule": "finetune_only", "task_weight": 0}, "no loss"),
])
def test_bad_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        DistillConfig(**kwargs).validate()


def test_a_gradual_pruning_schedule_runs_inside_distillation(setup, tmp_path):
    from fitformer.compress.prune import GradualPruner

    teacher, data = setup
    student = copy.deepcopy(teacher)
    pruner = GradualPruner(student, prune_heads=0.5, prune_ffn=0.5, total_steps=8, update_every=2, end_fraction=0.5)
    config = DistillConfig(schedule="two_stage", max_steps=8, batch_size=16, eval_every_steps=100)
    distill(student, teacher, data, config, tmp_path / "run",
            hook=lambda model, step, progress: (pruner.observe(), pruner.update(step)))
    plan = pruner.gates.plan()
    kept_heads = [len(h) for h in plan.keep_heads]  # heads are ranked across layers, at least one kept per layer
    assert sum(kept_heads) == 4 and min(kept_heads) >= 1  # half of the 2 x 4 heads are gone
    assert [len(f) for f in plan.keep_neurons] == [32, 32]


def test_distill_command_applies_a_plan_and_reports_json(tiny_model_dir, sentiment_data, tmp_path, capsys):
    import csv
    import json

    from fitformer.cli import main

    with open(tmp_path / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(sentiment_data.texts, sentiment_data.labels, strict=True))
    (tmp_path / "plan.yaml").write_text('layers:\n  "*.intermediate.dense":\n    - {kind: low_rank, rank: 4}\n')
    args = ["distill", "--plan", str(tmp_path / "plan.yaml"), "--model", str(tiny_model_dir), "--data",
            str(tmp_path / "data.csv"), "--schedule", "two_stage", "--max-steps", "6", "-o", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--json"])
    assert exit_info.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert result["distill"]["steps"] == 6 and 0 <= result["test_accuracy"] <= 1
    assert (tmp_path / "run" / "plan.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:-2], "--schedule", "nope", "-o", str(tmp_path / "bad")])
    assert exit_info.value.code == 2


def test_two_stage_trains_a_quantized_tt_student_cores_and_scales(setup, tmp_path):
    """A QAT student with TT layers and a TT embedding (what bench_quant's qat_w4a8_tt distils) goes through
    both stages, and its cores and learnable quantizer scales both move."""
    from fitformer.compress import CompressionPlan, apply_plan
    from fitformer.compress.quant import QuantPlan, quantize
    from fitformer.compress.tt import TTEmbeddingPlan, TTPlan

    teacher, data = setup
    plan = CompressionPlan(layers={
        "bert.encoder.layer.0.intermediate.dense": [TTPlan(max_rank=4)],
        "bert.embeddings.word_embeddings": [TTEmbeddingPlan(max_rank=4)],
    })
    student = quantize(apply_plan(teacher, plan), {"TTLinear": QuantPlan(4, 8), "TTEmbedding": QuantPlan(4, 8)})
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    config = DistillConfig(schedule="two_stage", max_steps=4, batch_size=8, eval_every_steps=100)
    result = distill(student, teacher, data, config, tmp_path / "run")
    assert [s["name"] for s in result.stages] == ["intermediate", "logits"]
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert any("cores" in n and "word_embeddings" in n for n in moved)
    assert any("core_quant" in n for n in moved)


def test_the_run_config_and_the_distiller_share_one_default_schedule():
    """config.py stays free of torch imports, so it repeats the defaults; this keeps the two in step."""
    from fitformer.config import RunConfig

    assert RunConfig.model_fields["distill_schedule"].default == DistillConfig().schedule
    assert RunConfig.model_fields["distill_ema_decay"].default == DistillConfig().ema_decay
    assert RunConfig.model_fields["distill_hidden_loss"].default == DistillConfig().hidden_loss
