"""Text generation with Hugging Face models: batch prompts, JSONL files, and an interactive streaming chat.

Sampling: `temperature=0` is greedy decoding (deterministic); otherwise tokens are sampled at that temperature from
the `top_k` most likely (`top_k=None` or 0: from the whole vocabulary). Sampling runs under a forked RNG seeded with
`seed`, so the same call gives the same text and the caller's random state (e.g. a training run's, which exact
resume depends on) is left untouched.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import torch
from transformers import TextStreamer

from slimtune.data.records import iter_json_records
from slimtune.data.templates import encode_text, render_chat
from slimtune.errors import SlimtuneError


def _prompt_ids(tokenizer, prompt: str | list[dict], chat: bool, template: str | None,
                system_prompt: str | None) -> list[int]:
    """Token ids of one prompt: a chat turn (str → one user message, or a list of messages) or raw text."""
    if not chat:
        if not isinstance(prompt, str):
            raise SlimtuneError("chat=False needs plain-text prompts, not message lists")
        return encode_text(tokenizer, prompt, add_special_tokens=True)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return encode_text(tokenizer, render_chat(tokenizer, messages, template, add_generation_prompt=True))


def _stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the model's generation-config EOS id(s) (chat models often list several, e.g.
    end-of-turn and end-of-text) plus the tokenizer's EOS token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def _sampling_kwargs(model, tokenizer, max_new_tokens: int, temperature: float, top_k: int | None) -> dict:
    if max_new_tokens < 1:
        raise SlimtuneError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise SlimtuneError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    stop = _stop_ids(model, tokenizer)
    if stop:
        kwargs["eos_token_id"] = stop
    if temperature == 0:
        # Set every sampling knob explicitly so a model's generation_config (e.g. temperature=0.6) cannot leak in.
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=1.0)
    return kwargs


@contextmanager
def _inference(model: torch.nn.Module, seed: int):
    """Eval mode, no autograd, a private RNG stream; restores the model's mode and the global RNG afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)


def generate(model, tokenizer, prompts: list[str] | list[list[dict]], max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0, chat: bool = True,
             template: str | None = None, system_prompt: str | None = None, batch_size: int = 8) -> list[str]:
    """Generate one reply per prompt; returns the decoded new text (special tokens removed, stripped).

    With `chat=True` each prompt (a string, or a list of {role, content} messages) is formatted with the chat
    template (see `slimtune.data.templates.resolve_chat_template`) plus the generation prompt; with `chat=False`
    it is continued as raw text. Prompts run `batch_size` at a time, left-padded (so every row's new tokens start
    at the same column); with greedy decoding, results do not depend on the batch size up to float rounding.
    """
    gen_kwargs = _sampling_kwargs(model, tokenizer, max_new_tokens, temperature, top_k)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SlimtuneError("the tokenizer has neither a pad nor an EOS token; batch generation needs one")
    device = next(model.parameters()).device
    outputs: list[str] = []
    with _inference(model, seed):
        for start in range(0, len(prompts), batch_size):
            rows = [_prompt_ids(tokenizer, p, chat, template, system_prompt) for p in prompts[start:start + batch_size]]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T), left-padded
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                attention_mask[i, width - len(r):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 **gen_kwargs)  # (B, T + new)
            for row in out[:, width:]:
                outputs.append(tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
    return outputs


class _WriterStreamer(TextStreamer):
    """A TextStreamer that writes to any text stream and keeps the whole reply."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.parts: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.parts.append(text)
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def stream_reply(model, tokenizer, messages: list[dict], out: TextIO = sys.stdout, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_k: int | None = 50, seed: int = 0, template: str | None = None) -> str:
    """Generate the assistant's reply to a conversation, writing it to `out` word by word; returns the reply."""
    gen_kwargs = _sampling_kwargs(model, tokenizer, max_new_tokens, temperature, top_k)
    device = next(model.parameters()).device
    ids = torch.tensor([_prompt_ids(tokenizer, messages, True, template, None)], dtype=torch.long).to(device)  # (1, T)
    streamer = _WriterStreamer(tokenizer, out)
    with _inference(model, seed):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **gen_kwargs)
    return "".join(streamer.parts).strip()


def chat_loop(model, tokenizer, input: Iterable[str] = sys.stdin, out: TextIO = sys.stdout,
              max_new_tokens: int = 256, temperature: float = 0.7, top_k: int | None = 50, seed: int = 0,
              template: str | None = None, system_prompt: str | None = None, max_context: int | None = None
              ) -> list[dict]:
    """Interactive chat: one user message per input line, replies streamed to `out`, history kept across turns.

    Ends at end of input or a line `/exit`; `/reset` forgets the history. When the conversation would exceed
    `max_context` tokens (default: the model's max_position_embeddings) with room for `max_new_tokens`, the oldest
    turns are dropped (a system prompt is kept). Each turn samples with seed `seed + turn`, so a scripted session is
    reproducible. Returns the final history (a list of {role, content}).
    """
    limit = max_context or getattr(getattr(model, "config", None), "max_position_embeddings", None)
    base = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(base)
    turn = 0
    out.write("Chat with the model. /reset clears the history, /exit (or end of input) quits.\n")
    for line in input:
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(base)
            out.write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        if limit:
            while len(history) > len(base) + 1 and len(_prompt_ids(tokenizer, history, True, template, None)) + \
                    max_new_tokens > limit:
                del history[len(base)]  # drop the oldest turn, never the system prompt or the newest message
        out.write("assistant: ")
        reply = stream_reply(model, tokenizer, history, out, max_new_tokens, temperature, top_k, seed + turn,
                             template)
        history.append({"role": "assistant", "content": reply})
        turn += 1
    return history


def generate_jsonl(in_path: str | Path, out_path: str | Path, model, tokenizer, **generate_kwargs) -> int:
    """Read JSONL records with a `prompt` field, write them back with an `output` field added; returns the count.

    Other fields of each record are kept. `generate_kwargs` go to `generate` (max_new_tokens, temperature, ...).
    The output file is written to a temporary name and renamed, so it is either complete or absent.
    """
    records = []
    for where, record in iter_json_records(in_path):
        prompt = record.get("prompt")
        if not isinstance(prompt, (str, list)):
            found = "no 'prompt' field" if prompt is None else f"a {type(prompt).__name__} 'prompt'"
            raise SlimtuneError(f"{where}: record has {found}; each line needs \"prompt\": \"...\"")
        records.append(record)
    outputs = generate(model, tokenizer, [r["prompt"] for r in records], **generate_kwargs)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record, output in zip(records, outputs):
                f.write(json.dumps({**record, "output": output}, ensure_ascii=False) + "\n")
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(records)
