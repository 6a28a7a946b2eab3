"""bitsandbytes 4-bit linear layers whose CPU products decode the weight into a buffer each thread reuses.

bitsandbytes (0.50) multiplies by a 4-bit weight on CPU by decoding the whole weight into a new tensor, in the
forward and again in the backward, and has no CPU kernel that decodes into a given tensor. Those fresh blocks of up
to a few MB (3.4 MB for a 1536 x 576 projection in fp32), allocated and freed between the activations a step keeps
for its backward, leave holes in glibc's heap that later activations only partly fill: the process grows by more
than the tensors it holds, and by a different amount from run to run. Measured on SmolLM2-135M (QLoRA r=8, 4 x 128
tokens, 6 steps, AMD EPYC Zen 3, three runs each): peak resident memory 1557 / 1653 / 1775 MB with bitsandbytes'
product, 1547 / 1527 / 1554 MB with this one (with the LoRA layers' defensive output copy dropped, see
`Workspace4bit.fresh_output`); the full comparison is docs/BENCHMARKS.md section 8.

`Workspace4bit` is bitsandbytes' `Linear4bit` (same parameters, state dict and quantization state; peft's LoRA wraps
it as it wraps the original) whose forward, for CPU products in fp32 or bf16 (autocast included), decodes into the
calling thread's buffer. The decoding follows bitsandbytes' format: two 4-bit indices per byte, high half first,
looked up in the quantization's 16-entry code book and multiplied by the scale of their block of the flattened weight
(double-quantized scales are decoded by bitsandbytes itself); where bitsandbytes decodes correctly, the result equals
`bitsandbytes.functional.dequantize_4bit` bit for bit (tests/quant/test_bnb4.py).

Two bitsandbytes CPU paths are wrong for some shapes on CPUs with AVX-512, and slimtune keeps both out of reach
on every host:
- its native decoder's AVX-512 branch reads one scale per (row, block of the row): right where every row is a
  whole number of blocks, wrong where a row is narrower than a block or ends mid-block (`in_features % blocksize`
  != 0), where blocks run across rows. slimtune calls the native decoder (`slimtune.quant.bnb_native`) only where
  rows are whole blocks and decodes the other shapes with torch operations, identically on every host.
- on CPUs with AVX-512 BF16, `Linear4bit.forward` without grad (evaluation, generation) converts the weight in place
  to a packed layout for an inference kernel, which fails for layers whose `out_features` is not a multiple of 32
  or that are narrower than a block (`shape '[32, 0]' is invalid`), and then multiplies in bf16 whatever the
  compute dtype. `use_workspace_4bit` turns that conversion off (`support_avx512bf16_for_cpu = False`), and every
  product slimtune's runs make goes through the workspace anyway.
Other cases (a trainable bias, fp16, another device) run bitsandbytes' own forward.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune.quant.bnb_native import native_decoder as _native_decoder

_local = threading.local()

PRODUCT_DTYPES = (torch.float32, torch.bfloat16)
"""Input, compute and stored dtypes whose CPU products `Workspace4bit` runs itself."""


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's buffer `name`, at least `numel` long (grown, never shrunk), as its first `numel` elements."""
    buf = getattr(_local, name, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_local, name, buf)
    return buf[:numel]


BUFFERS = ("indices", "weight", "stored", "lowp")
"""This module's per-thread buffers: 4-bit indices, the fp32 decode, and its copies in the stored and compute dtype
(the last two only for bf16 models or bf16 products)."""


def workspace_bytes() -> int:
    """Bytes of the calling thread's buffers (0 before its first product)."""
    return sum(b.numel() * b.element_size() for b in (getattr(_local, n, None) for n in BUFFERS) if b is not None)


def native_decoding_is_exact(shape: tuple[int, int], blocksize: int) -> bool:
    """Whether bitsandbytes' native CPU decoder gives the format's values for a weight of this shape on every CPU:
    its AVX-512 branch reads one scale per (row, block of the row), which is the format's scale only where each row
    is a whole number of blocks. (Blocks of 2048 and more bitsandbytes itself decodes in torch: its vector code
    errs there.)"""
    return shape[-1] % blocksize == 0 and blocksize < 2048


def dequantize_into_workspace(packed: torch.Tensor, state, native: bool = True) -> torch.Tensor:
    """The fp32 weight that `packed` (a bitsandbytes 4-bit weight's bytes) and its `QuantState` encode, written
    into this thread's buffer: valid until the thread's next call, so use it at once and keep no reference.

    Decoded by bitsandbytes' native CPU routine where it has one, `native` is set and it is exact for the shape
    (`native_decoding_is_exact`), else by torch operations on the same format, which take any shape."""
    import bitsandbytes.functional as bnbf

    rows, cols = state.shape
    n = rows * cols
    halves = packed.reshape(-1).view(torch.uint8)
    weight = _buffer("weight", n, torch.float32)
    scales = state.absmax
    if state.nested:  # the block scales are themselves 8-bit blocks around an offset
        scales = bnbf.dequantize_blockwise(state.absmax, state.state2)
        scales += state.offset
    exact = native and native_decoding_is_exact((rows, cols), state.blocksize)
    decode = _native_decoder(state.quant_type) if exact else None
    if decode is not None:
        decode(halves, scales, weight, state.blocksize, rows, cols)
        return weight.view(rows, cols)
    indices = _buffer("indices", 2 * halves.numel(), torch.int32)  # an odd count leaves half of the last byte unused
    torch.bitwise_right_shift(halves, 4, out=indices[0::2])
    torch.bitwise_and(halves, 0xF, out=indices[1::2])
    torch.index_select(state.code, 0, indices[:n], out=weight)
    whole = n - n % state.blocksize
    weight[:whole].view(-1, state.blocksize).mul_(scales[:whole // state.blocksize].view(-1, 1))
    if whole < n:  # the last block is shorter
        weight[whole:].mul_(scales[whole // state.blocksize])
    return weight.view(rows, cols)


def dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """The weight `packed` and its `QuantState` encode, as a new tensor in the dtype it was quantized from (what
    `bitsandbytes.functional.dequantize_4bit` returns where it is right, and the format's values on every CPU)."""
    return dequantize_into_workspace(packed, state).to(state.dtype, copy=True)


def _weight_in(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The decoded weight in the product's `dtype`, in this thread's buffers. A weight quantized from bf16 is rounded
    to bf16 first, as bitsandbytes' decoding to the stored dtype does."""
    weight = dequantize_into_workspace(packed, state)
    if state.dtype != torch.float32:
        stored = _buffer("stored", weight.numel(), state.dtype).view_as(weight).copy_(weight)
        if dtype == state.dtype:
            return stored
        weight.copy_(stored)
    if dtype == torch.float32:
        return weight
    return _buffer("lowp", weight.numel(), dtype).view_as(weight).copy_(weight)


class _WorkspaceMatmul(torch.autograd.Function):
    """x @ W.T for a frozen 4-bit W, in `dtype`, decoded into the workspace in the forward and again in the
    backward; nothing weight-sized is kept between them. Autocast is off inside: `dtype` already says what it
    would have chosen, and its own cast of the weight would allocate a weight-sized tensor per product."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.packed, ctx.state, ctx.dtype = packed, state, dtype  # a frozen parameter and its scales
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.to(dtype), _weight_in(packed, state, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        with torch.autocast("cpu", enabled=False):
            grad_x = grad.to(ctx.dtype) @ _weight_in(ctx.packed, ctx.state, ctx.dtype)
        return grad_x, None, None, None, None  # autograd casts grad_x to x's dtype where they differ


def _linear4bit_class() -> type:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


_CLASS: type | None = None


def workspace_class() -> type:
    """`Workspace4bit`, made on first use (bitsandbytes is an optional extra)."""
    global _CLASS
    if _CLASS is None:
        base = _linear4bit_class()

        def uses_workspace(self, x: torch.Tensor) -> bool:
            """Whether the product with `x` runs here (else bitsandbytes' forward runs)."""
            state = self.weight.quant_state
            if state is None or x.device.type != "cpu" or self.weight.device.type != "cpu":
                return False
            return (x.dtype in PRODUCT_DTYPES and self.compute_dtype in (None, *PRODUCT_DTYPES)
                    and state.dtype in PRODUCT_DTYPES and not getattr(state, "packing_format_for_cpu", False)
                    and (self.bias is None or not self.bias.requires_grad))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

            fix_4bit_weight_quant_state_from_module(self)
            if not uses_workspace(self, x):
                return base.forward(self, x)
            # As bitsandbytes' forward: inputs cast to the compute dtype, the output back to the input's dtype.
            if not self.compute_type_is_set:
                self.set_compute_type(x)
                self.compute_type_is_set = True
            inp_dtype = x.dtype
            if self.compute_dtype is not None:
                x = x.to(self.compute_dtype)
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
            out = _WorkspaceMatmul.apply(x, self.weight.data, self.weight.quant_state, self.bias, dtype)
            return out.to(inp_dtype)

        def fresh_output(self, x: torch.Tensor) -> bool:
            """Whether the output for `x` is a new tensor nothing else holds (so a LoRA layer may add into it
            instead of copying it first, as peft does for bitsandbytes' own output)."""
            return uses_workspace(self, x)

        _CLASS = type("Workspace4bit", (base,), {
            "forward": forward, "uses_workspace": uses_workspace, "fresh_output": fresh_output,
            "__module__": __name__, "__doc__": "bitsandbytes' Linear4bit whose CPU products decode the weight into a "
                                               "per-thread buffer (`dequantize_into_workspace`)."})
    return _CLASS


def use_workspace_4bit(model: nn.Module) -> int:
    """Switch every bitsandbytes `Linear4bit` of `model` to `Workspace4bit` (its class only: parameters, state dict
    and isinstance checks stay as they were), with bitsandbytes' in-place conversion to its AVX-512 BF16 inference
    layout turned off (see the module's docstring); returns how many were switched."""
    base, cls = _linear4bit_class(), workspace_class()
    n = 0
    for module in model.modules():
        if type(module) is base:
            module.__class__ = cls
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def use_workspace_4bit_if_any(model: nn.Module) -> int:
    """`use_workspace_4bit` for a model loaded from any folder (a bitsandbytes-quantized export, say): a no-op,
    without importing bitsandbytes, for a model that cannot hold its layers."""
    import sys

    return use_workspace_4bit(model) if "bitsandbytes" in sys.modules else 0
