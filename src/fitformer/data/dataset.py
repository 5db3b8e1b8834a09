"""The in-memory form of a labelled text-classification dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..io import sha256_json


@dataclass
class TextDataset:
    """Texts (single sentences, or pairs when ``pair_texts`` is set) with integer labels.

    ``label_names[i]`` is the original name of label ``i``. ``source`` says where the data came from.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    pair_texts: list[str] | None = None
    source: str = ""
    _hash: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")
        if self.pair_texts is not None and len(self.pair_texts) != len(self.texts):
            raise ValueError("pair_texts and texts differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.pair_texts is not None

    def subset(self, indices: list[int]) -> TextDataset:
        """The rows at ``indices``, in that order."""
        return TextDataset(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            label_names=list(self.label_names),
            pair_texts=None if self.pair_texts is None else [self.pair_texts[i] for i in indices],
            source=self.source,
        )

    def class_counts(self) -> dict[str, int]:
        """Examples per class, by class name."""
        counts = {name: 0 for name in self.label_names}
        for label in self.labels:
            counts[self.label_names[label]] += 1
        return counts

    def content_hash(self) -> str:
        """SHA-256 of texts, pairs, labels and label names: identifies the data in caches and manifests."""
        if self._hash is None:
            self._hash = sha256_json([self.texts, self.pair_texts, self.labels, self.label_names])
        return self._hash
