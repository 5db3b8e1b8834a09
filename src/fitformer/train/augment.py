"""Training-time augmentations of tokenised batches: new inputs whose labels come from the teacher.

- :func:`word_dropout` drops tokens at random.
- :class:`NeighbourSwap` swaps whole words for their nearest neighbours in the teacher's input-embedding
  space (TinyBERT's data augmentation, Jiao et al. 2020, sec. 3.1, for single-piece words): "a dull film"
  may become "a bland film" or "a boring movie". Such a swap can flip the sentiment ("good" sits next to
  "bad"), so a swapped example's label is set to :data:`IGNORE_LABEL` and only the teacher's soft labels
  teach the student on it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError

IGNORE_LABEL = -100  # cross-entropy's ignore_index: the example has no trusted label

SWAP_WORD_RATE = 0.4  # TinyBERT's p_t: each eligible word of a swapped example is replaced with this probability
SWAP_NEIGHBOURS = 15  # TinyBERT's K: a word is replaced by one of its K nearest neighbours, uniformly


def word_dropout(batch: dict[str, torch.Tensor], p: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Drop each real token except the first and last ([CLS], [SEP]) with probability ``p``,
    closing the gaps (a MLM-free stand-in for masked-token replacement)."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1, keepdim=True)
    positions = torch.arange(mask.shape[1])[None, :]
    protected = (positions == 0) | (positions == lengths - 1)
    keep = mask & (protected | (torch.rand(mask.shape, generator=generator) >= p))
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    new_mask = torch.gather(keep, 1, order)
    length = max(int(new_mask.sum(dim=1).max()), 1)
    out = {k: torch.gather(batch[k], 1, order)[:, :length] * new_mask[:, :length]
           for k in ("input_ids", "token_type_ids")}
    out["attention_mask"] = new_mask[:, :length].long()
    out["labels"] = batch["labels"]
    return out


class NeighbourSwap:
    """Replace whole words by embedding-space neighbours; built once per distillation from the teacher.

    A token is a *word* when its vocabulary entry is two or more lowercase letters (WordPiece continuations,
    ``##...``, punctuation, numbers and special tokens are not). A word is swapped only where it stands
    alone: a word followed by a ``##`` continuation is the head of a longer word and stays. Neighbours are
    words, ranked by cosine similarity of the teacher's input embeddings.
    """

    def __init__(self, neighbours: torch.Tensor, continuation: torch.Tensor) -> None:
        self.neighbours = neighbours  # (vocab, k) int64; row i is -1 where token i is never swapped
        self.continuation = continuation  # (vocab,) bool: a WordPiece continuation (##...)

    @classmethod
    def build(cls, embeddings: torch.Tensor, vocab: Sequence[str], used: torch.Tensor | None = None,
              k: int = SWAP_NEIGHBOURS, chunk: int = 4096) -> NeighbourSwap:
        """Neighbour lists from an input-embedding matrix ``(vocab, hidden)`` and the token strings by id.
        ``used`` (bool per id) limits the words that get lists to those the data contains (fewer to rank)."""
        if len(vocab) != embeddings.shape[0]:
            raise UserError(f"neighbour swap: the vocabulary has {len(vocab)} tokens but the teacher's embedding "
                            f"{embeddings.shape[0]} rows; pass the teacher's own tokenizer")
        word = torch.tensor([bool(re.fullmatch(r"[a-z]{2,}", t)) for t in vocab])
        continuation = torch.tensor([t.startswith("##") for t in vocab])
        words = word.nonzero().squeeze(1)
        if len(words) <= k:
            raise UserError(f"neighbour swap: the vocabulary has {len(words)} whole words, fewer than the "
                            f"{k + 1} it needs; it suits WordPiece vocabularies of real models")
        unit = F.normalize(embeddings.detach().float(), dim=1)
        candidates = unit[words]
        sources = (word & used.bool()) if used is not None else word
        neighbours = torch.full((len(vocab), k), -1, dtype=torch.long)
        for ids in sources.nonzero().squeeze(1).split(chunk):
            similarity = unit[ids] @ candidates.T
            similarity[similarity >= 1 - 1e-6] = -2.0  # the word itself (and exact duplicates) is no neighbour
            neighbours[ids] = words[similarity.topk(k, dim=1).indices]
        return cls(neighbours, continuation)

    def __call__(self, batch: dict[str, torch.Tensor], p: float, generator: torch.Generator,
                 word_rate: float = SWAP_WORD_RATE) -> dict[str, torch.Tensor]:
        """Swap each example with probability ``p``: each of its stand-alone words becomes a random one of its
        neighbours with probability ``word_rate``. Examples with a swapped word get the label :data:`IGNORE_LABEL`."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        rows = torch.rand(ids.shape[0], generator=generator) < p
        next_ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        next_real = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
        alone = mask & ~(self.continuation[next_ids] & next_real)
        lists = self.neighbours[ids]  # (batch, length, k)
        swap = rows[:, None] & alone & (lists[..., 0] >= 0) \
            & (torch.rand(ids.shape, generator=generator) < word_rate)
        pick = torch.randint(lists.shape[-1], ids.shape, generator=generator)
        replacement = torch.gather(lists, 2, pick[..., None]).squeeze(2)
        out = dict(batch)
        out["input_ids"] = torch.where(swap, replacement, ids)
        changed = swap.any(dim=1)
        out["labels"] = torch.where(changed, torch.full_like(batch["labels"], IGNORE_LABEL), batch["labels"])
        return out
