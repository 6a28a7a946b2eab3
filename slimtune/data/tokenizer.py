"""Tokenizers for from-scratch training: character-level (built from the corpus) or a Hugging Face tokenizer folder.

A tokenizer is described by a small JSON-able dict stored in `meta.json` (and copied into every checkpoint), so
data folders and checkpoints are self-describing: `load_tokenizer(meta, folder)` rebuilds it anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from slimtune.errors import SlimtuneError


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def describe(self) -> dict: ...


class CharTokenizer:
    """One token per Unicode code point seen in the training corpus, ids in code-point order."""

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_code_points(cls, code_points) -> "CharTokenizer":
        return cls([chr(int(c)) for c in sorted(code_points)])

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as exc:
            raise SlimtuneError(
                f"character {exc.args[0]!r} is not in this character-level vocabulary "
                f"(it never occurred in the training text); remove it from the prompt"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def describe(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (never from the network)."""

    def __init__(self, path: str | Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise SlimtuneError("a Hugging Face tokenizer needs transformers: pip install 'slimtune[hf]'") from None
        path = Path(path)
        if not path.is_dir():
            raise SlimtuneError(f"tokenizer folder {path} does not exist (expected a folder with tokenizer.json)")
        self.path = path
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def describe(self) -> dict:
        return {"kind": "hf", "folder": "tokenizer"}

    def save(self, folder: Path) -> None:
        self.tok.save_pretrained(str(folder / "tokenizer"))


def load_tokenizer(meta: dict, folder: str | Path) -> Tokenizer:
    """Rebuild the tokenizer described in `meta["tokenizer"]`; HF files live in `folder/tokenizer/`."""
    desc = meta.get("tokenizer")
    if not isinstance(desc, dict) or "kind" not in desc:
        raise SlimtuneError(f"{Path(folder) / 'meta.json'} has no tokenizer description; re-run slimtune prepare")
    if desc["kind"] == "char":
        return CharTokenizer(desc["chars"])
    if desc["kind"] == "hf":
        return HFTokenizer(Path(folder) / desc.get("folder", "tokenizer"))
    raise SlimtuneError(f"{Path(folder) / 'meta.json'}: unknown tokenizer kind {desc['kind']!r}")
