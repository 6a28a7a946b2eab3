"""Instruction data for fine-tuning Hugging Face models: from data files to tokenized training and validation
sequences.

Records are read one at a time (`slimtune.data.records`; formats in `slimtune.data.formats`), split into training
and validation records, rendered and tokenized with the chat template's masking (`slimtune.data.templates`),
truncated, and optionally packed (`slimtune.data.examples`); plain-text documents are language-modelled on all their
tokens. Tokenized splits are cached next to the run (`slimtune.data.cache`). Classification data is
`slimtune.data.classify`; batches of either are `slimtune.data.batches`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimtune.data.cache import ExampleWriter, TokenCache, files_fingerprint, tokenizer_fingerprint
from slimtune.data.examples import (IGNORE_INDEX, DataStats, Example, TokenizedDataset, pack_examples,
                                    written_examples)
from slimtune.data.records import Sample, count_records, iter_samples, require_records, split_side, validation_mask
from slimtune.data.templates import encode_chat, encode_text, resolve_chat_template
from slimtune.errors import SlimtuneError

log = logging.getLogger(__name__)


def _text_examples(tokenizer, text: str, max_seq_len: int, stats: DataStats) -> list[Example]:
    ids = encode_text(tokenizer, text, add_special_tokens=True)  # BOS if the tokenizer adds one
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)  # mark the document end, so the model learns where text stops
    if len(ids) > max_seq_len:
        stats.chunked_documents += 1
    out = []
    for start in range(0, len(ids), max_seq_len):
        chunk = ids[start:start + max_seq_len]
        if len(chunk) < 2:  # a lone token has nothing to predict
            continue
        out.append(Example(chunk, [IGNORE_INDEX] + chunk[1:]))
    return out


def tokenize_samples(samples: Iterable[Sample], tokenizer, max_seq_len: int, template: str | None = None,
                     source: str = "data", out=None) -> TokenizedDataset:
    """Tokenize Samples (any iterable: they are consumed one at a time) into Examples of at most `max_seq_len`
    tokens, truncating/dropping with counts and warnings.

    `out` receives the examples (`append`/`extend`): a new `ExampleWriter` (compact int32 arrays, not lists of Python
    ints) by default, a cache entry's writer, or a list. Raises SlimtuneError when no example is left, saying why
    (so a bad max_seq_len never trains on nothing).
    """
    if max_seq_len < 2:
        raise SlimtuneError(f"max_seq_len must be at least 2 tokens, got {max_seq_len}")
    stats = DataStats()
    examples = ExampleWriter() if out is None else out
    template_checked = False
    for sample in samples:
        stats.records += 1
        if sample.text is not None:
            for example in _text_examples(tokenizer, sample.text, max_seq_len, stats):
                examples.append(example)
            continue
        if not template_checked:
            resolve_chat_template(tokenizer, template)  # fail once, up front, rather than per record
            template_checked = True
        try:
            ids, labels, merges = encode_chat(tokenizer, sample.messages, template)
        except SlimtuneError as exc:
            raise SlimtuneError(f"{sample.where}: {exc}") from exc
        stats.boundary_merges += merges
        if len(ids) > max_seq_len:
            stats.truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(label == IGNORE_INDEX for label in labels):
                stats.dropped += 1
                continue
        examples.append(Example(ids, labels))
    stats.examples = len(examples)
    if stats.truncated:
        log.warning("%s: %d of %d examples were longer than max_seq_len=%d tokens and were truncated; %d of them "
                    "lost their whole response and were dropped", source, stats.truncated, stats.records,
                    max_seq_len, stats.dropped)
    if stats.boundary_merges:
        log.warning("%s: at %d prompt/response boundaries the tokenizer merged text across the boundary; the merged "
                    "token was learned as part of the reply", source, stats.boundary_merges)
    if not len(examples):
        why = (f"all {stats.dropped} were dropped because their response starts after max_seq_len={max_seq_len} "
               "tokens; raise max_seq_len or shorten the prompts") if stats.dropped else "the file holds no records"
        raise SlimtuneError(f"{source}: no training examples left after filtering {stats.records} records: {why}")
    return TokenizedDataset(written_examples(examples), stats)


@dataclass
class DataSource:
    """One entry of `data=`: a file (or folder) and the column and role maps to read it with."""

    path: str
    column_map: dict
    role_map: dict


def data_sources(data: str | list, column_map: dict, role_map: dict) -> list[DataSource]:
    """The entries of `data=` (one path, or a list of paths and {path, column_map, role_map} mappings); an entry's
    own maps are merged over the dataset.column_map / dataset.role_map given for all."""
    entries = data if isinstance(data, list) else [data]
    out = []
    for i, entry in enumerate(entries, start=1):
        if isinstance(entry, str) and entry:
            out.append(DataSource(entry, dict(column_map), dict(role_map)))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise SlimtuneError(f"data entry {i} ({entry!r}) must be a path, or a mapping with a path and optionally "
                                "its own column_map and role_map, e.g. {path: a.jsonl, column_map: {output: answer}}")
        unknown = sorted(set(entry) - {"path", "column_map", "role_map"})
        if unknown:
            raise SlimtuneError(f"data entry {i} ({entry['path']}): unknown field(s) {', '.join(unknown)}; an entry "
                                "has path, column_map and role_map")
        maps = {}
        for name, common in (("column_map", column_map), ("role_map", role_map)):
            own = entry.get(name) or {}
            if not isinstance(own, dict):
                raise SlimtuneError(f"data entry {i} ({entry['path']}): {name} must be a mapping, got {own!r}")
            maps[name] = {**common, **own}
        out.append(DataSource(entry["path"], **maps))
    return out


def load_instruction_data(path: str | Path, tokenizer, max_seq_len: int, template: str | None = None,
                          column_map: dict | None = None, pack: bool = False, val_fraction: float = 0.0,
                          val_path: str | Path | None = None, seed: int = 0, text_separator: str | None = None,
                          role_map: dict | None = None, cache: TokenCache | None = None
                          ) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Read, format, tokenize, mask, truncate, split and (optionally) pack SFT data. Returns (train, val or None).

    Validation data comes from `val_path` when given (then all of `path` trains and `val_fraction` is ignored),
    else from a `val_fraction` of the records of `path` (chosen by `seed`, see `validation_mask`). `template` names a
    fallback chat template (or is a Jinja string); None uses the tokenizer's own.

    Records stream from the file through the split into the tokenizer, which writes compact arrays: no Python list
    of records or of token ids is built, however large the file (a split first counts the records). With a `cache`
    (`slimtune.data.cache`), tokenized splits are read back from it, memory-mapped, when the data and every setting
    they depend on are unchanged, and stored otherwise; then the data file is not read at all.
    """
    # datasets converts parquet into Arrow files once: next to the run's cache, except in a dry run (its own default)
    cache_dir = cache.folder if cache is not None and cache.write else None
    if val_path is not None:
        val_fraction = 0.0

    @functools.cache
    def mask() -> np.ndarray | None:
        if val_fraction == 0.0:
            return None
        n = count_records(path, text_separator, cache_dir) or len(require_records([], path))
        return validation_mask(n, val_fraction, seed, str(path))

    def tokenized(side: int, source: str) -> TokenizedDataset:
        def tokenize(out=None) -> TokenizedDataset:
            if side == 1 and val_path is not None:
                samples = iter_samples(val_path, column_map, text_separator, role_map, cache_dir)
            else:
                samples = split_side(iter_samples(path, column_map, text_separator, role_map, cache_dir), mask(), side)
            return tokenize_samples(samples, tokenizer, max_seq_len, template, source=source, out=out)

        if cache is None:
            return tokenize()
        key = {"data": files_fingerprint(path), "val_data": val_path and files_fingerprint(val_path),
               "side": side, "val_fraction": val_fraction, "seed": seed, "tokenizer": tokenizer_fingerprint(tokenizer),
               "template": template, "max_seq_len": max_seq_len, "column_map": column_map, "role_map": role_map,
               "text_separator": text_separator}
        return cache.get(key, tokenize)

    if not 0.0 <= val_fraction < 1.0:
        raise SlimtuneError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_path is not None:  # a bad validation file fails now, not after the training data is tokenized
        next(iter_samples(val_path, column_map, text_separator, role_map, cache_dir))
    train = tokenized(0, str(path))
    val = None
    if val_path is not None or val_fraction > 0:
        val = tokenized(1, str(val_path) if val_path else f"{path} (validation split)")
    if pack:
        train = pack_examples(train, max_seq_len)
        val = pack_examples(val, max_seq_len) if val is not None else None
    return train, val
