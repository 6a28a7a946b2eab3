"""Every training run plans its memory: the plan record before step 1, the measured peak beside it at the end, the
refusal before loading a model that cannot fit, and predicted vs measured peaks on tiny GPTs (CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.methods.base import Method
from slimtune.models.gpt import GPT, GPTConfig
from slimtune.plan import run as plan_run
from slimtune.plan.estimate import ModelSpec, Plan
from slimtune.registry import METHODS
from slimtune.train.loop import train
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.15


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_cfg(char_data, out, *extra):
    return make_config(TrainConfig, overrides=[f"data={char_data}", f"out_dir={out}", *TINY, "max_iters=2",
                                               "eval.interval=0", "runtime.threads=1", "optim.warmup_iters=1",
                                               *extra])


# ----------------------------------------------------------------------------------------------------------------
# Shapes of live models
# ----------------------------------------------------------------------------------------------------------------


def test_spec_from_live_models():
    from tests.tiny_hf import tiny_llama, tiny_tokenizer

    gpt = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=3, n_head=4, n_embd=64, bias=True))
    assert plan_run.spec_from_model(gpt).n_params == sum(p.numel() for p in gpt.parameters())
    llama = tiny_llama(tiny_tokenizer())
    spec = plan_run.spec_from_model(llama)
    assert spec.n_params == sum(p.numel() for p in llama.parameters()) and spec.tied_embeddings
    with pytest.raises(plan_run.NoEstimate, match="Linear"):
        plan_run.spec_from_model(torch.nn.Linear(2, 2))


def test_peak_record_compares_like_with_like():
    """CUDA's allocator peak has no CUDA context in it; CPU's resident peak has the whole process."""
    plan = Plan.of(weights=600, activations=300, baseline=100)
    cuda = plan_run.RunPlan(plan, torch.device("cuda")).peak_event([900])
    assert cuda["predicted_peak_bytes"] == 900 and cuda["ratio"] == 1.0
    cpu = plan_run.RunPlan(plan, torch.device("cpu")).peak_event([1100])
    assert cpu["predicted_peak_bytes"] == 1000 and cpu["ratio"] == pytest.approx(1.1)
    none = plan_run.RunPlan(None, torch.device("cpu"), reason="why").peak_event([5])
    assert none["ratio"] is None and none["measured_peak_bytes"] == 5
    ranks = plan_run.RunPlan(plan, torch.device("cuda")).peak_event([700, 950])
    assert ranks["measured_peak_bytes"] == 950 and ranks["per_rank_peak_bytes"] == [700, 950]
    assert "largest of 2 ranks: rank 1" in ranks["message"] and "smallest 700 B, rank 0" in ranks["message"]


# ----------------------------------------------------------------------------------------------------------------
# The run's records
# ----------------------------------------------------------------------------------------------------------------


def test_run_logs_plan_then_peak(char_data, tmp_path, capsys):
    train(tiny_cfg(char_data, tmp_path / "out", "strategy=single"))
    recs = records(tmp_path / "out")
    kinds = [r["kind"] for r in recs]
    assert kinds.index("plan") < kinds.index("train") < kinds.index("peak")
    plan = next(r for r in recs if r["kind"] == "plan")
    assert plan["predicted_peak_bytes"] == sum(plan["parts"].values()) > 0
    assert plan["settings"]["batch"] == 4 and plan["settings"]["seq"] == 32 and plan["settings"]["device"] == "cpu"
    peak = next(r for r in recs if r["kind"] == "peak")
    assert peak["predicted_peak_bytes"] == plan["predicted_peak_bytes"]
    assert peak["ratio"] == pytest.approx(peak["measured_peak_bytes"] / peak["predicted_peak_bytes"])
    out = capsys.readouterr().out
    assert "memory plan: peak" in out and "measured/predicted" in out
    assert (plan["step"], peak["step"]) == (0, 2)


def test_a_resumed_run_logs_its_own_plan_and_peak_at_its_steps(char_data, tmp_path):
    """Each process plans and measures; a resume drops the records the dead run wrote after its checkpoint."""
    out = tmp_path / "out"
    train(tiny_cfg(char_data, out, "strategy=single", "max_iters=4", "ckpt.interval=2", "ckpt.keep_last=0"))
    shutil.rmtree(out / "step-000004")  # as if the run had died after the step-2 checkpoint (its peak record says step 4)
    train(tiny_cfg(char_data, out, "strategy=single", "max_iters=4", "ckpt.interval=2", "ckpt.keep_last=0"))
    steps = [(r["kind"], r["step"]) for r in records(out) if r["kind"] in ("plan", "peak")]
    assert steps == [("plan", 0), ("plan", 2), ("peak", 4)]


class NoPlan(Method):
    """A plug-in method without estimate_memory: the run still trains, and says it has no plan."""


def test_method_without_estimate_trains_without_plan(char_data, tmp_path):
    METHODS.register("no_plan_run")(NoPlan)
    try:
        train(tiny_cfg(char_data, tmp_path / "out", "method=no_plan_run", "strategy=single"))
    finally:
        METHODS.unregister("no_plan_run")
    plan = next(r for r in records(tmp_path / "out") if r["kind"] == "plan")
    assert plan["predicted_peak_bytes"] is None and "no memory estimate" in plan["reason"]


def test_refuses_before_loading_what_cannot_fit(char_data, tmp_path):
    """A 175B-parameter GPT is refused in a moment, before a single weight is allocated."""
    cfg = tiny_cfg(char_data, tmp_path / "out", "gpt.n_layer=96", "gpt.n_head=96", "gpt.n_embd=12288")
    with pytest.raises(SlimtuneError, match="(?s)predicted to need .* runtime.check_fit=false"):
        train(cfg)
    assert not list((tmp_path / "out").glob("step-*"))


def test_check_fit_false_starts_anyway(char_data, tmp_path, monkeypatch):
    monkeypatch.setattr(plan_run, "device_memory_bytes", lambda device: 1024)
    with pytest.raises(SlimtuneError, match="predicted to need"):
        train(tiny_cfg(char_data, tmp_path / "a", "strategy=single"))
    result = train(tiny_cfg(char_data, tmp_path / "b", "strategy=single", "runtime.check_fit=false"))
    assert result.step == 2


# ----------------------------------------------------------------------------------------------------------------
# Predicted vs measured, each run in a fresh process
# ----------------------------------------------------------------------------------------------------------------

SHAPES = [  # (method, n_layer, n_head, n_embd, block_size, batch): activations-, state- and balanced-heavy
    ("full", 4, 4, 256, 256, 8),
    ("full", 2, 8, 1024, 64, 4),
    ("badam", 4, 4, 256, 256, 8),
    ("full", 6, 6, 384, 128, 8),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,n_layer,n_head,n_embd,block_size,batch", SHAPES)
def test_predicted_peak_within_15_percent_on_cpu(char_data, tmp_path, method, n_layer, n_head, n_embd, block_size,
                                                 batch):
    """`slimtune train` in its own process (a fresh high-water mark): the run's own peak record says how its
    measured peak resident memory compares with the plan it logged before step 1."""
    out = tmp_path / "out"
    overrides = [f"data={char_data}", f"out_dir={out}", f"method={method}", f"gpt.n_layer={n_layer}",
                 f"gpt.n_head={n_head}", f"gpt.n_embd={n_embd}", f"gpt.block_size={block_size}",
                 f"batch_size={batch}", "max_iters=2", "eval.interval=0", "log.progress=false", "log.plot=false",
                 "optim.warmup_iters=1", "strategy=single", "runtime.threads=2"]
    if method == "badam":
        overrides.append("badam.switch_mode=ascending")  # block 0 first: backward through every layer
    proc = subprocess.run([sys.executable, "-m", "slimtune", "train", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = next(r for r in records(out) if r["kind"] == "peak")
    plan = next(r for r in records(out) if r["kind"] == "plan")
    model_bytes = plan["predicted_peak_bytes"] - plan["parts"]["baseline"]
    assert model_bytes > 0.25 * plan["predicted_peak_bytes"], "the shape should weigh against the baseline"
    print(f"{method} {n_layer}x{n_embd} block {block_size} batch {batch}: measured/predicted {peak['ratio']:.3f}")
    assert abs(peak["ratio"] - 1) <= TOLERANCE, (
        f"measured {peak['measured_peak_bytes'] / 2**20:.0f} MiB vs predicted "
        f"{peak['predicted_peak_bytes'] / 2**20:.0f} MiB ({plan['parts']})")


def test_cli_spec_matches_a_run_of_the_same_gpt(char_data, tmp_path):
    """The spec a run derives before loading (config + data) is the live model's."""
    cfg = tiny_cfg(char_data, tmp_path / "out")
    from slimtune.train.workloads import build_workload

    workload = build_workload(cfg, 0, 1, torch.device("cpu"))
    before = plan_run.spec_before_loading(cfg, workload.model_spec())
    g = cfg.gpt
    model = GPT(GPTConfig(vocab_size=workload.model_spec()["vocab_size"], n_layer=g.n_layer, n_head=g.n_head,
                          n_embd=g.n_embd, block_size=g.block_size, bias=g.bias, dropout=g.dropout))
    assert before == plan_run.spec_from_model(model)
    assert isinstance(before, ModelSpec)
