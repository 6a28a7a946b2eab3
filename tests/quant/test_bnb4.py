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


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-ops"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 128), (8, 16)])
def test_decoding_equals_bitsandbytes_bit_for_bit(native, quant_type, nested, shape):
    packed, state = quantized(shape, quant_type, nested)
    expected = bnbf.dequantize_4bit(packed, state)
    got = bnb4.dequantize_into_workspace(packed, state, native=native)
    assert got.shape == shape and got.dtype == torch.float32
    assert torch.equal(got, expected)


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


def test_other_cases_run_bitsandbytes_forward(monkeypatch):
    """A bf16 compute dtype or a trainable bias is bitsandbytes' own path, with its own results."""
    calls = []
    original = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: calls.append(1) or original(self, x))
    x = torch.randn(3, 64)
    bf16 = linear4bit(96, 64, compute_dtype=torch.bfloat16)
    expected = bf16(x)
    bnb4.use_workspace_4bit(torch.nn.Sequential(bf16))
    assert not bf16.uses_workspace(x) and not bf16.fresh_output(x)
    assert torch.equal(bf16(x), expected)
    trained_bias = linear4bit(96, 64, bias=True)
    trained_bias.bias.requires_grad_(True)
    bnb4.use_workspace_4bit(torch.nn.Sequential(trained_bias))
    assert not trained_bias.uses_workspace(x)
    trained_bias(x).sum().backward()
    assert trained_bias.bias.grad is not None
    assert len(calls) == 3  # both layers went through bitsandbytes' forward, the workspace layers too
