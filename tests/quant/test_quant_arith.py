"""Textbook int-N quantization: parameters, codes, round trip, straight-through fake quantization."""

from __future__ import annotations

import itertools

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.quant.arith import (
    GRANULARITIES,
    SCHEMES,
    code_range,
    dequantize,
    fake_quantize,
    quant_params,
    quantize,
)

COMBOS = list(itertools.product(SCHEMES, GRANULARITIES, (8, 4)))


def _tensor(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 33, generator=g)
    if kind == "random":
        return x
    if kind == "outliers":
        x[1, 5] = 80.0
        x[6, 0] = -120.0
        return x
    if kind == "all_equal":
        return torch.full((8, 33), -0.37)
    if kind == "all_equal_positive":
        return torch.full((8, 33), 2.5)
    if kind == "only_negative":
        return -(x.abs() + 0.5)
    if kind == "only_positive":
        return x.abs() + 0.5
    if kind == "zeros":
        return torch.zeros(8, 33)
    raise AssertionError(kind)


KINDS = ["random", "outliers", "all_equal", "all_equal_positive", "only_negative", "only_positive", "zeros"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme,granularity,bits", COMBOS)
def test_round_trip_within_half_step(scheme, granularity, bits, kind):
    x = _tensor(kind)
    scale, zp = quant_params(x, scheme, granularity, bits)
    codes = quantize(x, scale, zp, bits, scheme)
    back = dequantize(codes, scale, zp)
    assert back.shape == x.shape and back.dtype == torch.float32
    # Half a step, with room only for float rounding in x / scale and codes * scale.
    assert ((back - x).abs() <= 0.5 * scale * (1 + 1e-5) + 1e-7).all()
    lo, hi = code_range(scheme, bits)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi


@pytest.mark.parametrize("scheme,granularity,bits", COMBOS)
def test_all_zero_round_trip_is_exact_with_a_safe_scale(scheme, granularity, bits):
    x = torch.zeros(4, 5)
    scale, zp = quant_params(x, scheme, granularity, bits)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    back = dequantize(quantize(x, scale, zp, bits, scheme), scale, zp)
    assert torch.equal(back, x)


@pytest.mark.parametrize("scheme,granularity,bits", COMBOS)
def test_all_equal_round_trip_is_exact_up_to_float_rounding(scheme, granularity, bits):
    for value in (-0.37, 2.5, 1e-3):
        x = torch.full((4, 5), value)
        scale, zp = quant_params(x, scheme, granularity, bits)
        back = dequantize(quantize(x, scale, zp, bits, scheme), scale, zp)
        torch.testing.assert_close(back, x, rtol=1e-6, atol=0)


def test_one_constant_channel_among_varied_ones():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    x[1] = 0.0
    for scheme in SCHEMES:
        scale, zp = quant_params(x, scheme, "per_channel", 8)
        back = dequantize(quantize(x, scale, zp, 8, scheme), scale, zp)
        assert torch.equal(back[1], x[1])
        assert scale[1].item() == 1.0


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", (8, 4))
def test_asymmetric_uses_the_full_code_range(granularity, bits):
    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(2)) * 3 + 0.7
    scale, zp = quant_params(x, "asymmetric", granularity, bits)
    codes = quantize(x, scale, zp, bits, "asymmetric")
    assert codes.dtype == torch.uint8
    top = 2**bits - 1
    rows = codes if granularity == "per_channel" else codes.reshape(1, -1)
    assert (rows.amin(dim=1) == 0).all()
    assert (rows.amax(dim=1) == top).all()


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", (8, 4))
def test_symmetric_range_is_narrow_and_reaches_both_ends(granularity, bits):
    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    scale, zp = quant_params(x, "symmetric", granularity, bits)
    assert (zp == 0).all()
    codes = quantize(x, scale, zp, bits, "symmetric")
    assert codes.dtype == torch.int8
    top = 2 ** (bits - 1) - 1
    assert code_range("symmetric", bits) == (-top, top)
    assert int(codes.abs().max()) == top
    # Beyond-range inputs clamp to the narrow range: the most negative code is never produced.
    far = quantize(torch.tensor([-1e6, 1e6]), scale.reshape(-1)[0], 0, bits, "symmetric")
    assert far.tolist() == [-top, top]


def test_only_negative_asymmetric_puts_zero_point_at_the_top():
    x = _tensor("only_negative")
    scale, zp = quant_params(x, "asymmetric", "per_tensor", 8)
    assert int(zp) == 255
    codes = quantize(x, scale, zp, 8, "asymmetric")
    assert int(codes.min()) == 0


def test_pinned_values():
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    scale, zp = quant_params(x, "symmetric", "per_tensor", 8)
    assert scale.item() == pytest.approx(2 / 127) and int(zp) == 0
    # -63.5 rounds half to even -> -64; 31.75 -> 32
    assert quantize(x, scale, zp, 8, "symmetric").tolist() == [-64, 0, 32, 127]

    x = torch.tensor([-1.0, 0.0, 3.0])
    scale, zp = quant_params(x, "asymmetric", "per_tensor", 8)
    assert scale.item() == pytest.approx(4 / 255) and int(zp) == 64  # round(63.75)
    assert quantize(x, scale, zp, 8, "asymmetric").tolist() == [0, 64, 255]

    w = torch.tensor([[1.2, -2.0], [0.5, 0.1]])
    scale, zp = quant_params(w, "symmetric", "per_channel", 4)
    assert scale.shape == (2, 1)
    torch.testing.assert_close(scale, torch.tensor([[2 / 7], [0.5 / 7]]))
    assert quantize(w, scale, zp, 4, "symmetric").tolist() == [[4, -7], [7, 1]]  # 4.2 -> 4, 1.4 -> 1


def test_per_channel_beats_per_tensor_away_from_an_outlier():
    x = _tensor("outliers")
    errors = {}
    for granularity in GRANULARITIES:
        scale, zp = quant_params(x, "symmetric", granularity, 8)
        errors[granularity] = (dequantize(quantize(x, scale, zp, 8, "symmetric"), scale, zp) - x).abs()
    clean_rows = [0, 2, 3, 4, 5, 7]
    assert errors["per_channel"][clean_rows].max() < errors["per_tensor"][clean_rows].max() / 10


def test_param_shapes_broadcast():
    x = torch.randn(5, 3, 4)
    s, z = quant_params(x, "asymmetric", "per_tensor", 8)
    assert s.shape == () and z.shape == () and s.dtype == torch.float32 and z.dtype == torch.int32
    s, z = quant_params(x, "asymmetric", "per_channel", 8)
    assert s.shape == (5, 1, 1) and z.shape == (5, 1, 1)
    s, z = quant_params(torch.randn(7), "symmetric", "per_channel", 8)
    assert s.shape == (7,)


@pytest.mark.parametrize("scheme,granularity,bits", COMBOS)
def test_fake_quantize_forward_and_identity_gradient(scheme, granularity, bits):
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = fake_quantize(x, scheme, granularity, bits)
    scale, zp = quant_params(x, scheme, granularity, bits)
    assert torch.equal(y.detach(), dequantize(quantize(x, scale, zp, bits, scheme), scale, zp))
    assert not torch.equal(y.detach(), x.detach())  # it does quantize
    g = torch.randn(6, 20, generator=torch.Generator().manual_seed(5))
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_fake_quantize_gradient_is_zero_where_clamped():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    scale = torch.tensor(1.0 / 127)  # range about [-1, 1]: the ends are clamped
    y = fake_quantize(x, "symmetric", bits=8, scale=scale, zero_point=torch.tensor(0))
    torch.testing.assert_close(y.detach(), torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]), atol=0.5 / 127, rtol=0)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_fake_quantize_keeps_dtype():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert fake_quantize(x).dtype == torch.bfloat16


def test_unknown_choices_are_listed():
    x = torch.randn(3, 3)
    with pytest.raises(SlimtuneError, match="symmetric, asymmetric"):
        quant_params(x, "affine")
    with pytest.raises(SlimtuneError, match="per_tensor, per_channel"):
        quant_params(x, "symmetric", "per_group", name="layers.0.attn.q_proj")
    with pytest.raises(SlimtuneError, match="layers.0.attn.q_proj"):
        quant_params(x, "symmetric", "per_group", name="layers.0.attn.q_proj")
    with pytest.raises(SlimtuneError, match="bits"):
        quant_params(x, bits=1)
    with pytest.raises(SlimtuneError, match="bits"):
        quant_params(x, bits=16)
    with pytest.raises(SlimtuneError, match="symmetric, asymmetric"):
        quantize(x, torch.tensor(1.0), torch.tensor(0), 8, "sym")


def test_non_finite_and_empty_inputs_are_refused():
    with pytest.raises(SlimtuneError, match="'w' contains inf or NaN"):
        quant_params(torch.tensor([1.0, float("nan")]), name="w")
    with pytest.raises(SlimtuneError, match="empty"):
        quant_params(torch.zeros(0, 4))
    with pytest.raises(SlimtuneError, match="both scale and zero_point"):
        fake_quantize(torch.ones(2), scale=torch.tensor(1.0))
