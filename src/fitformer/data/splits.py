"""Deterministic, stratified train/validation/test splits, recorded in a manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from ..io import sha256_json
from .dataset import TextDataset


@dataclass
class Splits:
    """The three splits of one dataset, and the manifest that identifies them."""

    train: TextDataset
    validation: TextDataset
    test: TextDataset
    manifest: dict[str, Any]

    def __getitem__(self, name: str) -> TextDataset:
        if name not in ("train", "validation", "test"):
            raise KeyError(name)
        return getattr(self, name)


def split_dataset(
    data: TextDataset,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """Split ``data`` per class with a seeded permutation, so class balance is the same in every split.

    The same data, fractions and seed always give the same split (the manifest's ``split_hash`` says so).
    """
    if not (0 < validation_fraction < 1 and 0 < test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise UserError(
            f"split fractions validation={validation_fraction}, test={test_fraction} must be in (0, 1) "
            "and sum to less than 1"
        )
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for label in range(data.num_labels):
        rows = np.flatnonzero(labels == label)
        rows = rows[rng.permutation(len(rows))]
        n_test = max(1, round(len(rows) * test_fraction))
        n_val = max(1, round(len(rows) * validation_fraction))
        if len(rows) < n_test + n_val + 1:
            raise UserError(
                f"class '{data.label_names[label]}' has {len(rows)} examples: too few to split into "
                "train, validation and test; add data or lower the split fractions"
            )
        parts["test"].extend(rows[:n_test].tolist())
        parts["validation"].extend(rows[n_test : n_test + n_val].tolist())
        parts["train"].extend(rows[n_test + n_val :].tolist())
    for name in parts:
        # Interleave the classes deterministically so no split is sorted by label.
        order = rng.permutation(len(parts[name]))
        parts[name] = [parts[name][i] for i in order]
    subsets = {name: data.subset(rows) for name, rows in parts.items()}
    manifest = {
        "source": data.source,
        "content_hash": data.content_hash(),
        "seed": seed,
        "validation_fraction": validation_fraction,
        "test_fraction": test_fraction,
        "label_names": data.label_names,
        "counts": {name: subset.class_counts() for name, subset in subsets.items()},
        "split_hash": sha256_json(parts),
    }
    return Splits(manifest=manifest, **subsets)
