"""Quantization building blocks: textbook int-N arithmetic, BitNet b1.58 layers, ternary packing and export,
fake-quantized (QAT) and int8 (PTQ) linear layers, the loader of quantized folders (`slimtune.quant.load`), the
CPU product of bitsandbytes' 4-bit layers that method=qlora trains on (`slimtune.quant.bnb4`), and qlora.init=loftq's
low-rank start from the rounding error (`slimtune.quant.loftq`).

These are layer-level pieces; the training methods that swap them into a model live in `slimtune.methods` (qat,
bitnet), post-training quantization in `slimtune.quant.ptq` and its verb in `slimtune.quant.cli`.

The names below are imported on first use, so that `slimtune.quant.cli` (the `quantize` verb's parser) can be
imported by the CLI without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BitLinear": "bitnet",
    "FakeQuantLinear": "layers",
    "PackedBitLinear": "bitnet",
    "QuantizedLinear": "layers",
    "bitnet_quantization_config": "pack",
    "dequantize": "arith",
    "export_bitlinear_state": "pack",
    "fake_quantize": "arith",
    "pack_ternary": "pack",
    "quant_params": "arith",
    "quantize": "arith",
    "replace_linears": "layers",
    "unpack_ternary": "pack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slimtune.quant' has no attribute {name!r}")
    return getattr(importlib.import_module(f"slimtune.quant.{_EXPORTS[name]}"), name)
