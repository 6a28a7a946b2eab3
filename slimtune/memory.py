"""Measured memory: the peak every training log reports.

On CUDA the peak is what PyTorch's allocator handed out (`max_memory_allocated`); on CPU it is the process's peak
resident set size (VmHWM), which includes the Python interpreter and libraries — what the machine really needed.
"""

from __future__ import annotations

import resource
import sys

import torch


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_peak_rss_bytes() -> int:
    """Peak resident memory of this process in bytes (VmHWM on Linux, ru_maxrss elsewhere)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, Linux KiB


def cpu_rss_bytes() -> int:
    """Current resident memory of this process in bytes."""
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else cpu_peak_rss_bytes()


def peak_memory_bytes(device: torch.device) -> int:
    """The measured peak for `device`: allocator peak on CUDA/MPS, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    return cpu_peak_rss_bytes()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
