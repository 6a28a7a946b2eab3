"""Quantization building blocks: textbook int-N arithmetic, BitNet b1.58 layers, ternary packing and export.

These are layer-level pieces; the training methods that swap them into a model live in `slimtune.methods`.
"""

from slimtune.quant.arith import dequantize, fake_quantize, quant_params, quantize
from slimtune.quant.bitnet import BitLinear
from slimtune.quant.pack import bitnet_quantization_config, export_bitlinear_state, pack_ternary, unpack_ternary

__all__ = [
    "BitLinear",
    "bitnet_quantization_config",
    "dequantize",
    "export_bitlinear_state",
    "fake_quantize",
    "pack_ternary",
    "quant_params",
    "quantize",
    "unpack_ternary",
]
