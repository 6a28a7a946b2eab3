"""Tokenized examples, the datasets of them, and packing.

Labels are aligned with input_ids (labels[t] is the target of token t), as Hugging Face models expect: the model
shifts them internally, predicting labels[t+1] from the tokens up to t. So labels[0] of every example is -100 by
construction, which also keeps packed neighbours apart (see `pack_examples`).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompts, padding); PyTorch's cross-entropy default `ignore_index`."""


@dataclass
class Example:
    """One training sequence. `labels` is a list aligned with input_ids (LM) or one class id (classification)."""

    input_ids: list[int]
    labels: list[int] | int
    position_ids: list[int] | None = None
    """Set on packed sequences only: positions restart at 0 at every packed example."""


@dataclass
class DataStats:
    """What happened to the records of a file on the way to training sequences (counts of records/sequences)."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    """Examples cut to max_seq_len (their reply, or part of it, is lost)."""
    dropped: int = 0
    """Examples dropped because truncation left no response token to learn from."""
    chunked_documents: int = 0
    """Plain-text documents longer than max_seq_len, split into several sequences (nothing lost)."""
    boundary_merges: int = 0
    """Prompt/response boundaries where the tokenizer merged characters across (see `encode_chat`)."""
    packed_sequences: int = 0


@dataclass
class TokenizedDataset(Sequence):
    """A sequence of `Example`s (compact arrays in memory or memory-mapped from the tokenized cache, see
    `slimtune.data.cache.TokenArrays`; a plain list in tests) plus the `DataStats` of how they were made."""

    examples: Sequence[Example]
    stats: DataStats = field(default_factory=DataStats)
    cached_in: Path | None = None
    """The cache entry the examples were read back from (`slimtune.data.cache`); None when tokenized now."""
    extra: dict = field(default_factory=dict)
    """What was stored beside the examples (a classifier's label ids)."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def num_tokens(self) -> int:
        if hasattr(self.examples, "num_tokens"):
            return self.examples.num_tokens()
        return sum(len(e.input_ids) for e in self.examples)


def written_examples(out) -> Sequence[Example]:
    """What `tokenize_*` wrote into `out`: the writer's arrays, or the list itself."""
    return out.arrays() if hasattr(out, "arrays") else out


def pack_examples(dataset: TokenizedDataset, max_seq_len: int) -> TokenizedDataset:
    """Concatenate consecutive examples into sequences of at most `max_seq_len` tokens (no example is split).

    Labels stay separate: each example's first label is -100, so no loss term predicts one example's first token
    from its neighbour. `position_ids` restart at 0 for every example, so each sees the positions it would alone.
    Attention is NOT blocked between neighbours (the batch keeps a plain causal mask): a token can attend to the
    examples packed before it. That is the usual trade-off of packing (far fewer pad tokens) and is harmless for
    short independent examples; leave packing off when examples must not see each other.

    The packs are a view (`PackedExamples`): only where each pack starts is stored, one integer per pack.
    """
    examples = dataset.examples
    lengths = examples.lengths() if hasattr(examples, "lengths") else [len(e.input_ids) for e in examples]
    starts = array("q", [0])
    tokens = 0
    for i, n in enumerate(lengths):
        n = int(n)
        if tokens and tokens + n > max_seq_len:
            starts.append(i)
            tokens = 0
        tokens += n
    if len(lengths):
        starts.append(len(lengths))
    packs = PackedExamples(examples, np.frombuffer(starts, dtype=np.int64))
    stats = DataStats(**{**dataset.stats.__dict__, "packed_sequences": len(packs)})
    return TokenizedDataset(packs, stats, dataset.cached_in, dataset.extra)


class PackedExamples(Sequence):
    """Packs of consecutive examples of `examples`: pack i joins examples ``starts[i]`` to ``starts[i + 1] - 1``
    (see `pack_examples`)."""

    def __init__(self, examples: Sequence[Example], starts: np.ndarray):
        self.examples, self.starts = examples, starts

    def __len__(self) -> int:
        return max(len(self.starts) - 1, 0)

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for j in range(int(self.starts[i]), int(self.starts[i + 1])):
            ex = self.examples[j]
            ids.extend(ex.input_ids)
            labels.extend([IGNORE_INDEX, *ex.labels[1:]])
            positions.extend(range(len(ex.input_ids)))
        return Example(ids, labels, positions)

    def num_tokens(self) -> int:
        if hasattr(self.examples, "num_tokens"):
            return self.examples.num_tokens()
        return sum(len(e.input_ids) for e in self.examples)
