"""Tokenisation with an on-disk cache, and batching with dynamic padding."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_path, cache_root, sha256_json
from .dataset import TextDataset


@dataclass
class EncodedDataset:
    """Token ids padded to a common length, with the true lengths kept so batches can be trimmed."""

    input_ids: torch.Tensor  # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64
    token_type_ids: torch.Tensor  # (N, L) int64
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, indices: torch.Tensor | list[int]) -> EncodedDataset:
        """The rows at ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return EncodedDataset(
            self.input_ids[idx], self.attention_mask[idx], self.token_type_ids[idx], self.labels[idx]
        )

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token id occurs (padding excluded): which rows of an embedding the task uses."""
        return torch.bincount(self.input_ids[self.attention_mask.bool()], minlength=vocab_size)

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch as model keyword arguments plus ``labels``, trimmed to its longest sequence."""
        mask = self.attention_mask[indices]
        length = max(int(mask.sum(dim=1).max()), 1)
        return {
            "input_ids": self.input_ids[indices, :length],
            "attention_mask": mask[:, :length],
            "token_type_ids": self.token_type_ids[indices, :length],
            "labels": self.labels[indices],
        }

    def epoch_order(self, batch_size: int, generator: torch.Generator | None = None,
                    group_by_length: int = 0) -> torch.Tensor:
        """A random order of all rows for one epoch; ``group_by_length=g`` sorts each chunk of ``g`` full batches
        by length (longest first) and then shuffles the full batches.

        Why: batches pad to their longest row, and random batches of short texts pad to about twice the mean
        length; grouped batches pad to nearly their rows' own lengths, so a step costs about half, while the
        epoch still visits every row once in a random mix. Batch ``k`` is ``order[k * batch_size:][:batch_size]``
        in both cases; the one partial batch is last and holds the same rows as without grouping, so grouping
        never pads more than the plain shuffled order of the same generator."""
        order = torch.randperm(len(self), generator=generator)
        if group_by_length <= 0 or len(self) <= batch_size:
            return order
        full = len(order) // batch_size * batch_size
        head, tail = order[:full], order[full:]
        lengths = self.attention_mask.sum(dim=1)[head]
        chunk = group_by_length * batch_size
        head = torch.cat([head[s : s + chunk][torch.argsort(lengths[s : s + chunk], descending=True, stable=True)]
                          for s in range(0, full, chunk)])
        batches = head.reshape(-1, batch_size)
        return torch.cat([batches[torch.randperm(len(batches), generator=generator)].reshape(-1), tail])

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None, skip: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in order (or in a seeded random order); ``skip`` drops the first batches, for resuming."""
        order = self.epoch_order(batch_size, generator) if shuffle else torch.arange(len(self))
        for start in range(skip * batch_size, len(self), batch_size):
            yield self.batch(order[start : start + batch_size])

    def num_batches(self, batch_size: int) -> int:
        return (len(self) + batch_size - 1) // batch_size


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary and casing; identifies it in cache keys."""
    vocab = sorted(tokenizer.get_vocab().items())
    return sha256_json([type(tokenizer).__name__, getattr(tokenizer, "do_lower_case", None), vocab])


def encode(tokenizer, data: TextDataset, max_length: int = 128, use_cache: bool = True) -> EncodedDataset:
    """Tokenise ``data`` to at most ``max_length`` tokens; results are cached on disk by content hash."""
    key = sha256_json([tokenizer_fingerprint(tokenizer), data.content_hash(), max_length])
    path = cache_root() / "tokens" / f"{key[:32]}.safetensors"
    if use_cache and path.exists():
        try:
            tensors = load_file(str(path))
            return EncodedDataset(**tensors)
        except Exception:  # a corrupted cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    enc = tokenizer(
        data.texts,
        data.pair_texts,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
        return_token_type_ids=True,
    )
    encoded = EncodedDataset(
        input_ids=enc["input_ids"].long(),
        attention_mask=enc["attention_mask"].long(),
        token_type_ids=enc["token_type_ids"].long(),
        labels=torch.tensor(data.labels, dtype=torch.long),
    )
    # Trim the padding no row uses, so the cache and every batch stay small.
    longest = max(int(encoded.attention_mask.sum(dim=1).max()), 1)
    encoded = EncodedDataset(
        encoded.input_ids[:, :longest].contiguous(),
        encoded.attention_mask[:, :longest].contiguous(),
        encoded.token_type_ids[:, :longest].contiguous(),
        encoded.labels,
    )
    if use_cache:
        with atomic_path(Path(path)) as tmp:
            save_file(vars(encoded), str(tmp))
    return encoded
