"""Calibration: the planner's saved-tensor lists against what autograd really keeps.

A forward pass runs under ``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd saves is counted
once per storage (views share one), parameters excluded, and attributed to the block whose forward was running.
The planner's `layer_saved_tensors` / `activation_items` must agree within 15% for every shape and setting below
(in practice they agree to the byte for the tensors they name; the slack covers tiny per-token statistics whose
dtype differs by device).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.models.gpt import GPT, GPTConfig
from slimtune.plan.estimate import LoraAdapters, ModelSpec, activation_items, layer_saved_tensors
from tests.tiny_hf import one_torch_thread, tiny_llama, tiny_tokenizer  # noqa: F401 (fixture)

TOLERANCE = 0.15
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure_saved(model: torch.nn.Module, layers, run) -> dict:
    """Bytes autograd saves during ``run()``, keyed by layer index (or "outside"), each storage counted once."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    owner = ["outside"]
    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, index=index: owner.__setitem__(0, index)))
        handles.append(layer.register_forward_hook(lambda m, a, o: owner.__setitem__(0, "outside")))
    seen: dict[int, tuple] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = (owner[0], t.untyped_storage().nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for handle in handles:
            handle.remove()
    totals: dict = {}
    for where, nbytes in seen.values():
        totals[where] = totals.get(where, 0) + nbytes
    totals["total"] = sum(nbytes for _, nbytes in seen.values())
    return totals


def assert_close(predicted: int, measured: int, what: str) -> None:
    assert measured > 0, what
    assert abs(predicted - measured) <= TOLERANCE * measured, (
        f"{what}: planner {predicted} bytes vs autograd {measured} bytes ({predicted / measured - 1:+.1%})")


def planned_saved(items) -> int:
    """Saved bytes in the planner's list; the logits are alive (the model's output) but not saved by autograd."""
    return sum(t.nbytes for t in items if t.name != "logits" and not t.name.startswith("recompute."))


def llama(hidden: int, inter: int, heads: int, kv_heads: int, n_layers: int = 3, vocab: int = 300,
          attn: str = "sdpa", tie: bool = False) -> tuple[LlamaForCausalLM, dict]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=tie, attn_implementation=attn)
    return LlamaForCausalLM(config).train(), config.to_dict()


def run_llama(model, batch: int, seq: int, vocab: int):
    ids = torch.randint(0, vocab, (batch, seq))
    return lambda: model(input_ids=ids, labels=ids)


LLAMA_SHAPES = [  # (batch, seq, hidden, intermediate, heads, kv heads)
    (2, 16, 64, 172, 4, 2),
    (1, 64, 128, 344, 8, 8),
    (4, 32, 96, 256, 6, 3),
]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("batch,seq,hidden,inter,heads,kv", LLAMA_SHAPES)
def test_llama_full_finetune(dtype, batch, seq, hidden, inter, heads, kv):
    model, config = llama(hidden, inter, heads, kv)
    model.to(DTYPES[dtype])
    spec = ModelSpec.from_hf_config(config)
    measured = measure_saved(model, model.model.layers, run_llama(model, batch, seq, spec.vocab))
    for k in (1, 2):  # layer 0 also holds the rotary tables, which are shared by all layers
        planned = sum(t.nbytes for t in layer_saved_tensors(spec, batch, seq, act_dtype=dtype, device="cpu"))
        assert_close(planned, measured[k], f"layer {k}")
    items = activation_items(spec, batch, seq, act_dtype=dtype, device="cpu")
    assert_close(planned_saved(items), measured["total"], "whole model")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_llama_eager_attention(dtype):
    batch, seq = 2, 24
    model, config = llama(64, 172, 4, 2, attn="eager")
    model.to(DTYPES[dtype])
    spec = ModelSpec.from_hf_config(config)
    measured = measure_saved(model, model.model.layers, run_llama(model, batch, seq, spec.vocab))
    items = activation_items(spec, batch, seq, act_dtype=dtype, device="cpu", attention="eager")
    assert_close(planned_saved(items), measured["total"], "whole model, eager attention")


def test_tiny_llama_from_tests_helper():
    """The tiny random Llama the other test suites use (tied head, 2 layers)."""
    model = tiny_llama(tiny_tokenizer()).train()
    spec = ModelSpec.from_hf_config(model.config.to_dict())
    assert spec.n_params == sum(p.numel() for p in model.parameters())
    measured = measure_saved(model, model.model.layers, run_llama(model, 3, 20, spec.vocab))
    items = activation_items(spec, 3, 20, act_dtype="fp32", device="cpu")
    assert_close(planned_saved(items), measured["total"], "tiny_llama")


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_llama_lora(dropout):
    """peft LoRA on q and v of a bf16 model: adapters in fp32, base frozen, backward through every layer."""
    from peft import LoraConfig, get_peft_model

    batch, seq = 2, 24
    model, config = llama(64, 172, 4, 2)
    model.to(torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                  target_modules=["q_proj", "v_proj"])).train()
    spec = ModelSpec.from_hf_config(config)
    lora = LoraAdapters(8, ("q_proj", "v_proj"), dropout=dropout, dtype="fp32")
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == lora.params(spec)
    measured = measure_saved(peft_model, model.model.layers, run_llama(peft_model, batch, seq, spec.vocab))
    for k in (1, 2):
        planned = sum(t.nbytes for t in layer_saved_tensors(spec, batch, seq, act_dtype="bf16",
                                                            weights_trainable=False, lora=lora, device="cpu"))
        assert_close(planned, measured[k], f"LoRA layer {k}")
    items = activation_items(spec, batch, seq, act_dtype="bf16", trainable_layers=(), lora=lora, device="cpu")
    assert_close(planned_saved(items), measured["total"], "LoRA whole model")


@pytest.mark.parametrize("active", [0, 1, 2])
def test_llama_badam_active_block(active):
    """BAdam: only one layer trains; layers below it keep nothing, layers above keep what input gradients need."""
    batch, seq = 2, 16
    model, config = llama(64, 172, 4, 2, n_layers=4)
    model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(f"model.layers.{active}."))
    spec = ModelSpec.from_hf_config(config)
    measured = measure_saved(model, model.model.layers, run_llama(model, batch, seq, spec.vocab))
    assert all(measured.get(k, 0) == 0 for k in range(active))
    items = activation_items(spec, batch, seq, act_dtype="bf16", backward_from_layer=active,
                             trainable_layers=(active,), device="cpu")
    assert_close(planned_saved(items), measured["total"], f"BAdam, layer {active} active")
    above = sum(t.nbytes for t in layer_saved_tensors(spec, batch, seq, act_dtype="bf16", weights_trainable=False,
                                                      device="cpu"))
    assert_close(above, measured[3], "frozen layer above the active block")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_llama_gradient_checkpointing(dtype):
    """With checkpointing, the forward keeps only each block's input (plus final norm and loss)."""
    batch, seq = 2, 32
    model, config = llama(96, 256, 6, 3)
    model.to(DTYPES[dtype])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    spec = ModelSpec.from_hf_config(config)
    measured = measure_saved(model, model.model.layers, run_llama(model, batch, seq, spec.vocab))
    items = activation_items(spec, batch, seq, act_dtype=dtype, device="cpu", checkpointing=True)
    assert_close(planned_saved(items), measured["total"], "checkpointed forward")
    per_layer = [t for t in items if t.name == "checkpoint.input"]
    assert len(per_layer) == spec.n_layers
    full = activation_items(spec, batch, seq, act_dtype=dtype, device="cpu")
    assert planned_saved(items) < planned_saved(full) / 2


GPT_SHAPES = [(2, 16, 64, 4), (3, 32, 96, 6), (1, 48, 128, 8)]  # (batch, seq, n_embd, n_head)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("batch,seq,n_embd,n_head", GPT_SHAPES)
def test_slimtune_gpt(dtype, batch, seq, n_embd, n_head):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=3, n_head=n_head, n_embd=n_embd, bias=True))
    model.train().to(DTYPES[dtype])
    spec = ModelSpec.from_gpt(n_layer=3, n_head=n_head, n_embd=n_embd, block_size=64, vocab_size=300, bias=True)
    assert spec.n_params == sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, 300, (batch, seq))
    measured = measure_saved(model, model.transformer.h, lambda: model(idx, idx))
    planned = sum(t.nbytes for t in layer_saved_tensors(spec, batch, seq, act_dtype=dtype, device="cpu"))
    assert_close(planned, measured[1], "GPT layer 1")
    # slimtune's GPT computes the loss in the logits' dtype (no fp32 upcast).
    items = activation_items(spec, batch, seq, act_dtype=dtype, device="cpu", logits_fp32=False)
    assert_close(planned_saved(items), measured["total"], "GPT whole model")


def test_slimtune_gpt_residual_dropout():
    """Dropout on the residual branches and the embedding keeps one mask each (attention dropout is switched off
    here: on CPU it makes SDPA fall back to the unfused kernel)."""
    batch, seq = 2, 32
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=64, dropout=0.1)).train()
    for block in model.transformer.h:
        block.attn.dropout = 0.0
    spec = dataclasses.replace(ModelSpec.from_gpt(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=300,
                                                  dropout=0.1), attention_dropout=0.0)
    idx = torch.randint(0, 300, (batch, seq))
    measured = measure_saved(model, model.transformer.h, lambda: model(idx, idx))
    items = activation_items(spec, batch, seq, act_dtype="fp32", device="cpu", logits_fp32=False)
    assert_close(planned_saved(items), measured["total"], "GPT with dropout")
    no_dropout = activation_items(dataclasses.replace(spec, hidden_dropout=0.0), batch, seq, act_dtype="fp32",
                                  device="cpu", logits_fp32=False)
    assert planned_saved(items) > planned_saved(no_dropout)
