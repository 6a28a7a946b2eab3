"""The record formats of fine-tuning data, one per file (detected from the first record), and their fields:

    Alpaca    JSON list or JSONL of {"instruction", "input" (optional), "output", "system" (optional)}
    chat      JSONL (or JSON list) of {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    ShareGPT  chat as {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}
    text      a .txt file (one document, or several split by `text_separator`), or JSONL of {"text": "..."}
    classes   JSONL of {"text", "text_pair" (optional), "label" (int or string)}  (`slimtune.data.classify`)

The same records may come as the rows of a .parquet or .arrow file, a `datasets` save_to_disk folder or a folder of
parquet shards (`slimtune.data.hf_datasets`), whose columns are checked against these formats before the first row;
`slimtune.data.records` reads them.
"""

from __future__ import annotations

CANONICAL_FIELDS = ("instruction", "input", "output", "system", "messages", "role", "content", "text", "text_pair",
                    "label")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                "chatgpt": "assistant"}
ROLES = ("system", "user", "assistant")
SHAREGPT_FIELDS = {"messages": "conversations", "role": "from", "content": "value"}
"""ShareGPT's names of the chat fields (canonical name → name in the file)."""
REQUIRED_FIELDS = {"chat": ("messages",), "alpaca": ("instruction", "output"), "text": ("text",)}


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
