"""`slimtune prepare`: text file(s) → `train.bin` / `val.bin` token memmaps plus `meta.json`.

Files are streamed in chunks, so a corpus larger than memory works; a progress bar shows the bytes read. The
token dtype is uint16 when the vocabulary fits (half the disk and page cache of uint32), uint32 otherwise.
The last `val_fraction` of the tokens becomes the validation split.
"""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from slimtune.atomic import write_folder_atomically
from slimtune.data.tokenizer import CharTokenizer, HFTokenizer
from slimtune.errors import SlimtuneError

CHUNK_BYTES = 4 << 20  # 4 MiB of text per read
PROGRESS_MIN_BYTES = 16 << 20  # show a progress bar for inputs larger than this

MIN_WINDOW_TOKENS = 2
"""Tokens in the shortest training window: one input token and its next-token target."""

SMALL_SPLIT_TOKENS = 65
"""A split with fewer tokens fits no window of 64 tokens (block_size + 1 are read per window): too short a
context to learn anything, so `prepare` warns about it."""


def _line_of(path: Path, offset: int) -> int:
    """1-based line number of byte `offset` in `path`."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def iter_text(paths: list[Path], progress: bool = True):
    """Yield decoded text chunks of every file in turn; a chunk never ends inside a line (so no token is split).

    Invalid UTF-8 raises a SlimtuneError naming the file, byte offset and line.
    """
    total = sum(p.stat().st_size for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not progress or total < PROGRESS_MIN_BYTES)
    try:
        for path in paths:
            decoder = codecs.getincrementaldecoder("utf-8")()
            offset = 0  # bytes of this file handed to the decoder so far
            carry = ""
            with open(path, "rb") as f:
                while True:
                    raw = f.read(CHUNK_BYTES)
                    final = not raw
                    pending = len(decoder.getstate()[0])  # undecoded bytes carried from the previous chunk
                    try:
                        text = decoder.decode(raw, final=final)
                    except UnicodeDecodeError as exc:
                        bad = offset - pending + exc.start
                        raise SlimtuneError(
                            f"{path}: not valid UTF-8 at byte offset {bad} (line {_line_of(path, bad)}): "
                            f"byte 0x{(raw[exc.start - pending] if exc.start >= pending else 0):02x}. "
                            f"Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove that byte."
                        ) from None
                    offset += len(raw)
                    bar.update(len(raw))
                    text = carry + text
                    if final:
                        if text:
                            yield text
                        break
                    cut = text.rfind("\n") + 1
                    if cut == 0:
                        carry = text
                        continue
                    carry = text[cut:]
                    yield text[:cut]
    finally:
        bar.close()


def _char_vocab(paths: list[Path], progress: bool) -> CharTokenizer:
    seen: set[int] = set()
    for text in iter_text(paths, progress):
        seen.update(np.unique(np.frombuffer(text.encode("utf-32-le"), dtype="<u4")).tolist())
    return CharTokenizer.from_code_points(seen)


def _encode_chars(tokenizer: CharTokenizer, text: str) -> np.ndarray:
    table = np.array(sorted(ord(c) for c in tokenizer.chars), dtype=np.uint32)
    cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return np.searchsorted(table, cps)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def small_split_warnings(n_train: int, n_val: int, val_fraction: float) -> list[str]:
    """What is wrong with splits of `n_train` / `n_val` tokens too small to train or validate on (empty if none)."""
    problems = []
    for split, n, remedy in (("train", n_train, f"a smaller val_fraction (now {val_fraction})"),
                             ("val", n_val, f"a larger val_fraction (now {val_fraction})")):
        if n >= SMALL_SPLIT_TOKENS:
            continue
        if n < MIN_WINDOW_TOKENS:
            what = (f"fewer than the {MIN_WINDOW_TOKENS} of the shortest window (a token and its target), so "
                    f"{'training' if split == 'train' else 'validation'} on it fails")
        else:
            what = f"enough only for windows of block_size <= {n - 1}"
        problems.append(f"the {split} split has only {n} token{'s' * (n != 1)}: {what}; use a larger corpus or "
                        f"{remedy}")
    return problems


def prepare(inputs: list[str | Path], out_dir: str | Path, tokenizer: str = "char", val_fraction: float = 0.1,
            progress: bool = True) -> dict:
    """Tokenize `inputs` into `out_dir`/{train.bin, val.bin, meta.json}; returns the meta dict.

    tokenizer: "char" (vocabulary built from the corpus) or the path of a Hugging Face tokenizer folder. A split
    too small to train or validate on (`small_split_warnings`) is still written, with a `warning:` line on stderr.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise SlimtuneError("slimtune prepare needs at least one input text file")
    for p in paths:
        if not p.is_file():
            raise SlimtuneError(f"input file {p} does not exist")
    if not 0.0 < val_fraction < 1.0:
        raise SlimtuneError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    out_dir = Path(out_dir)

    if tokenizer == "char":
        tok = _char_vocab(paths, progress)
        encode = lambda text: _encode_chars(tok, text)  # noqa: E731
    else:
        tok = HFTokenizer(tokenizer)
        encode = lambda text: np.asarray(tok.encode(text), dtype=np.int64)  # noqa: E731
    if tok.vocab_size == 0:
        raise SlimtuneError(f"the input files ({', '.join(map(str, paths))}) contain no text")
    dtype = token_dtype(tok.vocab_size)

    if out_dir.exists() and not (out_dir / "meta.json").is_file():
        raise SlimtuneError(f"{out_dir} exists and is not a slimtune data folder; choose another --out")
    meta: dict = {}

    def write(tmp: Path) -> None:
        n_tokens = 0
        with open(tmp / "all.bin", "wb") as f:
            for text in iter_text(paths, progress):
                ids = encode(text)
                f.write(ids.astype(dtype).tobytes())
                n_tokens += len(ids)
        if n_tokens == 0:
            raise SlimtuneError(f"the input files ({', '.join(map(str, paths))}) contain no tokens")
        all_ids = np.memmap(tmp / "all.bin", dtype=dtype, mode="r")
        n_val = max(1, int(n_tokens * val_fraction))
        n_train = n_tokens - n_val
        all_ids[:n_train].tofile(tmp / "train.bin")
        all_ids[n_train:].tofile(tmp / "val.bin")
        del all_ids
        (tmp / "all.bin").unlink()
        if isinstance(tok, HFTokenizer):
            tok.save(tmp)
        meta.update({
            "tokenizer": tok.describe(),
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "train_tokens": int(n_train),
            "val_tokens": int(n_val),
            "sources": [str(p.resolve()) for p in paths],
        })
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))

    # A crash never leaves a half-written data folder, and an earlier one is replaced only by a complete one.
    write_folder_atomically(out_dir, write, replace=True)
    for warning in small_split_warnings(meta["train_tokens"], meta["val_tokens"], val_fraction):
        print(f"warning: {out_dir}: {warning}", file=sys.stderr)
    return meta


def read_meta(data_dir: str | Path) -> dict:
    """Load and check `meta.json` of a prepared data folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SlimtuneError(
            f"data folder {data_dir} does not exist; create it with `slimtune prepare INPUT.txt --out {data_dir}`"
        )
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise SlimtuneError(f"{meta_path} is missing: {data_dir} was not written by `slimtune prepare`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SlimtuneError(f"{meta_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    for key in ("vocab_size", "dtype", "tokenizer"):
        if key not in meta:
            raise SlimtuneError(f"{meta_path} lacks the key {key!r}; re-run slimtune prepare")
    return meta
