"""The demo task: reverse the order of a few words. Examples come from a program, answers are checked exactly.

    prompt: "Reverse the order of these words: tiger piano candle garden"
    answer: "garden candle piano tiger"

Why this task: SmolLM2-135M-Instruct gets it wrong out of the box (0 of the 30 held-out prompts of
`make_split(2000, 30, seed=0)` exactly right with greedy decoding: it answers in prose, drops or reorders words),
while the skill — copy a short list backwards in a fixed format — is quickly learned: full fine-tuning with AdamW
(lr 1e-4, 10 warmup steps, batch 8) measured 25/30 after 40 steps and 30/30 after 80 (~7 s a step on 2 shared
CPU cores). A rendered example is 40-52 SmolLM2 tokens with its chat template and the answer 3-5 words, so
evaluation is quick.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Short, common nouns: each is a single word with no punctuation, so whitespace normalisation is all scoring needs.
WORDS = (
    "apple river stone cloud tiger piano candle garden window rocket pencil orange silver forest button mirror "
    "dragon coffee summer planet bridge castle engine flower guitar hammer island jacket kitten ladder lemon "
    "market needle ocean pepper rabbit saddle ticket violin wallet yellow anchor basket cotton desert feather"
).split()

PROMPT = "Reverse the order of these words: {words}"


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str


def make_examples(n: int, seed: int, min_words: int = 3, max_words: int = 5) -> list[TaskExample]:
    """`n` distinct examples (no prompt repeats), deterministic given `seed`; words within a prompt are distinct."""
    if not 1 <= min_words <= max_words <= len(WORDS):
        raise ValueError(f"need 1 <= min_words <= max_words <= {len(WORDS)}, got {min_words}, {max_words}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[TaskExample] = []
    while len(out) < n:
        words = rng.sample(WORDS, rng.randint(min_words, max_words))
        prompt = PROMPT.format(words=" ".join(words))
        if prompt not in seen:
            seen.add(prompt)
            out.append(TaskExample(prompt, " ".join(reversed(words))))
    return out


def make_split(n_train: int, n_test: int, seed: int = 0) -> tuple[list[TaskExample], list[TaskExample]]:
    """Training and held-out examples with no prompt in common (drawn together, then cut)."""
    examples = make_examples(n_train + n_test, seed)
    return examples[:n_train], examples[n_train:]


def normalize(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction equals the answer up to whitespace."""
    return normalize(prediction) == normalize(answer)


def accuracy(predictions: list[str], answers: list[str]) -> float:
    """Fraction of exact matches (0.0-1.0)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(exact_match(p, a) for p, a in zip(predictions, answers)) / len(answers)


def to_chat_record(example: TaskExample) -> dict:
    """The example as a chat-format record ({"messages": [...]}), as `slimtune.data.records` reads it."""
    return {"messages": [{"role": "user", "content": example.prompt},
                         {"role": "assistant", "content": example.answer}]}


def write_jsonl(examples: list[TaskExample], path: str | Path) -> Path:
    """Write examples as chat JSONL (one record per line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(to_chat_record(ex)) + "\n")
    return path


def evaluate(model, tokenizer, examples: list[TaskExample], max_new_tokens: int = 24, batch_size: int = 16,
             template: str | None = None) -> tuple[float, list[str]]:
    """Greedy-decode every prompt with the chat template; returns (exact-match accuracy, predictions)."""
    from slimtune.infer import generate  # torch/transformers only when evaluating

    predictions = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                           temperature=0.0, batch_size=batch_size, template=template)
    return accuracy(predictions, [e.answer for e in examples]), predictions
