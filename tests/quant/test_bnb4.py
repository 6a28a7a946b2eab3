"""slimtune.quant.bnb4: bitsandbytes 4-bit layers whose CPU products decode into a per-thread buffer."""

from __future__ import annotations

import threading

import pytest
import torch

from slimtune.quant import bnb4

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")


def quantized(shape, quant_type="nf4", nested=True, seed=0):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return bnbf.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=nested)


def linear4bit(out_features, in_features, compute_dtype=torch.float32, bias=False, seed=0):
    """bitsandbytes' own 4-bit layer holding a random weight (quantized when moved to the CPU)."""
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    if bias:
        layer.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def format_reference(packed, state) -> torch.Tensor:
    """bitsandbytes' 4-bit format by its definition, on any host: the weight flattened, two indices per byte (high
    half first), each looked up in the code book and multiplied by the scale of its block of `blocksize` values."""
    scales = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    halves = packed.reshape(-1).view(torch.uint8).long()
    indices = torch.stack([halves >> 4, halves & 0xF], dim=1).reshape(-1)[: state.shape.numel()]
    block = torch.arange(indices.numel()) // state.blocksize
    return (state.code[indices] * scales[block]).reshape(state.shape)


SHAPES = [(96, 64), (64, 128), (8, 16), (5, 24), (3, 7)]
"""Rows of whole blocks (the first two); a row narrower than a block; rows ending mid-block with a short last
block (120 values); an odd row length (21 values, half of the last byte unused)."""


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-ops"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single"])
@pytest.mark.parametrize("shape", SHAPES)
def test_decoding_is_the_format_on_every_host(native, quant_type, nested, shape):
    packed, state = quantized(shape, quant_type, nested)
    got = bnb4.dequantize_into_workspace(packed, state, native=native)
    assert got.shape == shape and got.dtype == torch.float32
    assert torch.equal(got, format_reference(packed, state))
    if bnb4.native_decoding_is_exact(shape, state.blocksize):
        # Where every row is whole blocks, bitsandbytes' own decoding (its AVX-512 branch included) is the format.
        assert torch.equal(got, bnbf.dequantize_4bit(packed, state))
    assert torch.equal(bnb4.dequantize(packed, state), got)  # a fresh tensor with the same values


def test_native_decoder_is_used_only_where_every_row_is_whole_blocks(monkeypatch):
    """bitsandbytes' AVX-512 decoder reads the scale of (row, block of the row): on a row narrower than a block it
    reads the wrong scale on AVX-512 hosts (and past the scales), so such shapes never reach it, on any host."""
    calls = []
    real = bnb4._native_decoder("nf4")
    if real is None:
        pytest.skip("this bitsandbytes build has no native CPU decoder")
    monkeypatch.setattr(bnb4, "_native_decoder", lambda quant_type: lambda *a: calls.append(a) or real(*a))
    assert bnb4.native_decoding_is_exact((96, 64), 64) and not bnb4.native_decoding_is_exact((8, 16), 64)
    assert not bnb4.native_decoding_is_exact((5, 96), 64) and not bnb4.native_decoding_is_exact((64, 4096), 4096)
    wide, narrow = quantized((96, 64), nested=False), quantized((8, 16), nested=False)
    bnb4.dequantize_into_workspace(*wide)
    assert len(calls) == 1
    assert torch.equal(bnb4.dequantize_into_workspace(*narrow), format_reference(*narrow))
    assert len(calls) == 1


def test_decoding_reuses_one_buffer_per_thread():
    big, small = quantized((96, 64)), quantized((8, 16))
    first = bnb4.dequantize_into_workspace(*big)
    size = bnb4.workspace_bytes()
    assert size >= 96 * 64 * 4
    second = bnb4.dequantize_into_workspace(*small)
    assert second.data_ptr() == first.data_ptr()  # the same memory, not a new tensor
    assert bnb4.workspace_bytes() == size  # a smaller weight does not reallocate

    seen = {}

    def other():
        seen["ptr"] = bnb4.dequantize_into_workspace(*small).data_ptr()
        seen["equal"] = torch.equal(bnb4.dequantize_into_workspace(*small), bnbf.dequantize_4bit(*small))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen["equal"] and seen["ptr"] != first.data_ptr()  # each thread decodes into its own buffer


@pytest.mark.parametrize("bias", [False, True])
def test_workspace_layer_forward_and_backward_are_bitsandbytes_bit_for_bit(bias):
    theirs = linear4bit(96, 64, bias=bias)
    mine = linear4bit(96, 64, bias=bias)
    assert bnb4.use_workspace_4bit(torch.nn.Sequential(mine)) == 1
    assert isinstance(mine, bnb.nn.Linear4bit) and type(mine).__name__ == "Workspace4bit"
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 5, 64, requires_grad=True)
    grad = torch.randn(2, 5, 96)
    outputs, grads = [], []
    for layer in (theirs, mine):
        out = layer(x)
        out.backward(grad)
        outputs.append(out)
        grads.append(x.grad)
        x.grad = None
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])
    with torch.no_grad():
        assert torch.equal(mine(x), outputs[0])
    assert mine.fresh_output(x)


@pytest.mark.parametrize("case", ["bf16-compute", "bf16-input", "autocast"])
def test_bf16_products_decode_into_the_workspace(case):
    """What `precision=auto` and `qlora.compute_dtype=auto` give on bf16-capable CPUs (Zen 4, Sapphire Rapids):
    bf16 products run on the workspace's weight, never in bitsandbytes' forward, on every host. As in
    bitsandbytes, the input is cast to the compute dtype (a bf16 input to an fp32 layer multiplies in fp32), autocast
    turns the product to bf16, and the output comes back in the input's dtype."""
    compute = torch.bfloat16 if case == "bf16-compute" else torch.float32
    product = torch.float32 if case == "bf16-input" else torch.bfloat16
    layer = linear4bit(96, 64, compute_dtype=compute)
    bnb4.use_workspace_4bit(torch.nn.Sequential(layer))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16 if case == "bf16-input" else torch.float32, requires_grad=True)
    weight = format_reference(layer.weight.data, layer.weight.quant_state).to(product)
    grad = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    assert layer.uses_workspace(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = layer(x)
    assert out.dtype == x.dtype
    assert torch.equal(out, torch.nn.functional.linear(x.detach().to(product), weight).to(x.dtype))
    out.backward(grad)
    assert x.grad.dtype == x.dtype and torch.equal(x.grad, (grad.to(product) @ weight).to(x.dtype))


@pytest.mark.parametrize("shape,their_error", [
    ((32, 16), (RuntimeError, "invalid for input of size")),  # narrower than a block: absmax reshaped to [32, 0]
    ((40, 64), (AssertionError, "N must be divisible by block_n")),  # out_features not a multiple of 32
    ((96, 64), None),
], ids=["narrow", "rows-not-32", "wide"])
def test_avx512_bf16_inference_conversion_is_never_reached(shape, their_error):
    """On CPUs with AVX-512 BF16, bitsandbytes' forward without grad converts the weight in place to its inference
    layout, which fails for narrow layers (the conversion is plain torch, so forcing bitsandbytes' CPU flag runs it
    on any host). Workspace layers never convert: evaluation and generation decode as training does."""
    out_features, in_features = shape
    theirs = linear4bit(out_features, in_features)
    theirs.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on a Zen 4 or Sapphire Rapids host
    x = torch.randn(3, in_features)
    if their_error:
        with torch.no_grad(), pytest.raises(their_error[0], match=their_error[1]):
            theirs.eval()(x)  # the crash slimtune avoids: bitsandbytes' own layer on such a host
    mine = linear4bit(out_features, in_features)
    mine.support_avx512bf16_for_cpu = True
    bnb4.use_workspace_4bit(torch.nn.Sequential(mine))
    assert mine.support_avx512bf16_for_cpu is False
    weight = format_reference(mine.weight.data, mine.weight.quant_state)
    mine.eval()
    with torch.no_grad():
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = mine(x)
            dtype = torch.bfloat16 if autocast else torch.float32
            assert torch.equal(out.to(dtype), torch.nn.functional.linear(x.to(dtype), weight.to(dtype)))
    assert not getattr(mine.weight.quant_state, "packing_format_for_cpu", False)  # stored as it was
    assert mine.weight.shape == theirs_shape(out_features, in_features)


def theirs_shape(out_features, in_features):
    """The packed weight's shape bitsandbytes stores: the 4-bit values two per byte, as one column."""
    return torch.Size([(out_features * in_features + 1) // 2, 1])


def test_other_cases_run_bitsandbytes_forward(monkeypatch):
    """A trainable bias or an fp16 input is bitsandbytes' own path, with its own results."""
    calls = []
    original = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: calls.append(1) or original(self, x))
    x = torch.randn(3, 64)
    half = linear4bit(96, 64)
    bnb4.use_workspace_4bit(torch.nn.Sequential(half))
    assert not half.uses_workspace(x.half()) and not half.fresh_output(x.half())
    trained_bias = linear4bit(96, 64, bias=True)
    trained_bias.bias.requires_grad_(True)
    expected = trained_bias(x)
    bnb4.use_workspace_4bit(torch.nn.Sequential(trained_bias))
    assert not trained_bias.uses_workspace(x)
    out = trained_bias(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert trained_bias.bias.grad is not None
    assert len(calls) == 2  # both calls of the trained-bias layer went through bitsandbytes' forward


def test_a_weight_quantized_from_bf16_decodes_to_bf16_as_bitsandbytes_does():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert state.dtype == torch.bfloat16
    expected = bnbf.dequantize_4bit(packed, state)
    assert expected.dtype == torch.bfloat16 and torch.equal(expected, format_reference(packed, state).bfloat16())
    assert torch.equal(bnb4.dequantize(packed, state), expected)
    assert torch.equal(bnb4._weight_in(packed, state, torch.bfloat16), expected)
    assert torch.equal(bnb4._weight_in(packed, state, torch.float32), expected.float())  # rounded as stored
