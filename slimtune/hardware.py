"""What the machine can do: which device, which precision, how fast a matmul runs, how much memory was used.

Nothing here assumes CUDA: every decision asks the device.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from slimtune.errors import SlimtuneError
from slimtune.host import cache_file, cpu_flags, cpu_identity, read_cache, write_cache
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
        raise SlimtuneError(f"device {name!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps "
                            f"(runtime.device for train, --device for the other verbs)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimtuneError(f"device {name} asked for, but this machine has no CUDA GPU; use auto or cpu "
                            f"(runtime.device for train, --device for the other verbs)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SlimtuneError(f"device {name} asked for, but MPS is not available; use auto or cpu "
                            f"(runtime.device for train, --device for the other verbs)")
    return device


CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
"""x86 flags of bf16 instructions (AMX tiles; AVX-512 dot products). Without one, bf16 is emulated in fp32."""

BF16_MIN_SPEEDUP = 1.3
"""`precision=auto` picks bf16 on a CPU only where a bf16 matmul beats fp32 by at least this factor: autocast's
casts, and the norms and softmax that stay in fp32, eat part of the matmul gain, so a smaller edge is not worth the
lost precision."""

BF16_PROBE_SIZE = 1024
"""Side of the square matmuls timed by `bf16_speedup` (large enough for the kernels' steady state)."""

BF16_SPEEDUP_ENV = "SLIMTUNE_BF16_SPEEDUP"
"""Environment variable that replaces the bf16 probe's measurement by a given ratio, on any CPU: 1 makes
`precision=auto` fp32, 2 makes it bf16 autocast. The test suite sets it so that `auto` means the same on every host
(and forces each branch where it tests one); a user can pin `auto`'s verdict with it across hosts."""


def _matmul_seconds(dtype: torch.dtype, size: int, repeats: int = 4, max_seconds: float = 0.5) -> float:
    """Best wall-clock seconds of a (size, size) @ (size, size) CPU matmul in `dtype` over up to `repeats` runs.

    The first run (which may build or pack the kernel) counts only if no later one is faster; runs stop early once
    `max_seconds` have passed, since an emulated bf16 matmul of this size can take seconds.
    """
    gen = torch.Generator().manual_seed(0)  # never touch the global RNG: training runs must stay reproducible
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    best, start = float("inf"), time.perf_counter()
    for i in range(repeats):
        if i and time.perf_counter() - start > max_seconds:
            break
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return best


def forced_bf16_speedup() -> float | None:
    """The ratio `SLIMTUNE_BF16_SPEEDUP` sets (see `BF16_SPEEDUP_ENV`), or None where it is unset or empty."""
    value = os.environ.get(BF16_SPEEDUP_ENV, "").strip()
    if not value:
        return None
    try:
        ratio = float(value)
    except ValueError:
        ratio = float("nan")
    if not ratio > 0:
        raise SlimtuneError(f"{BF16_SPEEDUP_ENV}={value!r} is not a positive number: set it to the bf16/fp32 matmul "
                            f"speed ratio to assume (1 for fp32, 2 for bf16 under runtime.precision=auto), or unset it")
    return ratio


def bf16_speedup(device: torch.device, use_cache: bool = True) -> float | None:
    """How many times faster a bf16 matmul runs than an fp32 one on this CPU (fp32 seconds / bf16 seconds).

    `SLIMTUNE_BF16_SPEEDUP`, where set, is the answer on any CPU (nothing is measured). Otherwise None where nothing
    is measured: on GPUs and MPS (they report bf16 support themselves) and on CPUs without bf16 instructions
    (`CPU_BF16_FLAGS`), where bf16 is emulated. Otherwise a `BF16_PROBE_SIZE` square matmul is timed in each dtype
    (best of up to 4 runs, no more runs after half a second) and the ratio is cached per CPU class
    (`slimtune.host.cpu_identity`) and torch version in $SLIMTUNE_CACHE, next to the `matmul_peak_flops` cache.
    """
    if device.type != "cpu":
        return None
    forced = forced_bf16_speedup()
    if forced is not None:
        return forced
    if not cpu_flags() & CPU_BF16_FLAGS:
        return None
    key = f"{cpu_identity()}|torch={torch.__version__}|size={BF16_PROBE_SIZE}"
    cache = cache_file("bf16_speedup.json")
    if use_cache:
        cached = read_cache(cache)
        if key in cached:
            return float(cached[key])
    speedup = (_matmul_seconds(torch.float32, BF16_PROBE_SIZE)
               / _matmul_seconds(torch.bfloat16, BF16_PROBE_SIZE))
    if use_cache:
        write_cache(cache, key, speedup)
    return speedup


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run in hardware and pay off: Ampere+ GPUs, Apple silicon, and CPUs that both have
    bf16 instructions (AMX or AVX-512 BF16) and, measured, run a bf16 matmul at least `BF16_MIN_SPEEDUP` times
    faster than fp32 (see `bf16_speedup`; measured once per CPU class, then cached)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return True
    if device.type != "cpu":
        return False
    speedup = bf16_speedup(device)
    return speedup is not None and speedup >= BF16_MIN_SPEEDUP


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for autocast: `auto` is bf16 where it is native and faster (`native_bf16`), else fp32."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype == torch.float16 and device.type == "cpu":
        raise SlimtuneError("runtime.precision=fp16 is not supported on CPU; use runtime.precision=auto or fp32")
    return dtype


DTYPE_WORDS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def describe_precision(setting: str, device: torch.device, dtype: torch.dtype) -> str:
    """What a run computes in and why, for its first lines: `precision=auto`'s choice is a trade (on CPUs with bf16
    instructions, speed for memory: autocast keeps a bf16 copy of every fp32 weight a backward needs)."""
    name = "fp32" if dtype == torch.float32 else f"{DTYPE_WORDS.get(dtype, str(dtype))} autocast"
    if setting != "auto":
        return f"{name} (runtime.precision={setting})"
    if device.type != "cpu":
        return f"{name} (runtime.precision=auto)"
    speedup = bf16_speedup(device)
    forced = f", {BF16_SPEEDUP_ENV} set" if forced_bf16_speedup() is not None else ""
    if speedup is None:
        return "fp32 (runtime.precision=auto: this CPU has no bf16 instructions)"
    if dtype == torch.float32:
        return f"fp32 (runtime.precision=auto: a bf16 matmul runs only {speedup:.2f}x fp32's here{forced})"
    return (f"bf16 autocast (runtime.precision=auto: a bf16 matmul runs {speedup:.2f}x fp32's here{forced}; fp32 "
            f"weights are cast for each product and the copies kept for backward: runtime.precision=fp32 for the "
            f"lower peak)")


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


PEAK_SIZES = (256, 512, 1024, 2048)


def _peak_key(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...]) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_identity()
    return f"{name}|{dtype}|threads={torch.get_num_threads()}|sizes={','.join(map(str, sizes))}|kernels=aten,onednn"


def known_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float | None:
    """The peak `matmul_peak_flops` measured earlier on this machine (`slimtune bench` measures it), or None:
    training runs report MFU only against a peak already known, and never spend their own time measuring one."""
    value = read_cache(cache_file("matmul_peak.json")).get(_peak_key(device, dtype, PEAK_SIZES))
    return float(value) if value is not None else None


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                      sizes: tuple[int, ...] = PEAK_SIZES, seconds: float = 0.3,
                      use_cache: bool = True) -> float:
    """Measured peak FLOP/s of square matmuls on `device` in `dtype`: the best of several sizes and, on CPUs, of
    both kernels slimtune can use (torch's BLAS and oneDNN).

    MFU is only meaningful against what this machine can really do, so we measure instead of quoting a datasheet.
    Several sizes are tried because the fastest one depends on the cache sizes (on a 2-core AVX-512 CPU it is
    around 512; on GPUs the largest). The result is cached per (device, dtype, thread count), since measuring takes
    about `seconds` per size.
    """
    key = _peak_key(device, dtype, sizes)
    cache = cache_file("matmul_peak.json")
    if use_cache:
        cached = read_cache(cache)
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
        write_cache(cache, key, peak)
    return peak
