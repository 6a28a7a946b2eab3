import ctypes
import json
import platform
import subprocess
import sys

import pytest
import torch

from slimtune.memory import cpu_peak_rss_bytes, cpu_rss_bytes, format_bytes, peak_memory_bytes, set_cpu_allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Reports glibc's own accounting (mallinfo2, glibc >= 2.33) around tensors the size of a step's activations: bytes
# in separately mmapped blocks, and bytes left free inside the heap after freeing them.
_MALLINFO = """
import ctypes, json, sys, torch
from slimtune.memory import set_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
print(json.dumps(set_cpu_allocator(sys.argv[1])))
for mib in (48, 8, 8):  # 48 MiB: above glibc's largest adaptive mmap threshold (32 MiB); 8 MiB: below it
    before = libc.mallinfo2()
    t = torch.empty(mib * 2**18)
    t.fill_(1.0)
    held = libc.mallinfo2()
    del t
    print(json.dumps({"mmapped": held.hblkhd - before.hblkhd, "free_in_heap": libc.mallinfo2().fordblks}))
"""


def _allocations(mode: str) -> tuple[bool, list[dict]]:
    out = subprocess.run([sys.executable, "-c", _MALLINFO, mode], capture_output=True, text=True, check=True)
    applied, *rounds = map(json.loads, out.stdout.splitlines())
    return applied, rounds


@pytest.mark.skipif(not GLIBC or not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs Linux with glibc >= 2.33")
def test_cpu_allocator_modes_change_where_large_buffers_live():
    MiB = 2**20
    applied, (big, small1, small2) = _allocations("system")
    assert applied is False
    # glibc's defaults: 48 MiB is its own mapping, unmapped on free (faulted in afresh every time); the first 8 MiB
    # block is mapped too, and freeing it raises the adaptive threshold so the second one comes from the heap.
    assert big["mmapped"] >= 48 * MiB and big["free_in_heap"] < 48 * MiB
    assert small1["mmapped"] >= 8 * MiB and small2["mmapped"] == 0

    applied, (big, small1, small2) = _allocations("keep")
    assert applied is True
    # keep: everything comes from the heap and stays there, free for the next step's tensors.
    assert big["mmapped"] == small1["mmapped"] == small2["mmapped"] == 0
    assert big["free_in_heap"] >= 48 * MiB

    applied, (big, small1, small2) = _allocations("release")
    assert applied is True
    # release: every large block is its own mapping and goes back to the OS, the threshold never adapts.
    assert big["mmapped"] >= 48 * MiB and small1["mmapped"] >= 8 * MiB and small2["mmapped"] >= 8 * MiB
    assert small2["free_in_heap"] < 8 * MiB


def test_cpu_allocator_rejects_unknown_modes():
    with pytest.raises(ValueError, match="runtime.cpu_allocator='fast' is not one of keep, system, release"):
        set_cpu_allocator("fast")


def test_measured_memory_is_positive_and_formatted():
    assert cpu_peak_rss_bytes() >= cpu_rss_bytes() > 10 * 2**20  # the interpreter and torch alone exceed 10 MiB
    assert peak_memory_bytes(torch.device("cpu")) == cpu_peak_rss_bytes()
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_bytes(5 * 2**40) == "5120.0 GiB"


def test_param_numel_counts_a_parameter_a_zero3_engine_partitioned_away():
    from slimtune.memory import param_numel
    from slimtune.methods.base import trainable_numel

    whole = torch.nn.Parameter(torch.zeros(3, 4))
    partitioned = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves in place, with the count beside it
    partitioned.ds_numel = 12
    assert param_numel(whole) == param_numel(partitioned) == 12
    model = torch.nn.Module()
    model.a, model.b = whole, partitioned
    assert trainable_numel(model) == 24
