"""Tiny, offline Hugging Face models and tokenizers for fast tests (no hub, no downloads).

`tiny_tokenizer()` trains a byte-level BPE on a few sentences in milliseconds and wraps it as a transformers fast
tokenizer; `tiny_llama()` / `tiny_bert()` are random-weight models of a few thousand parameters over it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a test module's tiny models on one intra-op thread (import this fixture into the module to apply it).

    On a shared 2-core machine, two threads that wait for each other's core made a 60-step tiny-BERT fine-tune take
    37 s instead of 0.4 s; tensors this small gain nothing from a second thread anyway.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>", "<cls>", "<sep>"]

# The SmolLM2-style ChatML template (without a default system prompt).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "reverse the words: apple river stone cloud",
    "sort these numbers: 12 5 40 7",
    "hello world, this is a tiny corpus for a tiny tokenizer.",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "system user assistant instruction input output response answer question",
    "good great fine bad awful poor movie film plot actor",
]


def tiny_tokenizer(chat_template: str | None = CHATML, vocab_size: int = 300, pair_template: bool = False):
    """A byte-level BPE tokenizer with specials <pad>, <eos>, ChatML markers; `pair_template` adds <cls>/<sep>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if pair_template:
        cls_id, sep_id = tok.token_to_id("<cls>"), tok.token_to_id("<sep>")
        tok.post_processor = processors.TemplateProcessing(
            single="<cls> $A <sep>", pair="<cls> $A <sep> $B:1 <sep>:1", special_tokens=[("<cls>", cls_id),
                                                                                     ("<sep>", sep_id)])
    kwargs = dict(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if pair_template:
        kwargs.update(cls_token="<cls>", sep_token="<sep>")
    hf_tok = PreTrainedTokenizerFast(**kwargs)
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    return hf_tok


def tiny_llama(tokenizer, seed: int = 0, tie: bool = True, hidden_size: int = 32) -> LlamaForCausalLM:
    """A 2-layer random Llama over `tokenizer`'s vocabulary (MLP twice as wide as `hidden_size`), fp32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def tiny_bert(tokenizer, num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def save_tiny_llama(folder: Path, chat_template: str | None = CHATML, seed: int = 0, hidden_size: int = 32) -> Path:
    """Write a tiny Llama + tokenizer as a Hugging Face folder; returns the folder."""
    tokenizer = tiny_tokenizer(chat_template)
    model = tiny_llama(tokenizer, seed, hidden_size=hidden_size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    tokenizer = tiny_tokenizer(None, pair_template=True)
    model = tiny_bert(tokenizer, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_sentiment_jsonl(path: Path, n: int = 80, seed: int = 0) -> Path:
    """`n` records {"text", "label": pos|neg} a classifier separates: two sentiment words of the label's kind and
    two neutral ones, in random order."""
    import json
    import random

    rng = random.Random(seed)
    good, bad = "good great fine".split(), "bad awful poor".split()
    lines = []
    for _ in range(n):
        label = rng.random() < 0.5
        words = rng.sample(good if label else bad, 2) + rng.sample("movie film plot actor".split(), 2)
        rng.shuffle(words)
        lines.append(json.dumps({"text": " ".join(words), "label": "pos" if label else "neg"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_same_training_step(theirs, mine, ids) -> None:
    """`theirs` and `mine` give bit-identical logits, losses and gradients on `ids` (labels = ids), each after
    ``torch.manual_seed(1)`` (so dropout draws alike)."""
    import torch

    for model in (theirs, mine):
        torch.manual_seed(1)
        model.out = model(ids, labels=ids)
        model.out.loss.backward()
    assert torch.equal(theirs.out.logits, mine.out.logits)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (theirs, mine)]
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
