"""Reading fine-tuning data files into `Sample`s, one record at a time, and choosing the records held out.

Records come from JSON/JSONL files, or through `datasets` (`slimtune.data.hf_datasets`); their formats are
`slimtune.data.formats`. `column_map` renames fields, canonical name → name in the file: {"instruction": "question",
"output": "answer"}, {"messages": "dialog", "role": "speaker", "content": "text"}. `role_map` names other roles:
{"bot": "assistant"} (human, gpt, bot, model and chatgpt are known).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimtune.data import hf_datasets
from slimtune.data.formats import (CANONICAL_FIELDS, FORMATS_EXPECTED, ROLE_ALIASES, ROLES, SHAREGPT_FIELDS,
                                   format_of)
from slimtune.errors import SlimtuneError


@dataclass
class Sample:
    """One record read from a file, before tokenization. Exactly one of `messages`, `text` is set."""

    where: str
    """Location for error messages, e.g. `train.jsonl:12` (line 12) or `train.json record 3`."""
    messages: list[dict] | None = None
    text: str | None = None
    text_pair: str | None = None
    label: int | str | None = None


def check_column_map(column_map: dict | None) -> dict:
    column_map = dict(column_map or {})
    for key in column_map:
        if key not in CANONICAL_FIELDS:
            close = difflib.get_close_matches(key, CANONICAL_FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SlimtuneError(f"column_map key {key!r} is not a field slimtune reads{hint}; keys are canonical "
                                f"field names ({', '.join(CANONICAL_FIELDS)}) and values the names in your file")
    return column_map


def _check_role_map(role_map: dict | None) -> dict:
    """The known role aliases with `role_map` (name in the file → system, user or assistant) merged over them."""
    for name, role in (role_map or {}).items():
        if role not in ROLES:
            raise SlimtuneError(f"dataset.role_map.{name}={role!r} is not a role slimtune trains on; map it to one of "
                                f"{', '.join(ROLES)}")
    return {**ROLE_ALIASES, **(role_map or {})}


def iter_records(path: str | Path, column_map: dict, cache_dir: str | Path | None = None,
                 task: str = "lm") -> Iterator[tuple[str, dict]]:
    """(location, record) for each record of a JSON/JSONL file, or each row of a file or folder read through
    `datasets` (see `slimtune.data.hf_datasets`: its columns are checked first against the format, lm or classify;
    `cache_dir` holds what `datasets` converts parquet into)."""
    if hf_datasets.is_datasets_input(Path(path)):
        return hf_datasets.iter_rows(path, cache_dir, column_map, task)
    return iter_json_records(path)


def iter_json_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(location, record) for each object in a JSONL file (one per non-blank line) or a JSON list file.

    A file without records (empty, only blank lines, `[]`) yields nothing; the data readers make that an error.
    """
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"data file {path} does not exist")
    if path.suffix.lower() == ".json":
        text = _decode(path.read_bytes(), path, 1)
        if not text.strip():
            return
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SlimtuneError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
        if not isinstance(records, list):
            raise SlimtuneError(f"{path}: a .json data file must hold a list of records, found a "
                                f"{type(records).__name__}; use JSONL for one record per line")
        for i, record in enumerate(records, start=1):
            where = f"{path} record {i}"
            if not isinstance(record, dict):
                raise SlimtuneError(f"{where}: expected a JSON object, found {type(record).__name__}")
            yield where, record
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlimtuneError(
                    f"{where}: line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})") from exc
            if not isinstance(record, dict):
                raise SlimtuneError(f"{where}: expected a JSON object, found {type(record).__name__}")
            yield where, record


def _decode(data: bytes, path: Path, first_line: int) -> str:
    """`data` (a file, or one line of it starting at line `first_line`) as UTF-8 text (a BOM tolerated)."""
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data[:exc.start].count(b"\n")
        raise SlimtuneError(f"{path}:{line}: not valid UTF-8 (byte {data[exc.start]:#04x}); save the file as "
                            f"UTF-8") from None


def require_records(samples: list, path: str | Path) -> list:
    """`samples` unchanged, or a SlimtuneError when the file held none: an empty data file is always the wrong one."""
    if not samples:
        raise SlimtuneError(f"{path}: the file has no records (it is empty, holds only blank lines or an empty JSON "
                            "list); give a JSONL file with one JSON object per line, or a .json list of objects")
    return samples


def record_field(record: dict, name: str, column_map: dict, where: str, required: bool = True, kind=str):
    key = column_map.get(name, name)
    if key not in record or record[key] is None:
        if not required:
            return None
        renamed = f" (mapped from {name!r} by column_map)" if key != name else ""
        raise SlimtuneError(f"{where}: record has no {key!r} field{renamed}; fields present: "
                            f"{', '.join(map(repr, record)) or 'none'}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SlimtuneError(f"{where}: field {key!r} must be {expected}, found {type(value).__name__}")
    return value


def _detect_format(record: dict, column_map: dict, where: str) -> tuple[str, dict]:
    """The format of a file from its first record, and the column map to read it with (ShareGPT's names added)."""
    fmt = format_of(record, column_map)
    if fmt is None:
        raise SlimtuneError(
            f"{where}: cannot tell the data format: the record has fields {', '.join(map(repr, record))}; expected "
            f"{FORMATS_EXPECTED}. Map other names with column_map, e.g. {{\"instruction\": \"question\", "
            "\"output\": \"answer\"}"
        )
    if fmt != "sharegpt":
        return fmt, column_map
    turns = record.get("conversations")
    first = turns[0] if isinstance(turns, list) and turns else {}
    # ShareGPT exports name the turn fields from/value; some use role/content inside `conversations`
    names = SHAREGPT_FIELDS if isinstance(first, dict) and "from" in first else {"messages": "conversations"}
    return "chat", {**names, **column_map}


def _chat_sample(record: dict, column_map: dict, where: str, roles: dict) -> Sample:
    messages = record_field(record, "messages", column_map, where, kind=list)
    role_key, content_key = column_map.get("role", "role"), column_map.get("content", "content")
    out = []
    for j, message in enumerate(messages, start=1):
        at = f"{where} message {j}"
        if not isinstance(message, dict):
            raise SlimtuneError(f"{at}: expected an object with {role_key!r} and {content_key!r}")
        name = record_field(message, "role", column_map, at)
        role = roles.get(name, name)
        if role not in ROLES:
            known = ", ".join([*ROLES, *roles])
            raise SlimtuneError(f"{at}: unknown role {name!r}; known roles are {known}. Map it to one with "
                                f"dataset.role_map.{name}=assistant (or user, system)")
        out.append({"role": role, "content": record_field(message, "content", column_map, at)})
    if not any(m["role"] == "assistant" for m in out):
        raise SlimtuneError(f"{where}: the conversation has no assistant message, so nothing to learn from")
    return Sample(where, messages=out)


def _alpaca_sample(record: dict, column_map: dict, where: str) -> Sample:
    instruction = record_field(record, "instruction", column_map, where)
    extra = record_field(record, "input", column_map, where, required=False)
    output = record_field(record, "output", column_map, where)
    system = record_field(record, "system", column_map, where, required=False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Sample(where, messages=messages)


def iter_samples(path: str | Path, column_map: dict | None = None, text_separator: str | None = None,
                 role_map: dict | None = None, cache_dir: str | Path | None = None) -> Iterator[Sample]:
    """The records of an instruction/chat/text file as Samples, one at a time (format detected from the first
    record; see `slimtune.data.formats`). A file without records is an error, raised once the file is exhausted.

    A `.txt` file is one document, or several split on `text_separator` (e.g. "\\n\\n\\n"); empty ones are skipped.
    Parquet/Arrow files and `datasets` folders are read through `datasets` (`cache_dir`: see `iter_records`).
    """
    path = Path(path)
    column_map = check_column_map(column_map)
    roles = _check_role_map(role_map)
    if path.suffix.lower() in (".txt", ".md"):
        docs = _text_documents(path, text_separator)
        if not docs:
            raise SlimtuneError(f"{path}: the file has no text (it is empty or holds only whitespace); check the path")
        for i, doc in docs:
            yield Sample(f"{path} document {i}", text=doc)
        return
    fmt, n = None, 0
    for where, record in iter_records(path, column_map, cache_dir):
        if fmt is None:
            fmt, column_map = _detect_format(record, column_map, where)
        n += 1
        if fmt == "chat":
            yield _chat_sample(record, column_map, where, roles)
        elif fmt == "alpaca":
            yield _alpaca_sample(record, column_map, where)
        else:
            yield Sample(where, text=record_field(record, "text", column_map, where))
    if n == 0:
        require_records([], path)


def _text_documents(path: Path, text_separator: str | None) -> list[tuple[int, str]]:
    """(number, text) of the non-empty documents of a text file."""
    if not path.is_file():
        raise SlimtuneError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    docs = text.split(text_separator) if text_separator else [text]
    return [(i, d) for i, d in enumerate(docs, start=1) if d.strip()]


def read_samples(path: str | Path, column_map: dict | None = None, text_separator: str | None = None,
                 role_map: dict | None = None, cache_dir: str | Path | None = None) -> list[Sample]:
    """All the Samples of a file as a list (`iter_samples`); for small files (evaluation sets, tests). Training
    streams its records instead (`load_instruction_data`)."""
    return list(iter_samples(path, column_map, text_separator, role_map, cache_dir))


def count_records(path: str | Path, text_separator: str | None = None, cache_dir: str | Path | None = None) -> int:
    """How many records `iter_samples` (or `iter_classification_samples`) yields for `path`, without making them:
    the row count of a dataset, the non-blank lines of a JSONL file, the documents of a text file. Bad records are
    not checked here; reading them raises."""
    path = Path(path)
    if path.suffix.lower() in (".txt", ".md"):
        return len(_text_documents(path, text_separator))
    if hf_datasets.is_datasets_input(path):
        return len(hf_datasets.load(path, cache_dir))
    if path.suffix.lower() == ".json":
        return sum(1 for _ in iter_json_records(path))
    if not path.is_file():
        raise SlimtuneError(f"data file {path} does not exist")
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def validation_mask(n: int, val_fraction: float, seed: int, source: str = "data") -> np.ndarray | None:
    """Which of `n` records are held out for validation (a boolean array, one byte a record), deterministic given
    `seed`; None when nothing is held out. Both sides keep file order.

    The validation set has round(n * val_fraction) records (at least 1 when val_fraction > 0), drawn without
    replacement by numpy's PCG64 seeded with `seed`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SlimtuneError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return None
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise SlimtuneError(f"{source}: dataset.val_fraction={val_fraction} of {n} records leaves nothing to train "
                            "on; add records, lower dataset.val_fraction or give a separate validation file "
                            "(dataset.val_data)")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.Generator(np.random.PCG64(seed)).choice(n, size=n_val, replace=False)] = True
    return mask


def split_side(records: Iterable, mask: np.ndarray | None, side: int) -> Iterator:
    """The records of one side of a split (0 training, 1 validation) as they stream past."""
    for i, record in enumerate(records):
        if mask is None or mask[i] == bool(side):
            yield record
