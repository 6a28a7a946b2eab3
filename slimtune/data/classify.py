"""Classification data for fine-tuning Hugging Face models (hf.task=classify): records of `text`, optional
`text_pair` and `label`, read, split, tokenized with the tokenizer's special tokens and cached as instruction data
is (`slimtune.data.instruct`), with the label ids stored beside the examples."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from slimtune.data.cache import ExampleWriter, TokenCache, files_fingerprint, tokenizer_fingerprint
from slimtune.data.examples import DataStats, Example, TokenizedDataset, written_examples
from slimtune.data.records import (Sample, check_column_map, count_records, iter_records, record_field,
                                   require_records, split_side, validation_mask)
from slimtune.errors import SlimtuneError

log = logging.getLogger(__name__)


def iter_classification_samples(path: str | Path, column_map: dict | None = None,
                                cache_dir: str | Path | None = None) -> Iterator[Sample]:
    """The records of a classification file (`text`, optional `text_pair`, `label`: int >= 0 or string) as Samples,
    one at a time; a file without records is an error."""
    column_map = check_column_map(column_map)
    n = 0
    for where, record in iter_records(path, column_map, cache_dir, task="classify"):
        text = record_field(record, "text", column_map, where)
        pair = record_field(record, "text_pair", column_map, where, required=False)
        label = record_field(record, "label", column_map, where, kind=(int, str))
        if isinstance(label, int) and label < 0:
            raise SlimtuneError(f"{where}: label {label} is negative; integer labels are class ids 0, 1, 2, ...")
        n += 1
        yield Sample(where, text=text, text_pair=pair, label=label)
    if n == 0:
        require_records([], path)


def read_classification_samples(path: str | Path, column_map: dict | None = None) -> list[Sample]:
    """All the records of a classification file as a list (`iter_classification_samples`), for small files."""
    return list(iter_classification_samples(path, column_map))


def label_mapping(samples: Iterable[Sample], source: str = "data") -> dict[str, int]:
    """Label name → id. String labels are numbered in sorted order (deterministic); int labels map str(i) → i.
    One pass over `samples`, keeping only the distinct labels."""
    names: set = set()
    first: dict[type, str] = {}
    for s in samples:
        first.setdefault(type(s.label), s.where)
        names.add(s.label)
    if len(first) > 1:
        raise SlimtuneError(f"{source}: labels mix integers ({first[int]}) and strings ({first[str]}); use one kind")
    if int in first:
        return {str(i): i for i in range(max(names) + 1)}
    return {name: i for i, name in enumerate(sorted(names))}


def tokenize_classification(samples: Iterable[Sample], tokenizer, max_seq_len: int, label2id: dict[str, int],
                            source: str = "data", out=None) -> TokenizedDataset:
    """Tokenize (text, text_pair) with the tokenizer's special tokens; truncate to max_seq_len with a warning count.
    `out` as for `tokenize_samples` (one class id per example)."""
    stats = DataStats()
    examples = ExampleWriter(per_example_labels=True) if out is None else out
    for s in samples:
        stats.records += 1
        key = str(s.label)
        if key not in label2id:
            raise SlimtuneError(f"{s.where}: label {s.label!r} does not occur in the training data "
                                f"(known labels: {', '.join(label2id)})")
        ids = tokenizer(s.text, s.text_pair)["input_ids"]
        if len(ids) > max_seq_len:
            stats.truncated += 1
            ids = tokenizer(s.text, s.text_pair, truncation=True, max_length=max_seq_len)["input_ids"]
        examples.append(Example(list(ids), label2id[key]))
    stats.examples = len(examples)
    if stats.truncated:
        log.warning("%s: %d of %d texts were longer than max_seq_len=%d tokens and were truncated", source,
                    stats.truncated, stats.records, max_seq_len)
    if not len(examples):
        raise SlimtuneError(f"{source}: the file holds no records")
    return TokenizedDataset(written_examples(examples), stats, extra={"label2id": label2id})


def load_classification_data(path: str | Path, tokenizer, max_seq_len: int, column_map: dict | None = None,
                             val_fraction: float = 0.0, val_path: str | Path | None = None, seed: int = 0,
                             cache: TokenCache | None = None
                             ) -> tuple[TokenizedDataset, TokenizedDataset | None, dict[str, int]]:
    """Read and tokenize classification data. Returns (train, val or None, label2id); num_labels = len(label2id).

    Validation data comes from `val_path` when given (`val_fraction` is then ignored), else from a `val_fraction`
    of the records of `path` (chosen by `seed`). Records stream as in `load_instruction_data`; the label ids take
    one more pass over the training file (only the distinct labels are kept). With a `cache` both splits and the
    label ids are read back from it when nothing they depend on changed.
    """
    cache_dir = cache.folder if cache is not None and cache.write else None
    if val_path is not None:
        val_fraction = 0.0
    if not 0.0 <= val_fraction < 1.0:
        raise SlimtuneError(f"val_fraction must be in [0, 1), got {val_fraction}")

    def records(file) -> Iterator[Sample]:
        return iter_classification_samples(file, column_map, cache_dir)

    @functools.cache
    def mask() -> np.ndarray | None:
        if val_fraction == 0.0:
            return None
        n = count_records(path, cache_dir=cache_dir) or len(require_records([], path))
        return validation_mask(n, val_fraction, seed, str(path))

    @functools.cache
    def label2id() -> dict[str, int]:
        # From the whole training file, so a label seen only in the split-off records still has an id.
        return label_mapping(records(path), str(path))

    def tokenized(side: int, source: str, labels: dict | None) -> TokenizedDataset:
        def tokenize(out=None) -> TokenizedDataset:
            samples = (records(val_path) if side == 1 and val_path is not None
                       else split_side(records(path), mask(), side))
            return tokenize_classification(samples, tokenizer, max_seq_len, labels or label2id(), source, out)

        if cache is None:
            return tokenize()
        key = {"task": "classify", "data": files_fingerprint(path),
               "val_data": val_path and files_fingerprint(val_path), "side": side, "val_fraction": val_fraction,
               "seed": seed, "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_len": max_seq_len,
               "column_map": column_map}
        return cache.get(key, tokenize, per_example_labels=True)

    if val_path is not None:  # a bad validation file fails now, not after the training data is tokenized
        next(records(val_path))
    train = tokenized(0, str(path), None)
    labels = train.extra["label2id"]
    val = None
    if val_path is not None or val_fraction > 0:
        val = tokenized(1, str(val_path or path), labels)
    return train, val, labels
