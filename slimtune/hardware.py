"""What the machine can do: which device, which precision, how fast a matmul runs, how much memory was used.

Nothing here assumes CUDA: every decision asks the device.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
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
        raise SlimtuneError(f"device {name!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps "
                            f"(runtime.device for train, --device for the other verbs)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimtuneError(f"device {name} asked for, but this machine has no CUDA GPU; use auto or cpu "
                            f"(runtime.device for train, --device for the other verbs)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SlimtuneError(f"device {name} asked for, but MPS is not available; use auto or cpu "
                            f"(runtime.device for train, --device for the other verbs)")
    return device


CPUINFO = Path("/proc/cpuinfo")

CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
"""x86 flags of bf16 instructions (AMX tiles; AVX-512 dot products). Without one, bf16 is emulated in fp32."""

BF16_MIN_SPEEDUP = 1.3
"""`precision=auto` picks bf16 on a CPU only where a bf16 matmul beats fp32 by at least this factor: autocast's
casts, and the norms and softmax that stay in fp32, eat part of the matmul gain, so a smaller edge is not worth the
lost precision."""

BF16_PROBE_SIZE = 1024
"""Side of the square matmuls timed by `bf16_speedup` (large enough for the kernels' steady state)."""


def _cpuinfo() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo; empty where the file does not exist (macOS, Windows)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (`avx2`, `avx512_bf16`, `amx_bf16`, ...); empty off Linux."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo `model name`, else what the platform module reports)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown cpu"


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


def bf16_speedup(device: torch.device, use_cache: bool = True) -> float | None:
    """How many times faster a bf16 matmul runs than an fp32 one on this CPU (fp32 seconds / bf16 seconds).

    None where nothing is measured: on GPUs and MPS (they report bf16 support themselves) and on CPUs without bf16
    instructions (`CPU_BF16_FLAGS`), where bf16 is emulated. Otherwise a `BF16_PROBE_SIZE` square matmul is
    timed in each dtype (best of up to 4 runs, no more runs after half a second) and the ratio is cached per CPU
    model and torch version in $SLIMTUNE_CACHE, next to the `matmul_peak_flops` cache.
    """
    if device.type != "cpu" or not cpu_flags() & CPU_BF16_FLAGS:
        return None
    key = f"{cpu_model_name()}|torch={torch.__version__}|size={BF16_PROBE_SIZE}"
    cache = _cache_file("bf16_speedup.json")
    if use_cache:
        cached = _read_cache(cache)
        if key in cached:
            return float(cached[key])
    speedup = (_matmul_seconds(torch.float32, BF16_PROBE_SIZE)
               / _matmul_seconds(torch.bfloat16, BF16_PROBE_SIZE))
    if use_cache:
        _write_cache(cache, key, speedup)
    return speedup


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run in hardware and pay off: Ampere+ GPUs, Apple silicon, and CPUs that both have
    bf16 instructions (AMX or AVX-512 BF16) and, measured, run a bf16 matmul at least `BF16_MIN_SPEEDUP` times
    faster than fp32 (see `bf16_speedup`; measured once per CPU model, then cached)."""
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


def _cache_file(name: str) -> Path:
    """A file in slimtune's cache folder: $SLIMTUNE_CACHE, else ~/.cache/slimtune."""
    root = Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))
    return root / name


def _read_cache(cache: Path) -> dict:
    """The measurements stored in `cache`; empty when it is missing or unreadable (they are measured again)."""
    if not cache.is_file():
        return {}
    try:
        return json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(cache: Path, key: str, value) -> None:
    """Store one measurement in `cache`, keeping the others; atomic, so concurrent runs never see half a file."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cached = _read_cache(cache)
        cached[key] = value
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time


PEAK_SIZES = (256, 512, 1024, 2048)


def _peak_key(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...]) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|{dtype}|threads={torch.get_num_threads()}|sizes={','.join(map(str, sizes))}|kernels=aten,onednn"


def known_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float | None:
    """The peak `matmul_peak_flops` measured earlier on this machine (`slimtune bench` measures it), or None:
    training runs report MFU only against a peak already known, and never spend their own time measuring one."""
    value = _read_cache(_cache_file("matmul_peak.json")).get(_peak_key(device, dtype, PEAK_SIZES))
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
    cache = _cache_file("matmul_peak.json")
    if use_cache:
        cached = _read_cache(cache)
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
        _write_cache(cache, key, peak)
    return peak
