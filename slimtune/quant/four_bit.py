"""Linear weights stored in 4 bits, by bitsandbytes (`Params4bit`: packed bytes with a `quant_state`) or by torchao
(`NF4Tensor`): recognising them, their size, their values in fp32, and the memory of the model around them."""

from __future__ import annotations

import torch
import torch.nn as nn

from slimtune.quant.bnb4 import dequantize


def is_quantized(weight: torch.Tensor) -> bool:
    """A 4-bit weight: bitsandbytes' (packed bytes with a quant_state) or torchao's NF4 tensor."""
    return getattr(weight, "quant_state", None) is not None or hasattr(weight, "quantized_data")


def quantized_bytes(weight: torch.Tensor) -> int:
    """Memory a 4-bit weight takes (its packed values and scales)."""
    if hasattr(weight, "quantized_data"):  # torchao NF4: 4-bit codes, int8 block scales, fp32 scale-of-scales
        return sum(t.numel() * t.element_size() for t in (weight.quantized_data, weight.quantized_scalers,
                                                           weight.quantization_factor, weight.scaler_mean))
    return weight.numel() * weight.element_size()


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer in fp32, dequantizing a bitsandbytes 4-bit one."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:
        return dequantize(weight.data, weight.quant_state).float()
    if hasattr(weight, "quantized_data"):
        return weight.get_original_weight().float()
    return weight.detach().float()


def own_memory(model: nn.Module) -> None:
    """Give every tensor that is not 4-bit its own memory instead of a view into the memory-mapped checkpoint file.

    transformers loads safetensors through a memory map and leaves unconverted tensors (embeddings, norms) as views
    into it. Those views keep the whole mapping alive, so every page read while quantizing the linear layers stays
    resident: measured on SmolLM2-135M, 517 MB of file pages after loading, 103 MB once the ~110 MB of views are
    copied. The copies are exact."""
    import gc

    for p in model.parameters():
        if not is_quantized(p):
            p.data = p.data.clone()
    gc.collect()  # the mapping is released when its last view goes
