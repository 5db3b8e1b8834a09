"""Fuzzing the loaders of user input: whatever the file or mapping holds, it loads or raises UserError.

Random bytes, random text over the characters that matter to each format, and random structures go through
the run-config loader (YAML files and keyword mappings) and the CSV/TSV/JSONL loader; well-formed data also
round-trips exactly.
"""

from __future__ import annotations

import csv
import io
import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fitformer.config import RunConfig, build_config
from fitformer.data import TextDataset, load_table
from fitformer.errors import UserError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Characters that steer each parser: delimiters, quotes, brackets, line and paragraph separators, a BOM, NUL.
SYNTAX = list(',\t"\'\n\r {}[]:-#&*!|>?%@`\\\x00\ufeff\u2028\x85é') + ["text", "label", "true", "null", "1"]
syntax_text = st.lists(st.sampled_from(SYNTAX) | st.text(max_size=3), max_size=60).map("".join)
# What a random draw rarely reaches: nesting deeper than Python's stack, integers over its 4300-digit limit.
deep = st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
huge = st.integers(1, 6000).map(lambda n: "9" * n)
extreme_jsonl = st.tuples(deep | huge, st.booleans()).map(
    lambda v: ('{"text": "a", "label": ' + v[0] + "}\n") * (2 if v[1] else 1))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def loads_or_user_error(fn, /, *args, **kwargs):
    """Call the loader; a UserError is an accepted outcome, anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except UserError as exc:
        assert str(exc), "a UserError needs a message"
        return None


# ---------------------------------------------------------------- data files


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
@FUZZ
@given(raw=st.binary(max_size=300) | syntax_text.map(lambda t: t.encode("utf-8", "surrogatepass"))
       | extreme_jsonl.map(str.encode))
def test_data_file_of_random_content_loads_or_is_a_user_error(tmp_path, suffix, raw):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(raw)
    loaded = loads_or_user_error(load_table, path, ["text"], "label")
    assert loaded is None or isinstance(loaded, TextDataset)


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["text", "label", "pair", "other"]), json_values, max_size=4)
                     | json_values, max_size=8),
       ascii_only=st.booleans())
def test_jsonl_of_random_structures_loads_or_is_a_user_error(tmp_path, rows, ascii_only):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows), encoding="utf-8")
    for text_cols in (["text"], ["text", "pair"]):
        loaded = loads_or_user_error(load_table, path, text_cols, "label")
        assert loaded is None or len(loaded) == len(rows)


# line and paragraph separators inside a value must not split a JSONL line or a CSV row
texts = st.text(st.characters(exclude_categories=["Cs"]) | st.sampled_from("\u2028\u2029\x85\x1c\r\n\"',\t"),
                min_size=1, max_size=20).filter(str.strip)
labelled = st.lists(st.tuples(texts, st.sampled_from(["pos", "neg", "0", "10", "n/a"])), min_size=4, max_size=12) \
    .filter(lambda rows: len({y for _, y in rows}) >= 2 and all(
        sum(y == z for _, z in rows) >= 2 for _, y in rows))


def _expected(rows):
    return [t.strip() for t, _ in rows], [y for _, y in rows]


@FUZZ
@given(rows=labelled, ascii_only=st.booleans())
def test_well_formed_jsonl_round_trips(tmp_path, rows, ascii_only):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}, ensure_ascii=ascii_only) + "\n" for t, y in rows),
                    encoding="utf-8")
    data = load_table(path, ["text"], "label")
    assert (data.texts, [data.label_names[i] for i in data.labels]) == _expected(rows)


@pytest.mark.parametrize("delimiter", [",", "\t"])
@FUZZ
@given(rows=labelled)
def test_well_formed_csv_and_tsv_round_trip(tmp_path, delimiter, rows):
    path = tmp_path / ("data.csv" if delimiter == "," else "data.tsv")
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    data = load_table(path, ["text"], "label")
    assert (data.texts, [data.label_names[i] for i in data.labels]) == _expected(rows)


# ---------------------------------------------------------------- run configs

FIELDS = sorted(RunConfig.model_fields)
# values that pass validation for the fields that check resources, so the checks after them also run
GOOD = {"model": None, "devices": ["raspberry-pi-4"]}


@pytest.fixture(autouse=True)
def _good_model(tiny_model_dir):
    GOOD["model"] = str(tiny_model_dir)


@FUZZ
@given(raw=st.binary(max_size=300) | syntax_text.map(lambda t: t.encode("utf-8", "surrogatepass"))
       | deep.map(lambda t: f"devices: {t}\n".encode()))
def test_config_file_of_random_content_loads_or_is_a_user_error(tmp_path, raw):
    path = tmp_path / "run.yaml"
    path.write_bytes(raw)
    loaded = loads_or_user_error(build_config, file=path, model=GOOD["model"])
    assert loaded is None or isinstance(loaded, RunConfig)


settings_maps = st.dictionaries(st.sampled_from(FIELDS) | st.text(string.ascii_lowercase + "_", min_size=1, max_size=8),
                                json_values, max_size=5)


@FUZZ
@given(values=settings_maps, keep_good=st.booleans())
def test_config_file_of_random_settings_loads_or_is_a_user_error(tmp_path, values, keep_good):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**(GOOD if keep_good else {}), **values}), encoding="utf-8")
    loaded = loads_or_user_error(build_config, file=path)
    assert loaded is None or isinstance(loaded, RunConfig)


@FUZZ
@given(values=settings_maps.map(lambda d: {k: v for k, v in d.items() if k not in ("preset", "file")}),
       preset=st.sampled_from([None, "quick", "thorough", "fast"]))
def test_config_mapping_of_random_settings_loads_or_is_a_user_error(values, preset):
    loaded = loads_or_user_error(build_config, preset, **{**GOOD, **values})
    assert loaded is None or isinstance(loaded, RunConfig)


@FUZZ
@given(values=st.fixed_dictionaries({}, optional={
    "search_budget": st.integers(1, 1000), "candidates": st.integers(1, 16), "seed": st.integers(),
    "max_accuracy_drop": st.floats(0, 100), "objective": st.sampled_from(["latency", "energy", "edp", "size"]),
    "max_size_mb": st.floats(1e-3, 1e3), "text_col": st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=2)}))
def test_valid_config_file_round_trips(tmp_path, values):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **values}), encoding="utf-8")
    assert build_config(file=path) == RunConfig(**{**GOOD, **values})
