"""ModelSpec: parameter counts against published totals and against the real models; config reading and errors."""

from __future__ import annotations

import json

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.models.gpt import GPT, GPTConfig
from slimtune.plan.spec import PRESETS, ModelSpec

# Totals as published on each model card / paper.
PUBLISHED_PARAMS = {
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.02e9,
    "llama-3-8b": 8.03e9,
    "llama-3-70b": 70.6e9,
    "mistral-7b": 7.24e9,
    "qwen2.5-7b": 7.61e9,
    "smollm2-135m": 134.5e6,
}


def test_every_preset_has_a_published_total():
    assert set(PRESETS) == set(PUBLISHED_PARAMS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_params_match_published(name):
    spec = ModelSpec.preset(name)
    assert abs(spec.n_params / PUBLISHED_PARAMS[name] - 1) < 0.01, spec.describe()


def test_qwen_non_embedding_params():
    """Qwen2.5-7B's card also gives 6.53B non-embedding parameters (embedding and untied head excluded)."""
    spec = ModelSpec.preset("qwen2.5-7b")
    non_embedding = spec.n_params - spec.embedding_params - spec.head_params
    assert abs(non_embedding / 6.53e9 - 1) < 0.01


def test_preset_linear_shapes():
    spec = ModelSpec.preset("llama-3-8b")
    shapes = {lin.name: (lin.in_features, lin.out_features) for lin in spec.linears}
    assert shapes == {
        "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 1024), "self_attn.v_proj": (4096, 1024),
        "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (4096, 14336), "mlp.up_proj": (4096, 14336),
        "mlp.down_proj": (14336, 4096),
    }
    assert spec.head_dim == 128 and spec.kv_dim == 1024


def test_unknown_preset_lists_known():
    with pytest.raises(SlimtuneError) as err:
        ModelSpec.preset("llama-4-9000b")
    for name in PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_layer,n_head,n_embd,block_size,vocab", [(2, 2, 32, 16, 65), (3, 4, 64, 32, 300),
                                                                     (12, 12, 768, 1024, 50304)])
def test_from_gpt_matches_model(n_layer, n_head, n_embd, block_size, vocab, bias):
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab, bias=bias)
    with torch.device("meta"):
        model = GPT(cfg)
    spec = ModelSpec.from_gpt(n_layer, n_head, n_embd, block_size, vocab, bias)
    assert spec.n_params == sum(p.numel() for p in model.parameters())
    assert spec.tied_embeddings and spec.mlp == "gelu" and spec.intermediate == 4 * n_embd


def _numel(model_cls, config) -> int:
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(tie_word_embeddings=True),
    dict(num_key_value_heads=2),
    dict(attention_bias=True, mlp_bias=True),
    dict(head_dim=24),
])
def test_from_hf_llama_matches_model(kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=4, **{"num_key_value_heads": 4, **kwargs})
    spec = ModelSpec.from_hf_config(config.to_dict())
    assert spec.n_params == _numel(LlamaForCausalLM, config)


def test_from_hf_qwen2_and_mistral_match_models():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shapes = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    qwen = Qwen2Config(tie_word_embeddings=False, **shapes)
    spec = ModelSpec.from_hf_config(qwen.to_dict())
    assert spec.qkv_bias and not spec.o_bias
    assert spec.n_params == _numel(Qwen2ForCausalLM, qwen)
    mistral = MistralConfig(**shapes)
    assert ModelSpec.from_hf_config(mistral.to_dict()).n_params == _numel(MistralForCausalLM, mistral)


def test_from_hf_gpt2_small():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config()
    spec = ModelSpec.from_hf_config(config.to_dict())
    assert spec.n_params == _numel(GPT2LMHeadModel, config) == 124_439_808
    assert [lin.name for lin in spec.linears] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def test_from_hf_config_file_and_folder(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
           "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from_file = ModelSpec.from_hf_config(tmp_path / "config.json")
    from_folder = ModelSpec.from_hf_config(str(tmp_path))
    assert from_file == from_folder
    assert from_file.n_params == ModelSpec.preset("smollm2-135m").n_params


def test_from_hf_config_missing_fields_named():
    with pytest.raises(SlimtuneError) as err:
        ModelSpec.from_hf_config({"model_type": "mistral", "vocab_size": 32000, "num_hidden_layers": 32})
    message = str(err.value)
    for field in ("hidden_size", "num_attention_heads", "intermediate_size"):
        assert field in message
    assert "mistral" in message and "vocab_size" not in message


def test_from_hf_config_missing_fields_gpt2_without_model_type():
    with pytest.raises(SlimtuneError, match=r"GPT-2-like.*n_layer, n_head"):
        ModelSpec.from_hf_config({"n_embd": 768, "vocab_size": 50257})


def test_from_hf_config_unsupported_model_type():
    with pytest.raises(SlimtuneError, match=r"'bert'.*gpt2, llama, mistral, qwen2"):
        ModelSpec.from_hf_config({"model_type": "bert", "hidden_size": 768})


def test_from_hf_config_bad_path(tmp_path):
    with pytest.raises(SlimtuneError, match="no model config"):
        ModelSpec.from_hf_config(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SlimtuneError, match="JSON"):
        ModelSpec.from_hf_config(tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
    (dict(hidden=100, n_heads=3, n_kv_heads=3), "head_dim"),
    (dict(mlp="relu"), "mlp="),
    (dict(norm="batchnorm"), "norm="),
    (dict(n_layers=0), "n_layers"),
    (dict(hidden_dropout=1.5), "hidden_dropout"),
])
def test_invalid_specs(kwargs, match):
    base = dict(name="x", vocab=100, hidden=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate=128)
    with pytest.raises(SlimtuneError, match=match):
        ModelSpec(**{**base, **kwargs})
