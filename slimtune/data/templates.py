"""Chat templates: conversations rendered to text and token ids, with labels only on what the assistant says.

Conversations are rendered with the tokenizer's chat template, or a named fallback template (`CHAT_TEMPLATES`) for
tokenizers that have none. The loss covers only what the assistant says: every token of a system or user turn, and
of the template's markup before an assistant reply, gets the label -100 (ignored by the cross-entropy).
"""

from __future__ import annotations

from collections.abc import Sequence

import jinja2

from slimtune.data.examples import IGNORE_INDEX
from slimtune.errors import SlimtuneError

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
        labels[0] = IGNORE_INDEX  # never a target (see `slimtune.data.examples`); keeps packed neighbours apart
    return full_ids, labels, merges
