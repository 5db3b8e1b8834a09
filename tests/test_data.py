"""Data loading, splitting and tokenisation: formats, bad input, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fitformer.data import EncodedDataset, TextDataset, encode, load_table, split_dataset
from fitformer.errors import UserError
from fitformer.models import load_tokenizer


def write_csv(path, rows, header=("text", "label"), delimiter=","):
    lines = [delimiter.join(header)] + [delimiter.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_csv_tsv_jsonl_load_the_same(tmp_path):
    rows = [("good film", "pos"), ("bad film", "neg"), ("fine film", "pos"), ("dull film", "neg")]
    csv_data = load_table(write_csv(tmp_path / "d.csv", rows), ["text"], "label")
    tsv_data = load_table(write_csv(tmp_path / "d.tsv", rows, delimiter="\t"), ["text"], "label")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows) + "\n", encoding="utf-8")
    jsonl_data = load_table(jsonl, ["text"], "label")
    for data in (csv_data, tsv_data, jsonl_data):
        assert data.texts == [t for t, _ in rows]
        assert data.label_names == ["neg", "pos"]
        assert data.labels == [1, 0, 1, 0]
    assert csv_data.content_hash() == tsv_data.content_hash() == jsonl_data.content_hash()


def test_sentence_pairs(tmp_path):
    path = write_csv(tmp_path / "p.csv", [("a", "b", "1"), ("c", "d", "0"), ("e", "f", "1"), ("g", "h", "0")],
                     header=("s1", "s2", "y"))
    data = load_table(path, ["s1", "s2"], "y")
    assert data.is_pair and data.pair_texts == ["b", "d", "f", "h"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("text,label\n", "no data rows"),
        ("text,label\na,1\nb,1\n", "one class"),
        ("text,label\na,pos\nb,pos\nc,neg\nd,neg\ne,pso\n", "line 6: label 'pso'"),
        ("text,label\na,pos\n,neg\nc,neg\nd,pos\n", "line 3: empty text"),
        ("text,label\na,pos\nb,\nc,neg\nd,pos\n", "line 3: empty label"),
        ("txt,label\na,pos\nb,neg\n", "no column 'text'"),
    ],
)
def test_bad_csv_content(tmp_path, content, needle):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=needle):
        load_table(path, ["text"], "label")


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_table(tmp_path / "missing.csv", ["text"], "label")
    binary = tmp_path / "latin.csv"
    binary.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(UserError, match="line 2 is not valid UTF-8"):
        load_table(binary, ["text"], "label")
    with pytest.raises(UserError, match="unknown file type"):
        load_table(tmp_path / "x.parquet", ["text"], "label")
    bad_json = tmp_path / "x.jsonl"
    bad_json.write_text('{"text": "a", "label": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        load_table(bad_json, ["text"], "label")


def test_split_is_stratified_disjoint_and_deterministic(sentiment_data):
    a = split_dataset(sentiment_data, seed=3)
    b = split_dataset(sentiment_data, seed=3)
    c = split_dataset(sentiment_data, seed=4)
    assert a.manifest == b.manifest
    assert a.manifest["split_hash"] != c.manifest["split_hash"]
    total = sum(len(a[s]) for s in ("train", "validation", "test"))
    assert total == len(sentiment_data)
    for s in ("validation", "test"):
        counts = a.manifest["counts"][s]
        assert abs(counts["negative"] - counts["positive"]) <= 1


@settings(max_examples=30, deadline=None)
@given(n_per_class=st.lists(st.integers(3, 40), min_size=2, max_size=4), seed=st.integers(0, 1000))
def test_split_partitions_every_row(n_per_class, seed):
    labels = [c for c, n in enumerate(n_per_class) for _ in range(n)]
    data = TextDataset(texts=[f"t{i}" for i in range(len(labels))], labels=labels,
                       label_names=[f"c{c}" for c in range(len(n_per_class))])
    splits = split_dataset(data, seed=seed)
    texts = splits.train.texts + splits.validation.texts + splits.test.texts
    assert sorted(texts) == sorted(data.texts)
    for part in ("train", "validation", "test"):
        assert all(v >= 1 for v in splits.manifest["counts"][part].values())


def test_too_small_class_is_a_user_error():
    data = TextDataset(texts=["a", "b", "c", "d", "e"], labels=[0, 0, 0, 1, 1], label_names=["x", "y"])
    with pytest.raises(UserError, match="too few to split"):
        split_dataset(data)


def test_encode_is_cached_and_batches_trim_padding(tiny_model_dir, sentiment_data):
    tokenizer = load_tokenizer(tiny_model_dir)
    first = encode(tokenizer, sentiment_data, max_length=32)
    second = encode(tokenizer, sentiment_data, max_length=32)
    assert (first.input_ids == second.input_ids).all()
    batch = next(first.batches(8))
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    assert len(list(first.batches(8, skip=2))) == first.num_batches(8) - 2


def _rows_with_lengths(lengths: list[int]) -> EncodedDataset:
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return EncodedDataset(mask.clone(), mask, torch.zeros_like(mask), torch.zeros(len(lengths), dtype=torch.long))


def _padded_tokens(data: EncodedDataset, order: torch.Tensor, batch_size: int) -> int:
    lengths = data.attention_mask.sum(dim=1)
    return sum(int(lengths[b].max()) * len(b) for b in order.split(batch_size))


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=120), batch_size=st.integers(1, 16),
       group=st.integers(0, 6), seed=st.integers(0, 1000))
@example(lengths=[1, 1, 1, 1, 2], batch_size=2, group=3, seed=297)  # the long row alone in the partial batch
def test_epoch_order_is_a_permutation_that_pads_no_more_than_random_batches(lengths, batch_size, group, seed):
    data = _rows_with_lengths(lengths)
    order = data.epoch_order(batch_size, torch.Generator().manual_seed(seed), group)
    random = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
    assert sorted(order.tolist()) == list(range(len(lengths)))
    if group == 0:  # exactly the plain shuffled order, so runs without grouping are unchanged
        assert order.tolist() == random.tolist()
    # each chunk of `group` full batches holds the same rows as in the random order, sorted by length, and the
    # partial batch is the random order's own: never more padding than random batches
    assert _padded_tokens(data, order, batch_size) <= _padded_tokens(data, random, batch_size)
    full = len(lengths) // batch_size * batch_size
    if group and len(lengths) > batch_size:
        assert order[full:].tolist() == random[full:].tolist()


def test_grouped_batches_pad_far_less_when_lengths_spread():
    """Lengths from 1 to 60 tokens: random batches of 32 pad to near the longest row, grouped ones do not."""
    data = _rows_with_lengths([1 + (7 * i) % 60 for i in range(3200)])
    random = _padded_tokens(data, data.epoch_order(32, torch.Generator().manual_seed(0)), 32)
    grouped = _padded_tokens(data, data.epoch_order(32, torch.Generator().manual_seed(0), 50), 32)
    assert grouped < 0.6 * random
