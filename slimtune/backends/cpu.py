"""CPU speed-ups, in one place: the glibc allocator setting and oneDNN linear layers.

`apply(model, runtime, device, threads)` is called once after the model is built; it changes nothing on other
devices. Which settings win on which CPUs is measured in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimtune.kernels import choose_matmul, use_onednn_linear
from slimtune.memory import set_cpu_allocator


def apply(model: nn.Module, runtime, device: torch.device, threads: int | None = None) -> str:
    """Set the allocator (runtime.cpu_allocator) and the linear kernel (runtime.matmul, timed at `threads` per
    product: 1 when the strategy runs products on one-core threads). Returns a short description for the log."""
    if device.type != "cpu":
        return ""
    allocator = runtime.cpu_allocator if set_cpu_allocator(runtime.cpu_allocator) else "system"
    matmul = choose_matmul(runtime.matmul, device, compile=runtime.compile, threads=threads)
    if matmul == "onednn":
        use_onednn_linear(model)
    return f"matmul {matmul}, allocator {allocator}"
