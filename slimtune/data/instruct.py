"""Instruction and classification data for fine-tuning Hugging Face models.

Input files (one format per file, detected from the first record):

    Alpaca    JSON list or JSONL of {"instruction", "input" (optional), "output", "system" (optional)}
    chat      JSONL (or JSON list) of {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    ShareGPT  chat as {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}
    text      a .txt file (one document, or several split by `text_separator`), or JSONL of {"text": "..."}
    classes   JSONL of {"text", "text_pair" (optional), "label" (int or string)}  (`load_classification_data`)

The same records may come as the rows of a .parquet or .arrow file, a `datasets` save_to_disk folder or a folder of
parquet shards, read through Hugging Face `datasets` (`slimtune.data.hf_datasets`).

`column_map` renames fields, canonical name → name in the file: {"instruction": "question", "output": "answer"},
{"messages": "dialog", "role": "speaker", "content": "text"}. `role_map` names other roles: {"bot": "assistant"}
(human, gpt, bot, model and chatgpt are known).

Conversations are rendered with the tokenizer's chat template, or a named fallback template (`CHAT_TEMPLATES`) for
tokenizers that have none. The loss covers only what the assistant says: every token of a system or user turn, and
of the template's markup before an assistant reply, gets the label -100 (ignored by the cross-entropy). Plain-text
documents are language-modelled on all their tokens.

Labels are aligned with input_ids (labels[t] is the target of token t), as Hugging Face models expect: the model
shifts them internally, predicting labels[t+1] from the tokens up to t. So labels[0] of every example is -100 by
construction, which also keeps packed neighbours apart (see `pack_examples`).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import jinja2
import numpy as np
import torch

from slimtune.errors import SlimtuneError

if TYPE_CHECKING:
    from slimtune.data.cache import TokenCache

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompts, padding); PyTorch's cross-entropy default `ignore_index`."""

# ---------------------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------------------

# Fallback templates for tokenizers without one (base models, tokenizers trained from scratch). Both end every
# assistant turn with the tokenizer's EOS token, so a model fine-tuned on them learns to stop after its reply.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
        "{%- if message['role'] == 'assistant' and eos_token and eos_token != '<|im_end|>' %}"
        "{{- eos_token }}"
        "{%- endif %}"
        "{{- '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "alpaca": (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' + message['content'] }}"
        "{%- if eos_token %}{{- eos_token }}{%- endif %}{{- '\\n\\n' }}"
        "{%- else %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
    ),
}


def resolve_chat_template(tokenizer, template: str | None = None) -> str:
    """The Jinja chat template to use: a named fallback (`CHAT_TEMPLATES`), a raw Jinja string, or the tokenizer's.

    `template=None` means the tokenizer's own template; a tokenizer without one is an error listing the names.
    """
    if template:
        if template in CHAT_TEMPLATES:
            return CHAT_TEMPLATES[template]
        if "{{" in template or "{%" in template:
            return template
        raise SlimtuneError(f"unknown chat template {template!r}; choose one of {', '.join(CHAT_TEMPLATES)}, "
                            "or pass a Jinja template string")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # some tokenizers keep several named templates; "default" is the chat one
        own = own.get("default")
    if not own:
        raise SlimtuneError(
            f"the tokenizer has no chat template, so conversations cannot be formatted; choose a fallback template "
            f"(dataset.chat_template=NAME for train, --chat-template NAME for chat/generate/eval), one of: "
            f"{', '.join(CHAT_TEMPLATES)}"
        )
    return own


def render_chat(tokenizer, messages: list[dict], template: str | None = None,
                add_generation_prompt: bool = False) -> str:
    """A conversation rendered to text by the chat template (see `resolve_chat_template`)."""
    chat_template = resolve_chat_template(tokenizer, template)
    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        raise SlimtuneError(f"the chat template cannot render this conversation: {exc}") from exc


def encode_text(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`. Rendered chat text already holds its special tokens, hence no extra BOS by default."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def encode_chat(tokenizer, messages: list[dict], template: str | None = None) -> tuple[list[int], list[int], int]:
    """Token ids and labels of a conversation, with loss only on assistant turns.

    Returns `(input_ids, labels, boundary_merges)`, both lists of length T (tokens). An assistant turn spans from
    the end of the rendered prompt before it (conversation so far + generation prompt) to the end of the rendered
    conversation through it; both are located by tokenizing those prefixes and comparing them with the full
    tokenization. Tokenizers usually tokenize a prefix the same way as the start of the full text; where one merges
    characters across the boundary (e.g. a prompt ending in a space before a reply word), the span starts at the
    first token where the two differ, so the merged token is learned as the start of the reply (it holds reply
    text). `boundary_merges` counts those cases (0 normally).
    """
    chat_template = resolve_chat_template(tokenizer, template)
    full_ids = encode_text(tokenizer, render_chat(tokenizer, messages, chat_template))
    labels = [IGNORE_INDEX] * len(full_ids)
    merges = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_ids = encode_text(tokenizer, render_chat(tokenizer, messages[:i], chat_template,
                                                        add_generation_prompt=True))
        through_ids = encode_text(tokenizer, render_chat(tokenizer, messages[: i + 1], chat_template))
        start = _common_prefix_len(prompt_ids, full_ids)
        end = _common_prefix_len(through_ids, full_ids)
        merges += (start < len(prompt_ids)) + (end < len(through_ids))
        labels[start:end] = full_ids[start:end]
    if labels:
        labels[0] = IGNORE_INDEX  # never a target (see module docstring); keeps packed neighbours apart
    return full_ids, labels, merges


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------

CANONICAL_FIELDS = ("instruction", "input", "output", "system", "messages", "role", "content", "text", "text_pair",
                    "label")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                "chatgpt": "assistant"}
ROLES = ("system", "user", "assistant")
SHAREGPT_FIELDS = {"messages": "conversations", "role": "from", "content": "value"}
"""ShareGPT's names of the chat fields (canonical name → name in the file)."""
REQUIRED_FIELDS = {"chat": ("messages",), "alpaca": ("instruction", "output"), "text": ("text",)}


@dataclass
class Sample:
    """One record read from a file, before tokenization. Exactly one of `messages`, `text` is set."""

    where: str
    """Location for error messages, e.g. `train.jsonl:12` (line 12) or `train.json record 3`."""
    messages: list[dict] | None = None
    text: str | None = None
    text_pair: str | None = None
    label: int | str | None = None


def _check_column_map(column_map: dict | None) -> dict:
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
    from slimtune.data import hf_datasets

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


def _require_records(samples: list, path: str | Path) -> list:
    """`samples` unchanged, or a SlimtuneError when the file held none: an empty data file is always the wrong one."""
    if not samples:
        raise SlimtuneError(f"{path}: the file has no records (it is empty, holds only blank lines or an empty JSON "
                            "list); give a JSONL file with one JSON object per line, or a .json list of objects")
    return samples


def _field(record: dict, name: str, column_map: dict, where: str, required: bool = True, kind=str):
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


def format_of(fields, column_map: dict) -> str | None:
    """The format (chat, sharegpt, alpaca, text) whose key field is among `fields` (a record, or column names)."""
    for fmt, key in (("chat", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction"), ("text", "text")):
        if fmt == "sharegpt":
            if "messages" not in column_map and key in fields:
                return fmt
        elif column_map.get(key, key) in fields:
            return fmt
    return None


FORMATS_EXPECTED = ("'messages' (chat), 'conversations' (ShareGPT), 'instruction' + 'output' (Alpaca) or 'text' "
                    "(plain text)")


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
    messages = _field(record, "messages", column_map, where, kind=list)
    role_key, content_key = column_map.get("role", "role"), column_map.get("content", "content")
    out = []
    for j, message in enumerate(messages, start=1):
        at = f"{where} message {j}"
        if not isinstance(message, dict):
            raise SlimtuneError(f"{at}: expected an object with {role_key!r} and {content_key!r}")
        name = _field(message, "role", column_map, at)
        role = roles.get(name, name)
        if role not in ROLES:
            known = ", ".join([*ROLES, *roles])
            raise SlimtuneError(f"{at}: unknown role {name!r}; known roles are {known}. Map it to one with "
                                f"dataset.role_map.{name}=assistant (or user, system)")
        out.append({"role": role, "content": _field(message, "content", column_map, at)})
    if not any(m["role"] == "assistant" for m in out):
        raise SlimtuneError(f"{where}: the conversation has no assistant message, so nothing to learn from")
    return Sample(where, messages=out)


def _alpaca_sample(record: dict, column_map: dict, where: str) -> Sample:
    instruction = _field(record, "instruction", column_map, where)
    extra = _field(record, "input", column_map, where, required=False)
    output = _field(record, "output", column_map, where)
    system = _field(record, "system", column_map, where, required=False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Sample(where, messages=messages)


def iter_samples(path: str | Path, column_map: dict | None = None, text_separator: str | None = None,
                 role_map: dict | None = None, cache_dir: str | Path | None = None) -> Iterator[Sample]:
    """The records of an instruction/chat/text file as Samples, one at a time (format detected from the first
    record; see the module doc). A file without records is an error, raised once the file is exhausted.

    A `.txt` file is one document, or several split on `text_separator` (e.g. "\\n\\n\\n"); empty ones are skipped.
    Parquet/Arrow files and `datasets` folders are read through `datasets` (`cache_dir`: see `iter_records`).
    """
    path = Path(path)
    column_map = _check_column_map(column_map)
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
            yield Sample(where, text=_field(record, "text", column_map, where))
    if n == 0:
        _require_records([], path)


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
    from slimtune.data import hf_datasets

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


# ---------------------------------------------------------------------------------------------------------------
# Tokenized datasets
# ---------------------------------------------------------------------------------------------------------------


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


def _written(out) -> Sequence[Example]:
    """What `tokenize_*` wrote into `out`: the writer's arrays, or the list itself."""
    return out.arrays() if hasattr(out, "arrays") else out


def tokenize_samples(samples: Iterable[Sample], tokenizer, max_seq_len: int, template: str | None = None,
                     source: str = "data", out=None) -> TokenizedDataset:
    """Tokenize Samples (any iterable: they are consumed one at a time) into Examples of at most `max_seq_len`
    tokens, truncating/dropping with counts and warnings.

    `out` receives the examples (`append`/`extend`): a new `ExampleWriter` (compact int32 arrays, not lists of Python
    ints) by default, a cache entry's writer, or a list. Raises SlimtuneError when no example is left, saying why
    (so a bad max_seq_len never trains on nothing).
    """
    from slimtune.data.cache import ExampleWriter

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
    return TokenizedDataset(_written(examples), stats)


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


def _side(records: Iterable, mask: np.ndarray | None, side: int) -> Iterator:
    """The records of one side of a split (0 training, 1 validation) as they stream past."""
    for i, record in enumerate(records):
        if mask is None or mask[i] == bool(side):
            yield record


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
        n = count_records(path, text_separator, cache_dir) or len(_require_records([], path))
        return validation_mask(n, val_fraction, seed, str(path))

    def tokenized(side: int, source: str) -> TokenizedDataset:
        def tokenize(out=None) -> TokenizedDataset:
            if side == 1 and val_path is not None:
                samples = iter_samples(val_path, column_map, text_separator, role_map, cache_dir)
            else:
                samples = _side(iter_samples(path, column_map, text_separator, role_map, cache_dir), mask(), side)
            return tokenize_samples(samples, tokenizer, max_seq_len, template, source=source, out=out)

        if cache is None:
            return tokenize()
        from slimtune.data.cache import files_fingerprint, tokenizer_fingerprint

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


# ---------------------------------------------------------------------------------------------------------------
# Classification data
# ---------------------------------------------------------------------------------------------------------------


def iter_classification_samples(path: str | Path, column_map: dict | None = None,
                                cache_dir: str | Path | None = None) -> Iterator[Sample]:
    """The records of a classification file (`text`, optional `text_pair`, `label`: int >= 0 or string) as Samples,
    one at a time; a file without records is an error."""
    column_map = _check_column_map(column_map)
    n = 0
    for where, record in iter_records(path, column_map, cache_dir, task="classify"):
        text = _field(record, "text", column_map, where)
        pair = _field(record, "text_pair", column_map, where, required=False)
        label = _field(record, "label", column_map, where, kind=(int, str))
        if isinstance(label, int) and label < 0:
            raise SlimtuneError(f"{where}: label {label} is negative; integer labels are class ids 0, 1, 2, ...")
        n += 1
        yield Sample(where, text=text, text_pair=pair, label=label)
    if n == 0:
        _require_records([], path)


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
    from slimtune.data.cache import ExampleWriter

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
    return TokenizedDataset(_written(examples), stats, extra={"label2id": label2id})


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
        n = count_records(path, cache_dir=cache_dir) or len(_require_records([], path))
        return validation_mask(n, val_fraction, seed, str(path))

    @functools.cache
    def label2id() -> dict[str, int]:
        # From the whole training file, so a label seen only in the split-off records still has an id.
        return label_mapping(records(path), str(path))

    def tokenized(side: int, source: str, labels: dict | None) -> TokenizedDataset:
        def tokenize(out=None) -> TokenizedDataset:
            samples = records(val_path) if side == 1 and val_path is not None else _side(records(path), mask(), side)
            return tokenize_classification(samples, tokenizer, max_seq_len, labels or label2id(), source, out)

        if cache is None:
            return tokenize()
        from slimtune.data.cache import files_fingerprint, tokenizer_fingerprint

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


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one. Returns int64 tensors:

    input_ids (B, T) padded with pad_id; attention_mask (B, T) 1 on tokens, 0 on padding; labels (B, T) padded with
    -100, or (B,) class ids for classification; position_ids (B, T) only when the examples are packed.
    """
    longest = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    token_labels = not isinstance(examples[0].labels, int)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long) if token_labels else torch.tensor(
        [e.labels for e in examples], dtype=torch.long)
    packed = examples[0].position_ids is not None
    position_ids = torch.zeros((batch, longest), dtype=torch.long) if packed else None
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        if token_labels:
            labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        if packed:
            position_ids[row, :n] = torch.tensor(e.position_ids, dtype=torch.long)
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if packed:
        out["position_ids"] = position_ids
    return out


class InstructionBatches:
    """Shuffled batches over a TokenizedDataset, endlessly, epoch after epoch; deterministic and exactly resumable.

    Epoch e visits the examples in the order of a permutation drawn from numpy's PCG64 seeded with (seed, e), so
    the order depends only on (seed, epoch), never on how many batches were drawn before. The state is therefore
    three numbers: the epoch, the position (examples of this epoch already handed out) and the seed.

    With `world_size > 1` every rank builds the same permutation and takes its own contiguous `batch_size` slice of
    each global batch of `batch_size * world_size` examples; the last incomplete global batch of an epoch is then
    skipped (as with `drop_last=True`), so all ranks always step together.
    """

    def __init__(self, dataset: Sequence[Example], batch_size: int, seed: int, pad_id: int, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise SlimtuneError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last or world_size > 1
        self.global_batch = batch_size * world_size
        if len(dataset) == 0 or (self.drop_last and len(dataset) < self.global_batch):
            raise SlimtuneError(f"{len(dataset)} examples cannot fill one batch of {self.global_batch}; "
                                "lower batch_size or add data")
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.dataset))

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch (see `collate` for the keys and shapes), moving on to the next epoch when one ends."""
        remaining = len(self.dataset) - self.position
        if remaining == 0 or (self.drop_last and remaining < self.global_batch):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        chunk = self._order[self.position:self.position + self.global_batch]
        self.position += len(chunk)
        mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return collate([self.dataset[int(i)] for i in mine], self.pad_id)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != len(self.dataset):
            raise SlimtuneError(f"cannot resume the data order: the checkpoint was taken on {state['num_examples']} "
                                f"examples, the data now has {len(self.dataset)}; use the same data and settings")
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation(self.epoch)


class ConcatExamples(Sequence):
    """Several datasets read as one, in order (the evaluation order of a mix; the plain concatenation of data files
    given without weights)."""

    def __init__(self, parts: Sequence[Sequence[Example]]):
        self.parts = list(parts)
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]


class MixedBatches:
    """Batches drawn from several datasets with mixing weights; deterministic and exactly resumable.

    Every example slot of a global batch picks its dataset at random with probability weight / sum(weights): slot k
    of the run (counted over all batches) uses the choices drawn from PCG64 seeded with (seed, k // CHOICE_BLOCK), so
    a choice depends only on (seed, k). Each dataset hands out its examples in its own shuffled order, epoch after
    epoch, as `InstructionBatches` does (permutation seeded with (seed, epoch, dataset index + 1)); a dataset drawn
    more often than its size simply starts its next epoch. The state is the slot count and each dataset's epoch and
    position. One epoch of the mix (`__len__`, what num_epochs counts) is as many examples as all datasets hold
    together. Under data parallelism every rank draws the same global batches and takes its own slice.
    """

    CHOICE_BLOCK = 4096

    def __init__(self, datasets: Sequence[Sequence[Example]], weights: Sequence[float], batch_size: int, seed: int,
                 pad_id: int, rank: int = 0, world_size: int = 1):
        if len(datasets) != len(weights):
            raise SlimtuneError(f"dataset.weights={list(weights)} has {len(weights)} weights for {len(datasets)} data "
                                f"files; give one weight per entry of data=")
        total = float(sum(weights))
        if total <= 0:
            raise SlimtuneError(f"dataset.weights={list(weights)} must sum to a positive number")
        self.datasets = list(datasets)
        self.probabilities = np.asarray(weights, dtype=np.float64) / total
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.slots = 0
        self.epochs = [0] * len(self.datasets)
        self.positions = [0] * len(self.datasets)
        self._orders = [self._permutation(i, 0) for i in range(len(self.datasets))]
        self._choices: tuple[int, np.ndarray] | None = None

    def _permutation(self, index: int, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch, index + 1]))
        return rng.permutation(len(self.datasets[index]))

    def _choice(self, slot: int) -> int:
        block = slot // self.CHOICE_BLOCK
        if self._choices is None or self._choices[0] != block:
            rng = np.random.Generator(np.random.PCG64([self.seed, block]))
            self._choices = (block, rng.choice(len(self.datasets), size=self.CHOICE_BLOCK, p=self.probabilities))
        return int(self._choices[1][slot % self.CHOICE_BLOCK])

    def _next_example(self, index: int) -> Example:
        if self.positions[index] == len(self.datasets[index]):
            self.epochs[index] += 1
            self.positions[index] = 0
            self._orders[index] = self._permutation(index, self.epochs[index])
        position = self.positions[index]
        self.positions[index] += 1
        return self.datasets[index][int(self._orders[index][position])]

    def __len__(self) -> int:
        """Batches per epoch of the mix."""
        return -(-sum(len(d) for d in self.datasets) // self.global_batch)

    def next_batch(self) -> dict[str, torch.Tensor]:
        chosen = [self._choice(self.slots + j) for j in range(self.global_batch)]
        self.slots += self.global_batch
        examples = [self._next_example(i) for i in chosen]  # every rank advances every dataset alike
        return collate(examples[self.rank * self.batch_size:(self.rank + 1) * self.batch_size], self.pad_id)

    def state_dict(self) -> dict:
        return {"slots": self.slots, "epochs": list(self.epochs), "positions": list(self.positions), "seed": self.seed,
                "num_examples": [len(d) for d in self.datasets], "probabilities": self.probabilities.tolist()}

    def load_state_dict(self, state: dict) -> None:
        now = {"num_examples": [len(d) for d in self.datasets], "probabilities": self.probabilities.tolist()}
        if "slots" not in state or any(state[k] != v for k, v in now.items()):
            raise SlimtuneError(f"cannot resume the data order: the checkpoint was taken on another mix of data "
                                f"({state.get('num_examples')} examples), the data now has "
                                f"{now['num_examples']} examples with shares {now['probabilities']}; use the same data "
                                f"and dataset.weights")
        self.seed, self.slots = state["seed"], state["slots"]
        self.epochs, self.positions = list(state["epochs"]), list(state["positions"])
        self._orders = [self._permutation(i, e) for i, e in enumerate(self.epochs)]


def eval_batches(dataset: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over `dataset` in order, in batches of `batch_size` (the last may be smaller)."""
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id)
