"""Ternary packing in transformers' BitNet layout and the BitLinear export."""

from __future__ import annotations

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.quant.bitnet import BitLinear, ternary_weight_codes
from slimtune.quant.pack import bitnet_quantization_config, export_bitlinear_state, pack_ternary, unpack_ternary


def _ternary(*shape, seed=0) -> torch.Tensor:
    return torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("shape", [(4, 1), (8, 5), (64, 17), (128, 256), (12,)])
def test_unpack_inverts_pack(shape):
    codes = _ternary(*shape)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, *shape[1:])
    unpacked = unpack_ternary(packed, shape[0])
    assert unpacked.dtype == torch.int8 and torch.equal(unpacked, codes)


def test_pinned_layout():
    # Rows j, j + out/4, j + 2 out/4, j + 3 out/4 share byte j, in bits 0-1, 2-3, 4-5, 6-7, each as code + 1.
    codes = torch.tensor([[-1], [0], [1], [1]], dtype=torch.int8)
    assert pack_ternary(codes).tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6]]  # 164
    codes = torch.tensor([[1, -1], [0, 0], [-1, 1], [0, 1], [1, 0], [-1, -1], [0, 1], [1, -1]], dtype=torch.int8)
    # byte [0, 0] packs rows 0, 2, 4, 6 of column 0: 1, -1, 1, 0 -> 2, 0, 2, 1
    assert pack_ternary(codes)[0, 0].item() == 2 | 0 << 2 | 2 << 4 | 1 << 6
    # byte [1, 1] packs rows 1, 3, 5, 7 of column 1: 0, 1, -1, -1 -> 1, 2, 0, 0
    assert pack_ternary(codes)[1, 1].item() == 1 | 2 << 2


def test_pack_accepts_any_integer_dtype_and_leaves_input_alone():
    codes = _ternary(8, 3).to(torch.int64)
    before = codes.clone()
    packed = pack_ternary(codes)
    assert torch.equal(codes, before)
    assert torch.equal(packed, pack_ternary(before.to(torch.int8)))


def test_same_layout_as_transformers():
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    codes = _ternary(64, 33, seed=3)
    ours = pack_ternary(codes)
    theirs = bitnet.pack_weights(codes.clone())  # it shifts its argument in place
    assert torch.equal(ours, theirs)
    with torch.compiler.set_stance("force_eager"):
        assert torch.equal(bitnet.unpack_weights(ours, dtype=torch.float32), codes.float())


def test_output_dimension_not_a_multiple_of_four_is_refused_by_name():
    message = r"output dimension 6 of layer 'model.layers.1.mlp.down_proj'.*multiple of 4"
    with pytest.raises(SlimtuneError, match=message):
        pack_ternary(_ternary(6, 4), name="model.layers.1.mlp.down_proj")
    with pytest.raises(SlimtuneError, match="multiple of 4"):
        pack_ternary(_ternary(5, 4))
    with pytest.raises(SlimtuneError, match="'head'.*multiple of 4"):
        export_bitlinear_state(BitLinear(8, 10, name="head"))
    with pytest.raises(SlimtuneError, match="'proj'.*multiple of 4"):
        export_bitlinear_state(BitLinear(8, 10), name="proj")


def test_bad_inputs_are_refused():
    with pytest.raises(SlimtuneError, match=r"\{-1, 0, 1\}.*from -1 to 2"):
        pack_ternary(torch.tensor([[2], [0], [1], [-1]]))
    with pytest.raises(SlimtuneError, match="integer codes"):
        pack_ternary(torch.zeros(4, 2))
    with pytest.raises(SlimtuneError, match="uint8"):
        unpack_ternary(torch.zeros(2, 2, dtype=torch.int8), 8)
    with pytest.raises(SlimtuneError, match="hold exactly 8 output rows, but out_features=12"):
        unpack_ternary(pack_ternary(_ternary(8, 2)), 12)
    with pytest.raises(SlimtuneError, match="bit pattern 11"):
        unpack_ternary(torch.full((1, 2), 0b11, dtype=torch.uint8), 4)


def test_export_tensors_and_scale_conventions():
    torch.manual_seed(0)
    layer = BitLinear(24, 16)
    m = layer.weight.detach().abs().mean()
    state = export_bitlinear_state(layer)
    assert sorted(state) == ["weight", "weight_scale"]
    assert state["weight"].dtype == torch.uint8 and state["weight"].shape == (4, 24)
    codes, _ = ternary_weight_codes(layer.weight)
    assert torch.equal(unpack_ternary(state["weight"], 16), codes)
    # bitlinear: the inverse scale (transformers divides by it); autobitlinear: the scale (it multiplies).
    assert state["weight_scale"].shape == (1,) and state["weight_scale"].dtype == torch.float32
    torch.testing.assert_close(state["weight_scale"], (1 / m).reshape(1))
    auto = export_bitlinear_state(layer, linear_class="autobitlinear")
    torch.testing.assert_close(auto["weight_scale"], m.reshape(1))
    assert torch.equal(auto["weight"], state["weight"])
    assert export_bitlinear_state(layer, dtype=torch.bfloat16)["weight_scale"].dtype == torch.bfloat16
    with_norm = export_bitlinear_state(BitLinear(24, 16, use_rms_norm=True))
    assert sorted(with_norm) == ["rms_norm.weight", "weight", "weight_scale"]
    with pytest.raises(SlimtuneError, match="bitlinear, autobitlinear"):
        export_bitlinear_state(layer, linear_class="ternary")
    with pytest.raises(SlimtuneError, match="BitLinear"):
        export_bitlinear_state(torch.nn.Linear(4, 4))


def test_quantization_config_is_what_transformers_reads():
    config = bitnet_quantization_config(modules_to_not_convert=["lm_head"], use_rms_norm=True, rms_norm_eps=1e-5)
    assert config == {
        "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline", "use_rms_norm": True,
        "rms_norm_eps": 1e-5, "modules_to_not_convert": ["lm_head"],
    }
    quantization_config = pytest.importorskip("transformers.utils.quantization_config")
    parsed = quantization_config.BitNetQuantConfig.from_dict(config)
    assert parsed.quant_method == "bitnet" and parsed.linear_class == "bitlinear" and parsed.use_rms_norm is True
    with pytest.raises(SlimtuneError, match="online.*autobitlinear"):
        bitnet_quantization_config(quantization_mode="online")
    with pytest.raises(SlimtuneError, match="offline, online"):
        bitnet_quantization_config(quantization_mode="lazy")


def test_row_order_permutes_the_packed_rows_and_keeps_the_one_scale():
    layer = BitLinear(16, 12)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    plain, permuted = export_bitlinear_state(layer), export_bitlinear_state(layer, row_order=order)
    assert torch.equal(unpack_ternary(permuted["weight"], 12), unpack_ternary(plain["weight"], 12)[order])
    assert torch.equal(permuted["weight_scale"], plain["weight_scale"])
    with pytest.raises(SlimtuneError, match=r"row_order of layer 'qkv' must be a permutation of its 12"):
        export_bitlinear_state(layer, row_order=torch.zeros(12, dtype=torch.long), name="qkv")
