"""Which CPU this is, and the cache of what was measured on it.

Speed decisions (`precision=auto`'s bf16 probe, `runtime.matmul=auto`'s kernel choice, the matmul peak behind MFU)
are measured once and cached. A cache can outlive the machine it was measured on (a home folder moved to another
host, a VM that lands on another CPU class), so every entry is keyed by `cpu_identity()`: what decides the answer
(vendor, family, model, the instruction-set flags the kernels use, and the capability torch's kernels run at),
never the marketing name alone, which is just "AMD EPYC" on Zen 3, Zen 4 and Zen 5 alike.

This module imports nothing of slimtune's, so `hardware` and `kernels` can both use it.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")

ISA_FLAGS = frozenset({
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm",
})
"""/proc/cpuinfo flags that change which kernels run (x86 vector and matrix extensions, Arm's)."""


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
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features", "")).split())


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo `model name`, else what the platform module reports)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown cpu"


def cpu_identity() -> str:
    """A key naming this CPU class as its kernels see it, e.g.
    `AuthenticAMD AMD EPYC|family=25|model=17|isa=avx2,avx512_bf16,...|aten=AVX512`.

    The `aten` part is torch's kernel capability, which `ATEN_CPU_CAPABILITY` can lower (to imitate an older CPU):
    a measurement taken under such an imitation is kept apart from the host's own."""
    info = _cpuinfo()
    isa = ",".join(sorted(cpu_flags() & ISA_FLAGS)) or "-"
    try:
        aten = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        aten = "?"
    vendor = info.get("vendor_id") or info.get("CPU implementer") or platform.machine()
    return (f"{vendor} {cpu_model_name()}|family={info.get('cpu family', '?')}|model={info.get('model', '?')}"
            f"|isa={isa}|aten={aten}")


def cache_dir() -> Path:
    """slimtune's cache folder (measurements, converted GGUF models): `$SLIMTUNE_CACHE`, else `~/.cache/slimtune`."""
    return Path(os.environ.get("SLIMTUNE_CACHE") or Path.home() / ".cache" / "slimtune").expanduser()


def cache_file(name: str) -> Path:
    """A file in slimtune's cache folder (`cache_dir`)."""
    return cache_dir() / name


def read_cache(cache: Path) -> dict:
    """The measurements stored in `cache`; empty when it is missing or unreadable (they are measured again)."""
    if not cache.is_file():
        return {}
    try:
        return json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_cache(cache: Path, key: str, value) -> None:
    """Store one measurement in `cache`, keeping the others; atomic, so concurrent runs never see half a file."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cached = read_cache(cache)
        cached[key] = value
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time


def cpu_class() -> str:
    """This CPU in the words docs/BENCHMARKS.md uses for a host class, e.g. `AMD EPYC (family 25 model 17; AVX-512,
    AVX-512 BF16, VNNI)`: benchmarks print it beside every figure."""
    info, flags = _cpuinfo(), cpu_flags()
    named = [("AVX-512", "avx512f"), ("AVX-512 BF16", "avx512_bf16"), ("VNNI", "avx512_vnni"), ("AMX", "amx_bf16")]
    features = [label for label, flag in named if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    where = (f"family {info['cpu family']} model {info.get('model', '?')}" if "cpu family" in info
             else platform.machine())
    return f"{cpu_model_name()} ({where}; {', '.join(features) or 'no vector extensions named'})"
