"""Block discovery on real naming schemes (Llama, GPT-2, BERT, MoE, LoRA) and the switch_every rule."""

from __future__ import annotations

import pytest
from badam_helpers import tiny_bert_classifier, tiny_gpt2, tiny_llama

from slimtune.errors import SlimtuneError
from slimtune.methods.blocks import auto_block_prefixes, default_switch_every
from slimtune.models.gpt import GPT, GPTConfig


def test_llama_layers_with_embedding_and_head():
    blocks = auto_block_prefixes(tiny_llama().named_parameters(), include_embedding=True, include_lm_head=True)
    assert blocks == [["model.embed_tokens."]] + [[f"model.layers.{i}."] for i in range(4)] + [["model.norm.", "lm_head."]]
    assert auto_block_prefixes(tiny_llama().named_parameters()) == [[f"model.layers.{i}."] for i in range(4)]


def test_gpt2_naming_gets_blocks():
    # badam 1.4 only finds names containing 'layers.N.'; GPT-2 uses transformer.h.N.
    blocks = auto_block_prefixes(tiny_gpt2().named_parameters(), include_embedding=True, include_lm_head=True)
    assert blocks[0] == ["transformer.wte.", "transformer.wpe."]
    assert blocks[1:4] == [[f"transformer.h.{i}."] for i in range(3)]
    assert blocks[4] == ["transformer.ln_f."]  # lm_head is tied to wte: not a parameter of its own


def test_attn_mlp_assigns_norms_to_the_part_they_feed():
    llama = auto_block_prefixes(tiny_llama().named_parameters(), granularity="attn_mlp")
    assert llama[:2] == [
        ["model.layers.0.self_attn.", "model.layers.0.input_layernorm."],
        ["model.layers.0.mlp.", "model.layers.0.post_attention_layernorm."],
    ]
    assert len(llama) == 8
    gpt2 = auto_block_prefixes(tiny_gpt2().named_parameters(), granularity="attn_mlp")
    assert gpt2[:2] == [["transformer.h.0.ln_1.", "transformer.h.0.attn."], ["transformer.h.0.ln_2.", "transformer.h.0.mlp."]]
    bert = auto_block_prefixes(tiny_bert_classifier().named_parameters(), granularity="attn_mlp", include_lm_head=True)
    assert bert[:2] == [["bert.encoder.layer.0.attention."],
                        ["bert.encoder.layer.0.intermediate.", "bert.encoder.layer.0.output."]]
    assert bert[-1] == ["bert.pooler.dense.", "classifier."]


def test_matrix_granularity_one_block_per_weight_matrix():
    blocks = auto_block_prefixes(tiny_llama(layers=2).named_parameters(), granularity="matrix")
    assert len(blocks) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert blocks[0] == ["model.layers.0.self_attn.q_proj.", "model.layers.0.input_layernorm."]
    assert blocks[4] == ["model.layers.0.mlp.gate_proj.", "model.layers.0.post_attention_layernorm."]
    gpt2 = auto_block_prefixes(tiny_gpt2(layers=1).named_parameters(), granularity="matrix")
    # c_attn.weight and c_attn.bias are one block; ln_1 joins the first attention matrix.
    assert gpt2 == [["transformer.h.0.attn.c_attn.", "transformer.h.0.ln_1."], ["transformer.h.0.attn.c_proj."],
                    ["transformer.h.0.mlp.c_fc.", "transformer.h.0.ln_2."], ["transformer.h.0.mlp.c_proj."]]


def test_outermost_number_is_the_layer_moe_and_lora():
    names = [
        "model.embed.weight",
        "model.layers.0.mlp.experts.0.w.weight", "model.layers.0.mlp.experts.1.w.weight",
        "model.layers.1.mlp.experts.0.w.weight", "model.layers.1.mlp.experts.1.w.weight",
        "model.layers.1.self_attn.q_proj.base_layer.weight",
        "model.layers.1.self_attn.q_proj.lora_A.default.weight",
        "model.layers.1.self_attn.q_proj.lora_B.default.weight",
        "model.norm.weight",
    ]
    assert auto_block_prefixes(names) == [["model.layers.0."], ["model.layers.1."]]
    matrix = auto_block_prefixes(names, granularity="matrix")
    assert ["model.layers.1.self_attn.q_proj."] in matrix  # LoRA A/B and the base layer are one module
    assert ["model.layers.0.mlp.experts.0.w."] in matrix


def test_no_repeated_layers_is_an_error():
    with pytest.raises(SlimtuneError, match="block_prefix_list"):
        auto_block_prefixes(["encoder.weight", "decoder.weight"])
    with pytest.raises(SlimtuneError, match="granularity"):
        auto_block_prefixes(["layers.0.w", "layers.1.w"], granularity="rows")


def test_default_switch_every_rule():
    assert default_switch_every(1000, 4, 30) == 50  # n/(BD) = 8.3 → at least 50
    assert default_switch_every(1_000_000, 4, 30) == 100  # 8333 → at most 100
    assert default_switch_every(4 * 30 * 70 + 50, 4, 30) == 70  # 70.4 → rounded
    with pytest.raises(SlimtuneError, match="batch_size"):
        default_switch_every(100, 0, 4)


def test_slimtune_gpt_gets_one_block_per_layer():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    assert auto_block_prefixes(model.named_parameters(), include_embedding=True, include_lm_head=True) == [
        ["transformer.wte.", "transformer.wpe."], ["transformer.h.0."], ["transformer.h.1."], ["transformer.ln_f."]]
