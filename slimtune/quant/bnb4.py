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
it as it wraps the original) whose forward, for fp32 products on CPU, decodes into the calling thread's buffer. The
decoding follows bitsandbytes' format: two 4-bit indices per byte, high half first, looked up in the quantization's
16-entry code book and multiplied by their block's scale (double-quantized scales are decoded by bitsandbytes
itself); the result equals `bitsandbytes.functional.dequantize_4bit` bit for bit (tests/quant/test_bnb4.py). Other
cases (a bf16 compute dtype, a trainable bias, another device) run bitsandbytes' own forward.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

_local = threading.local()


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's buffer `name`, at least `numel` long (grown, never shrunk), as its first `numel` elements."""
    buf = getattr(_local, name, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_local, name, buf)
    return buf[:numel]


def workspace_bytes() -> int:
    """Bytes of the calling thread's buffers (0 before its first product)."""
    return sum(b.numel() * b.element_size() for b in (getattr(_local, n, None) for n in ("indices", "weight"))
               if b is not None)


def _native_decoder(quant_type: str):
    """bitsandbytes' own CPU routine that decodes a 4-bit weight into fp32 at a given address (what its CPU
    `dequantize_4bit` calls after allocating the output), or None where its native library lacks it."""
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_fp32", None)


def dequantize_into_workspace(packed: torch.Tensor, state, native: bool = True) -> torch.Tensor:
    """The fp32 weight that `packed` (a bitsandbytes 4-bit weight's bytes) and its `QuantState` encode, written
    into this thread's buffer: valid until the thread's next call, so use it at once and keep no reference.

    Decoded by bitsandbytes' native CPU routine where it has one (and `native`), else by torch operations on the
    same format."""
    import bitsandbytes.functional as bnbf

    rows, cols = state.shape
    n = rows * cols
    halves = packed.reshape(-1).view(torch.uint8)
    weight = _buffer("weight", n, torch.float32)
    scales = state.absmax
    if state.nested:  # the block scales are themselves 8-bit blocks around an offset
        scales = bnbf.dequantize_blockwise(state.absmax, state.state2)
        scales += state.offset
    decode = _native_decoder(state.quant_type) if native and state.blocksize < 2048 else None
    if decode is not None:  # (bitsandbytes itself decodes blocks of 2048 and more in torch: its vector code errs)
        import ctypes

        scales = scales.float().contiguous()
        decode(bnbf.get_ptr(halves), bnbf.get_ptr(scales), bnbf.get_ptr(weight), ctypes.c_longlong(state.blocksize),
               ctypes.c_longlong(rows), ctypes.c_longlong(cols))
        return weight.view(rows, cols)
    indices = _buffer("indices", n, torch.int32)
    torch.bitwise_right_shift(halves, 4, out=indices[0::2])
    torch.bitwise_and(halves, 0xF, out=indices[1::2])
    torch.index_select(state.code, 0, indices, out=weight)
    weight.view(-1, state.blocksize).mul_(scales.view(-1, 1))
    return weight.view(rows, cols)


class _WorkspaceMatmul(torch.autograd.Function):
    """x @ W.T for a frozen 4-bit W, decoded into the workspace in the forward and again in the backward; nothing
    weight-sized is kept between them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.packed, ctx.state = packed, state  # a frozen parameter and its scales: no version to check
        return F.linear(x, dequantize_into_workspace(packed, state), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ dequantize_into_workspace(ctx.packed, ctx.state) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


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
            if state is None or x.device.type != "cpu" or x.dtype != torch.float32:
                return False
            rows, cols = state.shape
            return (self.compute_dtype in (None, torch.float32) and state.dtype == torch.float32
                    and self.weight.device.type == "cpu" and cols % 2 == 0 and (rows * cols) % state.blocksize == 0
                    and (self.bias is None or (not self.bias.requires_grad and self.bias.dtype == torch.float32)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

            fix_4bit_weight_quant_state_from_module(self)
            if not uses_workspace(self, x):
                return base.forward(self, x)
            return _WorkspaceMatmul.apply(x, self.weight.data, self.weight.quant_state, self.bias)

        def fresh_output(self, x: torch.Tensor) -> bool:
            """Whether the output for `x` is a new tensor nothing else holds (so a LoRA layer may add into it
            instead of copying it first, as peft does for bitsandbytes' own output)."""
            return uses_workspace(self, x)

        _CLASS = type("Workspace4bit", (base,), {
            "forward": forward, "uses_workspace": uses_workspace, "fresh_output": fresh_output,
            "__module__": __name__, "__doc__": "bitsandbytes' Linear4bit whose fp32 CPU products decode the weight "
                                               "into a per-thread buffer (`dequantize_into_workspace`)."})
    return _CLASS


def use_workspace_4bit(model: nn.Module) -> int:
    """Switch every bitsandbytes `Linear4bit` of `model` to `Workspace4bit` (its class only: parameters, state dict
    and isinstance checks stay as they were); returns how many were switched."""
    base, cls = _linear4bit_class(), workspace_class()
    n = 0
    for module in model.modules():
        if type(module) is base:
            module.__class__ = cls
            n += 1
    return n
