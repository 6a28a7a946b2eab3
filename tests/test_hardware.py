"""precision=auto on CPUs: bf16 only with bf16 instructions AND a measured speed-up; cached per CPU class."""

import json

import pytest
import torch

from slimtune import hardware, host
from slimtune.errors import SlimtuneError
from slimtune.hardware import BF16_SPEEDUP_ENV, bf16_speedup, native_bf16, resolve_precision
from slimtune.host import cpu_flags, cpu_identity, cpu_model_name

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
    monkeypatch.delenv(BF16_SPEEDUP_ENV, raising=False)  # the suite pins precision=auto; these tests test the probe
    cpu = {"flags": frozenset({"avx2"}), "name": "Test CPU", "seconds": {torch.float32: 1.0, torch.bfloat16: 1.0},
           "measured": []}
    monkeypatch.setattr(hardware, "cpu_flags", lambda: cpu["flags"])
    monkeypatch.setattr(hardware, "cpu_identity", lambda: f"{cpu['name']}|isa={','.join(sorted(cpu['flags']))}")

    def fake_seconds(dtype, size, *args, **kwargs):
        cpu["measured"].append(dtype)
        return cpu["seconds"][dtype]

    monkeypatch.setattr(hardware, "_matmul_seconds", fake_seconds)
    return cpu


def test_cpu_flags_and_model_name_come_from_cpuinfo(monkeypatch, tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    monkeypatch.setattr(host, "CPUINFO", tmp_path / "cpuinfo")
    assert {"avx2", "avx512_bf16", "amx_bf16"} <= cpu_flags()
    assert cpu_model_name() == "Intel(R) Xeon(R) Platinum 8480+"
    monkeypatch.setattr(host, "CPUINFO", tmp_path / "missing")  # macOS, Windows: no /proc/cpuinfo
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


def test_speedup_is_cached_per_cpu_class(fake_cpu, tmp_path):
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

    fake_cpu["name"] = "Another CPU"  # another class is measured on its own
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
    monkeypatch.delenv(BF16_SPEEDUP_ENV, raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(hardware, "BF16_PROBE_SIZE", 32)  # small: this host may emulate bf16
    torch.manual_seed(123)
    state = torch.get_rng_state()
    speedup = bf16_speedup(CPU)
    assert speedup is not None and speedup > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert (tmp_path / "bf16_speedup.json").is_file()


ZEN = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: {model}
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 fma {extra}
"""


def test_cpu_identity_tells_apart_cpus_that_share_a_model_name(monkeypatch, tmp_path):
    """Zen 3 and Zen 4 both call themselves "AMD EPYC": a cache keyed by that name would carry Zen 3's "no bf16"
    verdict onto a Zen 4 (or the reverse) when a home folder outlives a host move."""
    identities = []
    for model, extra in [(1, ""), (17, "avx512f avx512bw avx512_vnni avx512_bf16")]:
        (tmp_path / "cpuinfo").write_text(ZEN.format(model=model, extra=extra))
        monkeypatch.setattr(host, "CPUINFO", tmp_path / "cpuinfo")
        identities.append(cpu_identity())
    zen3, zen4 = identities
    assert zen3 != zen4
    assert zen3.startswith("AuthenticAMD AMD EPYC|family=25|model=1|isa=avx2,fma|aten=")
    assert "|model=17|isa=avx2,avx512_bf16,avx512_vnni,avx512bw,avx512f,fma|" in zen4
    assert zen3.endswith(f"aten={torch.backends.cpu.get_cpu_capability()}")  # ATEN_CPU_CAPABILITY imitation apart
    assert host.cpu_class() == "AMD EPYC (family 25 model 17; AVX-512, AVX-512 BF16, VNNI)"  # benchmarks print it
    (tmp_path / "cpuinfo").write_text(ZEN.format(model=1, extra=""))
    assert host.cpu_class() == "AMD EPYC (family 25 model 1; AVX2)"


@pytest.mark.parametrize("flags", [frozenset({"avx2"}), frozenset({"avx2", "amx_bf16"})], ids=["no-bf16", "amx"])
def test_environment_forces_either_branch_of_auto_on_any_cpu(fake_cpu, monkeypatch, flags):
    fake_cpu["flags"] = flags
    fake_cpu["seconds"][torch.bfloat16] = 0.25  # what a measurement would say, were one taken
    monkeypatch.setenv(BF16_SPEEDUP_ENV, "2")
    assert bf16_speedup(CPU) == 2.0 and resolve_precision("auto", CPU) == torch.bfloat16
    monkeypatch.setenv(BF16_SPEEDUP_ENV, "1")
    assert bf16_speedup(CPU) == 1.0 and resolve_precision("auto", CPU) == torch.float32
    assert resolve_precision("bf16", CPU) == torch.bfloat16  # explicit choices are never overruled
    assert fake_cpu["measured"] == []  # nothing timed, nothing cached
    assert bf16_speedup(torch.device("mps")) is None  # a GPU's own answer stays its own
    for bad in ["fast", "0", "-1", "nan"]:
        monkeypatch.setenv(BF16_SPEEDUP_ENV, bad)
        with pytest.raises(SlimtuneError, match=rf"SLIMTUNE_BF16_SPEEDUP='{bad}' is not a positive number"):
            resolve_precision("auto", CPU)


def test_the_run_says_what_auto_chose_and_what_it_costs(fake_cpu, monkeypatch):
    from slimtune.hardware import describe_precision

    assert describe_precision("auto", CPU, torch.float32) == (
        "fp32 (runtime.precision=auto: this CPU has no bf16 instructions)")
    fake_cpu["flags"] = frozenset({"avx512_bf16"})
    fake_cpu["seconds"][torch.bfloat16] = 0.8
    assert describe_precision("auto", CPU, torch.float32) == (
        "fp32 (runtime.precision=auto: a bf16 matmul runs only 1.25x fp32's here)")
    monkeypatch.setenv(BF16_SPEEDUP_ENV, "2.37")
    said = describe_precision("auto", CPU, torch.bfloat16)
    assert said.startswith("bf16 autocast (runtime.precision=auto: a bf16 matmul runs 2.37x fp32's here, "
                           "SLIMTUNE_BF16_SPEEDUP set; ")
    assert said.endswith("runtime.precision=fp32 for the lower peak)")
    assert describe_precision("fp32", CPU, torch.float32) == "fp32 (runtime.precision=fp32)"
    assert describe_precision("bf16", CPU, torch.bfloat16) == "bf16 autocast (runtime.precision=bf16)"
