"""Tokenized data as compact arrays, and the cache of them next to the run, so a repeated or resumed run reads its
sequences back (memory-mapped) instead of reading and tokenizing the data again.

Sequences are never held as Python lists of Python ints: `ExampleWriter` appends each tokenized example to three
flat arrays (every input id back to back, the labels alike, and where each example starts), and `TokenArrays` is the
indexable view over such arrays that training reads, in memory or memory-mapped from `.npy` files. Classification
data stores one label per example instead of one per token.

One cache entry per folder under `out_dir/data-cache/`, named by a hash of everything the sequences depend on: the
data file (path, size and modification time of each file), the tokenizer (its serialized vocabulary and rules, and
its chat template), the chat template chosen, max_seq_len, the column and role maps, and the split (which side,
val_fraction, seed). A changed file or setting gives a new entry; nothing is ever reused for different inputs.

An entry holds `input_ids.npy`, `labels.npy`, `offsets.npy` (where each example starts, one more than there are
examples), `entry.json` (whether labels are per example, and what the caller stores beside the sequences, e.g. a
classifier's label names) and, written
last, `stats.json` (the `DataStats` of the first tokenization). Tokenization writes into a new entry as it goes and
training reads the entry memory-mapped, the first time too. Entries are written to a temporary folder and renamed
into place, so processes that tokenize at the same time never see half an entry.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from slimtune.atomic import write_folder_atomically
from slimtune.data.examples import DataStats, Example, TokenizedDataset
from slimtune.errors import SlimtuneError

FOLDER = "data-cache"
VERSION = 2
"""Bumped when the tokenization or the split changes, so entries written by an older slimtune are not reused
(2: validation records chosen by numpy's PCG64, classification data cached)."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokenizer's ids: its serialized rules and vocabulary, its special tokens and chat
    template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None)], default=str)
    return hashlib.sha256((rules + extra).encode()).hexdigest()


def files_fingerprint(path: str | Path) -> list:
    """(path, size, modification time) of a file, or of every file in a folder."""
    if not Path(path).exists():
        raise SlimtuneError(f"data file {path} does not exist")
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


class TokenArrays(Sequence):
    """Examples stored as flat arrays; `Example`s are made on access.

    ``input_ids`` holds every example's ids back to back and ``offsets[i]:offsets[i + 1]`` is example i's span.
    ``labels`` is aligned with ``input_ids`` (language modelling), or holds one class id per example when
    ``per_example_labels`` (classification)."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                 per_example_labels: bool = False):
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets
        self.per_example_labels = per_example_labels

    @classmethod
    def load(cls, folder: Path, per_example_labels: bool = False) -> TokenArrays:
        """The arrays of a cache entry, the token arrays memory-mapped."""
        return cls(np.load(folder / "input_ids.npy", mmap_mode="r"), np.load(folder / "labels.npy", mmap_mode="r"),
                   np.load(folder / "offsets.npy"), per_example_labels)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        labels = int(self.labels[i]) if self.per_example_labels else self.labels[start:end].tolist()
        return Example(self.input_ids[start:end].tolist(), labels)

    def lengths(self) -> np.ndarray:
        """Tokens of every example (an array)."""
        return np.diff(self.offsets)

    def num_tokens(self) -> int:
        return int(self.offsets[-1])


class ExampleWriter:
    """Examples appended as they are tokenized, kept as compact int32 arrays (4 bytes a token, not a Python list of
    Python ints); `arrays()` views them in memory, `save(folder)` writes them as a cache entry's files."""

    def __init__(self, per_example_labels: bool = False):
        self.per_example_labels = per_example_labels
        self.input_ids, self.labels = array("i"), array("i")
        self.offsets = array("q", [0])

    def append(self, example) -> None:
        self.input_ids.extend(example.input_ids)
        if self.per_example_labels:
            self.labels.append(example.labels)
        else:
            self.labels.extend(example.labels)
        self.offsets.append(len(self.input_ids))

    def extend(self, examples) -> None:
        for example in examples:
            self.append(example)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def arrays(self) -> TokenArrays:
        return TokenArrays(np.frombuffer(self.input_ids, dtype=np.int32), np.frombuffer(self.labels, dtype=np.int32),
                           np.frombuffer(self.offsets, dtype=np.int64), self.per_example_labels)

    def save(self, folder: Path, stats, extra: dict | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = self.arrays()
        np.save(folder / "input_ids.npy", arrays.input_ids)
        np.save(folder / "labels.npy", arrays.labels)
        np.save(folder / "offsets.npy", arrays.offsets)
        (folder / "entry.json").write_text(json.dumps({"per_example_labels": self.per_example_labels,
                                                       "extra": extra or {}}))
        (folder / "stats.json").write_text(json.dumps(asdict(stats)))  # last: marks the entry complete


class TokenCache:
    """The cache folder of a run. `write=False` (a dry run) reads entries but adds none."""

    def __init__(self, folder: str | Path, write: bool = True):
        self.folder = Path(folder)
        self.write = write

    def entry(self, key: dict) -> Path:
        return self.folder / hashlib.sha256(json.dumps({"version": VERSION, **key}, sort_keys=True,
                                                       default=str).encode()).hexdigest()[:20]

    def get(self, key: dict, tokenize: Callable[[ExampleWriter], TokenizedDataset],
            per_example_labels: bool = False) -> TokenizedDataset:
        """The entry for `key` (a JSON-able dict); when there is none, `tokenize(out)` tokenizes into `out` (an
        `ExampleWriter`) and the result is stored as a new entry (unless nothing may be written) and read back
        memory-mapped. The returned dataset's ``extra`` is what the tokenization's result carried in its own."""
        entry = self.entry(key)
        if (entry / "stats.json").is_file():
            stats = DataStats(**json.loads((entry / "stats.json").read_text()))
            info = json.loads((entry / "entry.json").read_text())
            return TokenizedDataset(TokenArrays.load(entry, info["per_example_labels"]), stats, cached_in=entry,
                                    extra=info["extra"])
        writer = ExampleWriter(per_example_labels)
        made = tokenize(writer)
        if not self.write:
            return made
        # Another process may store the same entry first: theirs is identical and is kept.
        write_folder_atomically(entry, lambda tmp: writer.save(tmp, made.stats, made.extra), exist_ok=True)
        return TokenizedDataset(TokenArrays.load(entry, per_example_labels), made.stats, extra=made.extra)
