"""Tiny models and a fixed data stream shared by the BAdam tests (imported as a plain module by pytest)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 128


def tiny_llama(seed: int = 0, layers: int = 4, tie: bool = False, dtype=torch.float32) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, tie_word_embeddings=tie, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def tiny_gpt2(seed: int = 0, layers: int = 3) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def tiny_bert_classifier(seed: int = 0, layers: int = 3) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def batches(n: int, batch: int = 2, length: int = 12, seed: int = 1234) -> list[torch.Tensor]:
    """A fixed stream of token batches, (batch, length) each, independent of the global RNG."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=g) for _ in range(n)]


def lm_step(model, optimizer, tokens: torch.Tensor) -> float:
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()
