"""bitsandbytes' native CPU decoder of 4-bit weights, called through ctypes: the one place slimtune calls into
bitsandbytes' compiled library directly, by a symbol name that is not part of its Python API. A bitsandbytes
release that renames the routine or changes its arguments breaks here; where the symbol is missing, `native_decoder`
returns None and `slimtune.quant.bnb4` decodes with torch operations instead."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch


def native_decoder(quant_type: str) -> Callable[..., None] | None:
    """bitsandbytes' own CPU routine that decodes a 4-bit weight into fp32 at a given address (what its CPU
    `dequantize_4bit` calls after allocating the output), or None where its native library lacks it.

    The routine returned is called as ``decode(packed, scales, out, blocksize, rows, cols)``: `packed` the weight's
    bytes (uint8, two 4-bit indices each), `scales` one per block of `blocksize` values of the flattened weight,
    `out` a float32 tensor of ``rows * cols`` entries it writes."""
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    routine = getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_fp32", None)
    if routine is None:
        return None

    def decode(packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, blocksize: int, rows: int,
               cols: int) -> None:
        from bitsandbytes.functional import get_ptr

        scales = scales.float().contiguous()
        routine(get_ptr(packed), get_ptr(scales), get_ptr(out), ctypes.c_longlong(blocksize),
                ctypes.c_longlong(rows), ctypes.c_longlong(cols))

    return decode
