"""Faster fp32 matrix products on CPUs: oneDNN's kernels for `nn.Linear`, chosen by measurement.

torch sends a CPU fp32 `mm` to the BLAS it was built with (MKL in the PyPI wheels). On this project's CPU (AMD
EPYC, AVX-512) MKL runs a generic code path at ~185 GFLOP/s on 2 threads, while oneDNN, which ships inside the same
torch, reaches ~400 GFLOP/s on the same products (results equal to float rounding). `use_onednn_linear(model)` makes
every `nn.Linear` of a model compute its forward and both backward products with oneDNN; `choose_matmul(...)`
decides per machine, by timing both once (cached), so an Intel CPU where MKL is as fast keeps torch's default.

Only CPU fp32 products outside autocast take the oneDNN path; anything else (GPU, bf16, autocast, 1-D inputs)
runs the plain `F.linear`, so a patched model stays correct everywhere.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune.errors import SlimtuneError
from slimtune.host import cache_file, cpu_identity, read_cache, write_cache

MATMUL_CHOICES = ("auto", "onednn", "aten")


def onednn_available() -> bool:
    """True when this torch build has oneDNN (mkldnn) with its dense-input linear kernel."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 (lookup raises if the op is not registered)
    except (AttributeError, RuntimeError):
        return False
    return True


def onednn_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) with oneDNN's inner product; a (..., K), b (N, K)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ W.T + b, forward and backward on oneDNN. Saves x only when W needs a gradient (as aten does)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return onednn_nt(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        if ctx.needs_input_grad[0]:
            grad_x = onednn_nt(grad, weight.t())  # grad @ W: (..., K)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])  # (M, K)
            # dW = g.T @ x: the kernel wants the reduced dimension (tokens) last, so it copies both operands
            # transposed; still ~1.7x faster than aten's mm on the shapes we timed, and dW comes out contiguous.
            grad_w = onednn_nt(g.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # A tensor subclass (torchao's NF4, a DTensor) keeps its own linear: oneDNN reads plain fp32 memory only.
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() >= 2
            and x.shape[-1] > 0 and not torch.is_autocast_enabled("cpu")
            and type(weight) in (torch.Tensor, nn.Parameter))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` computed by oneDNN where eligible (CPU fp32, no autocast), else `F.linear` itself."""
    if _eligible(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` (same parameters, state_dict and isinstance) whose products run on oneDNN on CPU fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


def use_onednn_linear(model: nn.Module) -> int:
    """Switch every plain `nn.Linear` in `model` to `OneDNNLinear` in place; returns how many were switched.

    Subclasses of nn.Linear (quantized, LoRA, ...) keep their own forward.
    """
    if not onednn_available():
        raise SlimtuneError("runtime.matmul=onednn asked for, but this torch build has no oneDNN; use "
                            "runtime.matmul=aten")
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            n += 1
    return n


def _best_seconds(fn, seconds: float) -> float:
    fn()  # warm up (oneDNN builds its kernel for the shape on first use)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_backends(shape: tuple[int, int, int] = (512, 576, 1536), seconds: float = 0.15) -> dict[str, float]:
    """Best seconds of one (M, K) @ (K, N) fp32 product with torch's default BLAS (`aten`) and with oneDNN."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)  # never the global RNG: training runs must stay reproducible
    a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    times = {"aten": _best_seconds(lambda: F.linear(a, w), seconds)}
    if onednn_available():
        times["onednn"] = _best_seconds(lambda: onednn_nt(a, w), seconds)
    return times


def choose_matmul(setting: str, device: torch.device, compile: bool = False, use_cache: bool = True,
                  threads: int | None = None) -> str:
    """The backend for nn.Linear: `aten` or `onednn`. `auto` picks oneDNN on a CPU where it is at least 10 %
    faster than torch's default, measured once per (CPU class, thread count) and cached. `threads`: how many
    threads each product will run on (default: torch's current setting; 1 under cpu_shards). torch.compile
    (inductor) cannot lower the oneDNN linear, so a compiled model keeps aten's."""
    if setting not in MATMUL_CHOICES:
        raise SlimtuneError(f"runtime.matmul={setting!r} is not one of {', '.join(MATMUL_CHOICES)}")
    if setting != "auto":
        if setting == "onednn" and device.type != "cpu":
            raise SlimtuneError(f"runtime.matmul=onednn is a CPU kernel, but device is {device}; use "
                                f"runtime.matmul=auto or aten")
        if setting == "onednn" and compile:
            raise SlimtuneError("runtime.matmul=onednn cannot be combined with runtime.compile=true (torch.compile "
                                "cannot lower oneDNN's linear); use runtime.compile=false, or runtime.matmul=aten to "
                                "compile")
        return setting
    if device.type != "cpu" or compile or not onednn_available():
        return "aten"
    main_threads = torch.get_num_threads()
    threads = threads or main_threads
    key = f"{cpu_identity()}|threads={threads}"
    cache = cache_file("matmul_backend.json")
    cached = read_cache(cache) if use_cache else {}
    if key not in cached:
        if threads != main_threads:
            torch.set_num_threads(threads)
        try:
            cached[key] = time_backends()
        finally:
            if threads != main_threads:
                torch.set_num_threads(main_threads)
        if use_cache:
            write_cache(cache, key, cached[key])
    times = cached[key]
    return "onednn" if "onednn" in times and times["onednn"] * 1.1 <= times["aten"] else "aten"
