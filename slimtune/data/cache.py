"""Tokenized training data cached next to the run, so a repeated or resumed run reads its sequences back
(memory-mapped) instead of reading and tokenizing the data again.

One folder per entry under `out_dir/data-cache/`, named by a hash of everything the sequences depend on: the data
file (path, size and modification time of each file), the tokenizer (its serialized vocabulary and rules, and its
chat template), the chat template chosen, max_seq_len, the column and role maps, and the split (which side,
val_fraction, seed). A changed file or setting gives a new entry; nothing is ever reused for different inputs.

An entry holds `input_ids.npy` and `labels.npy` (every sequence back to back), `offsets.npy` (where each starts, one
more than there are sequences) and `stats.json` (the `DataStats` of the first tokenization). Tokenization writes into
a new entry as it goes (compact int32 arrays, not lists of Python ints) and training reads the entry memory-mapped,
the first time too. Entries are written to a temporary folder and renamed into place, so processes that tokenize at
the same time never see half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slimtune.errors import SlimtuneError

if TYPE_CHECKING:
    from slimtune.data.instruct import TokenizedDataset

FOLDER = "data-cache"
VERSION = 1
"""Bumped when the tokenization changes, so entries written by an older slimtune are not reused."""


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


class MappedExamples(Sequence):
    """The sequences of a cache entry, memory-mapped: `Example`s made on access."""

    def __init__(self, folder: Path):
        self.input_ids = np.load(folder / "input_ids.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy", mmap_mode="r")
        self.offsets = np.load(folder / "offsets.npy")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        from slimtune.data.instruct import Example

        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return Example(self.input_ids[start:end].tolist(), self.labels[start:end].tolist())


class EntryWriter:
    """A cache entry being written: examples appended as they are tokenized, kept as compact int32 arrays (not lists
    of Python ints), saved by `close`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.input_ids, self.labels = array("i"), array("i")
        self.offsets = array("q", [0])

    def append(self, example) -> None:
        self.input_ids.extend(example.input_ids)
        self.labels.extend(example.labels)
        self.offsets.append(len(self.input_ids))

    def extend(self, examples) -> None:
        for example in examples:
            self.append(example)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def close(self, stats) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        np.save(self.folder / "input_ids.npy", np.frombuffer(self.input_ids, dtype=np.int32))
        np.save(self.folder / "labels.npy", np.frombuffer(self.labels, dtype=np.int32))
        np.save(self.folder / "offsets.npy", np.frombuffer(self.offsets, dtype=np.int64))
        (self.folder / "stats.json").write_text(json.dumps(asdict(stats)))  # last: marks the entry complete


class TokenCache:
    """The cache folder of a run. `write=False` (a dry run) reads entries but adds none."""

    def __init__(self, folder: str | Path, write: bool = True):
        self.folder = Path(folder)
        self.write = write

    def get(self, key: dict, tokenize: Callable[[list | EntryWriter], TokenizedDataset]) -> TokenizedDataset:
        """The entry for `key` (a JSON-able dict); when there is none, `tokenize(out)` tokenizes into `out` (a new
        entry, or a list when nothing may be written) and the result is read back from the new entry."""
        from slimtune.data.instruct import DataStats, TokenizedDataset

        entry = self.folder / hashlib.sha256(json.dumps({"version": VERSION, **key}, sort_keys=True,
                                                        default=str).encode()).hexdigest()[:20]
        if (entry / "stats.json").is_file():
            stats = DataStats(**json.loads((entry / "stats.json").read_text()))
            return TokenizedDataset(MappedExamples(entry), stats, cached_in=entry)
        if not self.write:
            return tokenize([])
        writer = EntryWriter(entry.with_name(f"{entry.name}.tmp-{os.getpid()}"))
        stats = tokenize(writer).stats
        writer.close(stats)
        try:
            os.replace(writer.folder, entry)
        except OSError:
            if not (entry / "stats.json").is_file():
                raise
            shutil.rmtree(writer.folder)  # another process stored the same entry first: theirs is identical
        return TokenizedDataset(MappedExamples(entry), stats)
