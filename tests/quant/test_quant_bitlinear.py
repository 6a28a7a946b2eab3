"""BitNet b1.58 BitLinear: quantizers, straight-through gradients, lam blending, and parity with transformers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.bitnet import (
    BitLinear,
    RMSNorm,
    quantize_activations,
    quantize_weight,
    ternary_weight_codes,
    token_activation_codes,
)
from slimtune.quant.pack import bitnet_quantization_config, export_bitlinear_state, unpack_ternary


def _layer(in_features=48, out_features=32, seed=0, **kwargs) -> BitLinear:
    torch.manual_seed(seed)
    return BitLinear(in_features, out_features, **kwargs)


def _x(*shape, seed=1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------------------------


def test_weights_are_ternary_times_absmean():
    layer = _layer()
    m = layer.weight.detach().abs().mean()
    q = quantize_weight(layer.weight)
    assert set((q / m).round().unique().tolist()) == {-1.0, 0.0, 1.0}
    torch.testing.assert_close(q, (q / m).round() * m)
    codes, inv_scale = ternary_weight_codes(layer.weight)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) == {-1, 0, 1}
    torch.testing.assert_close(inv_scale, 1 / m)


def test_weight_pinned_values_and_scale_floor():
    w = torch.tensor([[0.9, -0.2], [0.1, -1.2]])  # mean|W| = 0.6: 1.5 -> 2 -> clamp 1, -1/3 -> 0, 1/6 -> 0, -2 -> -1
    codes, inv_scale = ternary_weight_codes(w)
    assert codes.tolist() == [[1, 0], [0, -1]]
    assert inv_scale.item() == pytest.approx(1 / 0.6)
    codes, inv_scale = ternary_weight_codes(torch.zeros(4, 4))
    assert inv_scale.item() == pytest.approx(1e5) and (codes == 0).all()


def test_activation_codes_per_token_in_int8_range():
    x = _x(3, 7, 64) * 5
    x[0, 0, 3] = 400.0  # an outlier affects only its own token
    codes, s = token_activation_codes(x)
    assert codes.dtype == torch.int8 and s.shape == (3, 7, 1)
    assert int(codes.min()) >= -128 and int(codes.max()) <= 127
    assert (codes.abs().amax(dim=-1) == 127).all()  # every token reaches its absmax code
    torch.testing.assert_close(s[0, 0, 0], torch.tensor(127 / 400.0))
    torch.testing.assert_close(s[0, 1, 0], 127 / x[0, 1].abs().max())

    codes, s = token_activation_codes(torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]]))
    assert codes.tolist() == [[127, -64, 32], [0, 0, 0]]  # -63.5 -> -64 (half to even), 31.75 -> 32
    assert torch.isfinite(quantize_activations(torch.zeros(2, 5))).all()


def test_dequantized_activations_within_half_step():
    x = _x(5, 40)
    q = quantize_activations(x)
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((q - x).abs() <= 0.5 * step * (1 + 1e-5)).all()


# ---------------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------------


def test_full_strength_forward_uses_quantized_weight_and_activations():
    layer = _layer()
    x = _x(2, 5, 48)
    # Computed in transformers' order: an integer-valued matmul of the codes, then both scales at once ...
    x_codes, s = token_activation_codes(x)
    w_codes, inv_scale = ternary_weight_codes(layer.weight)
    assert torch.equal(layer(x), F.linear(x_codes.float(), w_codes.float()) / (inv_scale * s))
    # ... which is the dequantize-first product up to float rounding.
    torch.testing.assert_close(layer(x), F.linear(quantize_activations(x), quantize_weight(layer.weight)))
    assert not torch.allclose(layer(x), F.linear(x, layer.weight), atol=1e-3)


def test_lam_zero_is_exactly_nn_linear_forward_and_backward():
    layer = _layer(lam=0.0)
    linear = nn.Linear(48, 32, bias=False)
    linear.load_state_dict(layer.state_dict())
    x1 = _x(4, 48).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = layer(x1), linear(x2)
    assert torch.equal(y1, y2)
    g = _x(4, 32, seed=7)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(layer.weight.grad, linear.weight.grad)
    assert torch.equal(x1.grad, x2.grad)


def test_intermediate_lam_blends_values():
    layer = _layer(lam=0.3)
    x = _x(3, 48)
    w = layer.weight.detach()
    expected = F.linear(x + 0.3 * (quantize_activations(x) - x), w + 0.3 * (quantize_weight(w) - w))
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_straight_through_gradients_reach_the_fp_weight(lam):
    layer = _layer(lam=lam)
    x = _x(6, 48).requires_grad_()
    y = layer(x)
    g = _x(6, 32, seed=3)
    y.backward(g)
    # With identity gradients through both quantizers: dL/dW = g^T x' and dL/dx = g W', where x' and W' are the
    # blended values the forward used.
    xb = x.detach() + lam * (quantize_activations(x.detach()) - x.detach())
    wb = layer.weight.detach() + lam * (quantize_weight(layer.weight) - layer.weight.detach())
    torch.testing.assert_close(layer.weight.grad, g.T @ xb)
    torch.testing.assert_close(x.grad, g @ wb)
    assert layer.weight.grad.abs().sum() > 0


def test_lam_is_validated_and_not_in_the_state_dict():
    layer = _layer(name="model.layers.0.mlp.up_proj")
    layer.lam = 0.25
    assert layer.lam == 0.25
    with pytest.raises(SlimtuneError, match=r"lam of 'model.layers.0.mlp.up_proj' must be in \[0, 1\]"):
        layer.lam = 1.5
    with pytest.raises(SlimtuneError, match="lam"):
        layer.lam = float("nan")
    with pytest.raises(SlimtuneError, match="lam"):
        BitLinear(4, 4, lam=-0.1)
    assert list(layer.state_dict()) == ["weight"]
    assert "lam=0.25" in repr(layer)


def test_bias_is_refused_with_the_layer_name():
    with pytest.raises(SlimtuneError, match="'blocks.3.fc'.*bias"):
        BitLinear(8, 8, bias=True, name="blocks.3.fc")
    with pytest.raises(SlimtuneError, match="'lm.fc'.*bias"):
        BitLinear.from_linear(nn.Linear(8, 8), name="lm.fc")


def test_drop_in_for_nn_linear_checkpoints():
    linear = nn.Linear(16, 8, bias=False)
    layer = BitLinear(16, 8)
    layer.load_state_dict(linear.state_dict())  # strict: same keys
    assert torch.equal(layer.weight, linear.weight)
    shared = BitLinear.from_linear(linear, lam=0.5, name="fc")
    assert shared.weight is linear.weight and shared.lam == 0.5 and shared.layer_name == "fc"
    assert shared.weight.device.type == "cpu"


def test_internal_rms_norm_matches_transformers_llama_norm():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    layer = _layer(use_rms_norm=True, rms_norm_eps=1e-5)
    with torch.no_grad():
        layer.rms_norm.weight.copy_(torch.rand(48) + 0.5)
    assert sorted(layer.state_dict()) == ["rms_norm.weight", "weight"]
    ref_norm = llama.LlamaRMSNorm(48, eps=1e-5)
    ref_norm.load_state_dict(layer.rms_norm.state_dict())
    x = _x(2, 3, 48) * 4
    assert torch.equal(layer.rms_norm(x), ref_norm(x))
    plain = BitLinear(48, 32)
    plain.load_state_dict({"weight": layer.weight.detach()})
    assert torch.equal(layer(x), plain(ref_norm(x)))
    assert isinstance(layer.rms_norm, RMSNorm) and layer.use_rms_norm and not plain.use_rms_norm


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers' own BitNet layers (run eagerly: transformers wraps them in torch.compile, which on CPU
# would JIT-compile C++ for ~20 s and compute the same thing)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hf_bitnet():
    module = pytest.importorskip("transformers.integrations.bitnet")
    with torch.compiler.set_stance("force_eager"):
        yield module


@pytest.mark.parametrize("use_rms_norm", [False, True])
def test_transformers_bitlinear_loads_the_export_and_computes_the_same(hf_bitnet, use_rms_norm):
    ours = _layer(256, 96, seed=5, use_rms_norm=use_rms_norm)
    if use_rms_norm:
        with torch.no_grad():
            ours.rms_norm.weight.copy_(torch.rand(256) + 0.5)
    # dtype must be given: transformers unpacks the uint8 weight into it (None would fail).
    theirs = hf_bitnet.BitLinear(256, 96, bias=False, dtype=torch.float32, use_rms_norm=use_rms_norm)
    theirs.load_state_dict(export_bitlinear_state(ours))  # strict
    x = _x(3, 11, 256) * 2
    x[1, 4] = 0.0  # a silent token: the absmax floor keeps both finite
    x[2, 2, 7] = 60.0  # an outlier token
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))  # same codes, same order of operations
        # and the pieces agree exactly: weight codes, activation codes and scales
        codes, _ = ternary_weight_codes(ours.weight)
        assert torch.equal(hf_bitnet.unpack_weights(theirs.weight, dtype=torch.float32), codes.float())
        normed = ours.rms_norm(x) if use_rms_norm else x
        hf_codes, hf_scale = theirs.activation_quant(normed)
        our_codes, our_scale = token_activation_codes(normed)
        assert torch.equal(hf_codes, our_codes) and torch.equal(hf_scale, our_scale)


def test_transformers_bitlinear_in_bfloat16(hf_bitnet):
    # transformers computes the activation codes in the model dtype and applies both scales (the weight's stored in
    # bf16) after an integer-valued bf16 matmul; slimtune does the same.
    ours = _layer(256, 128, seed=6, dtype=torch.bfloat16)
    theirs = hf_bitnet.BitLinear(256, 128, bias=False, dtype=torch.bfloat16)
    state = export_bitlinear_state(ours)
    assert state["weight_scale"].dtype == torch.bfloat16
    theirs.load_state_dict(state)
    x = _x(4, 16, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ours_y, theirs_y = ours(x), theirs(x)
        assert torch.equal(theirs.activation_quant(x)[0], token_activation_codes(x)[0])
    assert torch.equal(ours_y, theirs_y)


def test_transformers_autobitlinear_offline_and_online(hf_bitnet):
    ours = _layer(128, 64, seed=8)
    x = _x(5, 128) * 3
    offline = hf_bitnet.AutoBitLinear(128, 64, bias=False, dtype=torch.float32, online_quant=False)
    state = export_bitlinear_state(ours, linear_class="autobitlinear")
    # AutoBitLinear keeps an fp weight; transformers' loader unpacks the packed one into it (BitNetDeserialize).
    unpacked = unpack_ternary(state["weight"], 64).float()
    offline.load_state_dict({"weight": unpacked, "weight_scale": state["weight_scale"]})
    online = hf_bitnet.AutoBitLinear(128, 64, bias=False, dtype=torch.float32, online_quant=True)
    online.load_state_dict(ours.state_dict())  # online mode stores the fp weight: our state dict as is
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(offline(x), expected, atol=1e-3, rtol=0)
        torch.testing.assert_close(online(x), expected, atol=1e-3, rtol=0)


def test_from_pretrained_loads_an_exported_model(tmp_path, hf_bitnet):
    """A tiny Llama with slimtune BitLinears, exported, loads through AutoModelForCausalLM with the same logits."""
    transformers = pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    pytest.importorskip("accelerate")  # transformers' BitNet quantizer requires it
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            model.set_submodule(name, BitLinear.from_linear(module, name=name))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            state.update({f"{name}.{k}": v for k, v in export_bitlinear_state(module, name=name).items()})
        elif not isinstance(module, nn.Linear) or name == "lm_head":
            own = module.named_parameters(recurse=False)
            state.update({f"{name}.{k}" if name else k: v.contiguous() for k, v in own})
    config_dict = config.to_dict()
    config_dict["architectures"] = ["LlamaForCausalLM"]
    config_dict["quantization_config"] = bitnet_quantization_config(modules_to_not_convert=["lm_head"])
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert type(q_proj) is hf_bitnet.BitLinear and q_proj.weight.dtype == torch.uint8
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-3, rtol=0)
