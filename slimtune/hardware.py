"""What the machine can do: which device, which precision, how fast a matmul runs, how much memory was used.

Nothing here assumes CUDA: every decision asks the device.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from slimtune.errors import SlimtuneError
from slimtune.kernels import onednn_available, onednn_nt


def pick_device(name: str = "auto") -> torch.device:
    """`auto` → CUDA, then MPS, then CPU. An explicit name must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SlimtuneError(f"device={name!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimtuneError(f"device={name} asked for, but this machine has no CUDA GPU; use device=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SlimtuneError(f"device={name} asked for, but MPS is not available; use device=auto or cpu")
    return device


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run in hardware (Ampere+ GPUs, Apple silicon). CPUs here emulate bf16 ~70x slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return True
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for autocast: `auto` is bf16 where native, else fp32 (this project's CPUs)."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype == torch.float16 and device.type == "cpu":
        raise SlimtuneError("precision=fp16 is not supported on CPU; use precision=auto or fp32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """An autocast context for low-precision compute, or a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _cache_file() -> Path:
    root = Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))
    return root / "matmul_peak.json"


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                      sizes: tuple[int, ...] = (256, 512, 1024, 2048), seconds: float = 0.3,
                      use_cache: bool = True) -> float:
    """Measured peak FLOP/s of square matmuls on `device` in `dtype`: the best of several sizes and, on CPUs, of
    both kernels slimtune can use (torch's BLAS and oneDNN).

    MFU is only meaningful against what this machine can really do, so we measure instead of quoting a datasheet.
    Several sizes are tried because the fastest one depends on the cache sizes (on a 2-core AVX-512 CPU it is
    around 512; on GPUs the largest). The result is cached per (device, dtype, thread count), since measuring takes
    about `seconds` per size.
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = f"{name}|{dtype}|threads={torch.get_num_threads()}|sizes={','.join(map(str, sizes))}|kernels=aten,onednn"
    cache = _cache_file()
    if use_cache and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
        if key in cached:
            return float(cached[key])
    peak = 0.0
    gen = torch.Generator().manual_seed(0)  # never touch the global RNG: training runs must stay reproducible
    for size in sizes:
        a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        kernels = [lambda: torch.mm(a, b, out=out)]
        if device.type == "cpu" and dtype == torch.float32 and onednn_available():
            kernels.append(lambda: onednn_nt(a, b))  # the faster of the two on some CPUs (see slimtune.kernels)
        for kernel in kernels:
            for _ in range(2):  # warm up kernels and caches
                kernel()
            synchronize(device)
            best = float("inf")
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                kernel()
                synchronize(device)
                best = min(best, time.perf_counter() - t0)
            peak = max(peak, 2 * size**3 / best)
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cached = json.loads(cache.read_text()) if cache.is_file() else {}
            cached[key] = peak
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(cache)
        except (OSError, json.JSONDecodeError):
            pass  # a read-only home only costs a re-measurement next time
    return peak
