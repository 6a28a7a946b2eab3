"""precision=auto on CPUs: bf16 only with bf16 instructions AND a measured speed-up; cached per CPU model."""

import json

import pytest
import torch

from slimtune import hardware
from slimtune.hardware import bf16_speedup, cpu_flags, cpu_model_name, native_bf16, resolve_precision

CPU = torch.device("cpu")

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """A CPU whose flags, model name and matmul timings the test sets; a fresh cache folder; counts measurements."""
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    cpu = {"flags": frozenset({"avx2"}), "name": "Test CPU", "seconds": {torch.float32: 1.0, torch.bfloat16: 1.0},
           "measured": []}
    monkeypatch.setattr(hardware, "cpu_flags", lambda: cpu["flags"])
    monkeypatch.setattr(hardware, "cpu_model_name", lambda: cpu["name"])

    def fake_seconds(dtype, size, *args, **kwargs):
        cpu["measured"].append(dtype)
        return cpu["seconds"][dtype]

    monkeypatch.setattr(hardware, "_matmul_seconds", fake_seconds)
    return cpu


def test_cpu_flags_and_model_name_come_from_cpuinfo(monkeypatch, tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "cpuinfo")
    assert {"avx2", "avx512_bf16", "amx_bf16"} <= cpu_flags()
    assert cpu_model_name() == "Intel(R) Xeon(R) Platinum 8480+"
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")  # macOS, Windows: no /proc/cpuinfo
    assert cpu_flags() == frozenset()
    assert cpu_model_name()  # whatever the platform module says, never empty


def test_no_bf16_instructions_means_fp32_without_measuring(fake_cpu):
    fake_cpu["seconds"][torch.bfloat16] = 0.1  # even a (fake) fast timing must not matter without the instructions
    assert bf16_speedup(CPU) is None
    assert native_bf16(CPU) is False
    assert resolve_precision("auto", CPU) == torch.float32
    assert fake_cpu["measured"] == []


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
@pytest.mark.parametrize("bf16_seconds,native", [(0.5, True), (0.75, True), (0.8, False), (2.0, False)])
def test_bf16_instructions_decide_by_measured_speedup(fake_cpu, flag, bf16_seconds, native):
    fake_cpu["flags"] = frozenset({"avx2", flag})
    fake_cpu["seconds"][torch.bfloat16] = bf16_seconds
    assert bf16_speedup(CPU) == pytest.approx(1.0 / bf16_seconds)
    assert native_bf16(CPU) is native
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if native else torch.float32)
    assert resolve_precision("fp32", CPU) == torch.float32  # an explicit choice is never overruled


def test_speedup_is_cached_per_cpu_model(fake_cpu, tmp_path):
    fake_cpu["flags"] = frozenset({"amx_bf16"})
    fake_cpu["seconds"][torch.bfloat16] = 0.25
    assert bf16_speedup(CPU) == pytest.approx(4.0)
    assert sorted(map(str, fake_cpu["measured"])) == ["torch.bfloat16", "torch.float32"]
    cache = tmp_path / "cache" / "bf16_speedup.json"
    assert list(json.loads(cache.read_text()).values()) == [pytest.approx(4.0)]

    fake_cpu["measured"].clear()
    fake_cpu["seconds"][torch.bfloat16] = 10.0  # a re-measurement would now say "slow"
    assert bf16_speedup(CPU) == pytest.approx(4.0) and native_bf16(CPU)
    assert fake_cpu["measured"] == []  # answered from the cache

    fake_cpu["name"] = "Another CPU"  # another model is measured on its own
    assert bf16_speedup(CPU) == pytest.approx(0.1) and not native_bf16(CPU)
    assert len(json.loads(cache.read_text())) == 2
    assert bf16_speedup(CPU, use_cache=False) == pytest.approx(0.1)


def test_gpu_and_mps_keep_their_own_answer(monkeypatch, fake_cpu):
    fake_cpu["flags"] = frozenset({"amx_bf16"})
    assert native_bf16(torch.device("mps")) is True
    assert bf16_speedup(torch.device("mps")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert native_bf16(torch.device("cuda")) is False
    assert bf16_speedup(torch.device("cuda")) is None
    assert fake_cpu["measured"] == []


def test_real_measurement_leaves_the_global_rng_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(hardware, "BF16_PROBE_SIZE", 32)  # small: this host may emulate bf16
    torch.manual_seed(123)
    state = torch.get_rng_state()
    speedup = bf16_speedup(CPU)
    assert speedup is not None and speedup > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert (tmp_path / "bf16_speedup.json").is_file()
