"""strategy=deepspeed: ZeRO-2/3 under torchrun with two CPU processes (gloo, DeepSpeed's CPU accelerator), and the
bad inputs it answers with a clear message.

The first DeepSpeed run on a machine JIT-compiles DeepSpeed's small shared-memory communication op (~100 s on a
2-core CPU, cached in ~/.cache/torch_extensions afterwards); every later launch takes ~25 s, most of it importing.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune import cli
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.registry import STRATEGIES
from tests.conftest import TINY
from tests.e2e.test_ddp import assert_same_losses, records, torchrun

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install 'slimtune[deepspeed]')")


def strategy_for(*overrides: str, world_size: int = 2):
    """A DeepSpeed strategy for these config overrides, as rank 0 of `world_size` processes, without joining any."""
    strategy = STRATEGIES.get("deepspeed")(make_config(TrainConfig, overrides=["strategy=deepspeed", *overrides]))
    strategy.world_size, strategy.device = world_size, torch.device("cpu")
    return strategy


def zero_args(stage: int, folder: Path) -> list[str]:
    """strategy=deepspeed at `stage`. ZeRO-3 keeps parameters below 100k entries whole by default, which would be
    every parameter of a tiny model: a DeepSpeed JSON (passed through) makes it partition them all."""
    args = ["strategy=deepspeed", f"deepspeed.stage={stage}"]
    if stage == 3:
        path = folder / "zero3.json"
        path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        args.append(f"deepspeed.config={path}")
    return args


def gpt_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A GPT checkpoint's weights by name. Its head is tied to the embedding and stored once, under either name."""
    weights = load_file(folder / "model.safetensors")
    if "lm_head.weight" in weights:
        weights["transformer.wte.weight"] = weights.pop("lm_head.weight")
    return weights


# -- bad input (no processes started) ---------------------------------------------------------------------------


def test_missing_deepspeed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    strategy = STRATEGIES.get("deepspeed")(make_config(TrainConfig, overrides=["strategy=deepspeed"]))
    with pytest.raises(SlimtuneError, match=r"pip install 'slimtune\[deepspeed\]'"):
        strategy.setup(torch.device("cpu"))


@needs_deepspeed
def test_without_a_launcher_names_both_launchers(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    strategy = STRATEGIES.get("deepspeed")(make_config(TrainConfig, overrides=["strategy=deepspeed"]))
    with pytest.raises(SlimtuneError, match="torchrun --nproc_per_node=N .* deepspeed --num_gpus=N --no_local_rank"):
        strategy.setup(torch.device("cpu"))


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.stage=1"], "deepspeed.stage must be 2 or 3, got 1"),
    (["deepspeed.offload_params=true"], "deepspeed.offload_params=true needs deepspeed.stage=3"),
])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(SlimtuneError, match=message):
        make_config(TrainConfig, overrides=["strategy=deepspeed", *overrides])


def test_a_json_that_contradicts_slimtune_names_both_keys(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    strategy = strategy_for(f"deepspeed.config={path}", "batch_size=2")
    with pytest.raises(SlimtuneError, match=f"deepspeed.config {path} sets train_micro_batch_size_per_gpu=4 but "
                                            f"batch_size gives 2"):
        strategy._config(bf16=False)

    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(SlimtuneError, match="sets zero_optimization.stage=3 but deepspeed.stage gives 2"):
        strategy_for(f"deepspeed.config={path}")._config(bf16=False)

    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(SlimtuneError, match="slimtune builds the optimizer from optim.*: remove optimizer"):
        strategy_for(f"deepspeed.config={path}")


def test_a_json_fills_in_what_slimtune_leaves_out(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10,
                                "zero_optimization": {"reduce_bucket_size": 1000, "stage": 3}}))
    config = strategy_for(f"deepspeed.config={path}", "batch_size=2", "optim.grad_accum=3", "deepspeed.stage=3",
                          "deepspeed.offload_optimizer=true")._config(bf16=True)
    assert config["train_batch_size"] == 2 * 3 * 2 and config["gradient_accumulation_steps"] == 3
    assert config["steps_per_print"] == 10  # the file's, where slimtune only has a default
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000,
                                           "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "none"}}
    assert config["bf16"] == {"enabled": True}


def test_a_method_it_cannot_run_is_refused_with_what_to_use():
    from slimtune.methods.full import Full

    strategy = strategy_for()
    quantized = torch.nn.Linear(2, 2)
    quantized.register_parameter("packed", torch.nn.Parameter(torch.zeros(2, dtype=torch.uint8), requires_grad=False))
    with pytest.raises(SlimtuneError, match="method=full cannot run under strategy=deepspeed: .*quantized.*"
                                            "method=qlora under strategy=fsdp"):
        strategy.check(Full(strategy.cfg), quantized)


def test_a_block_schedule_handed_to_an_engine_keeps_no_state_and_switches_requires_grad():
    from slimtune.methods.badam import BlockOptimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    named = list(model.named_parameters())
    optimizer = BlockOptimizer(torch.optim.AdamW(model.parameters()), named, block_prefix_list=[["0."], ["1."]],
                               switch_block_every=2, switch_mode="ascending", verbose=0)
    optimizer.hand_updates_to_engine()  # no fp32 masters or gradient hooks: the engine keeps its own
    assert optimizer.optimizer_state_bytes() == 0 and optimizer.analytic_state_bytes() == 20 * 16
    assert [p.requires_grad for _, p in named] == [True, True, False, False]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(model[0].weight), id(model[0].bias)}
    optimizer.count_step()
    assert [p.requires_grad for _, p in named] == [True, True, False, False]
    optimizer.count_step()  # the second step of block 0: block 1 trains next
    assert [p.requires_grad for _, p in named] == [False, False, True, True]
    assert optimizer.optimizer_state_bytes() == 0


def test_memory_per_device_follows_zero_and_the_badam_rule():
    from slimtune.plan.estimate import ModelSpec, badam_state
    from slimtune.plan.settings import RunSettings

    spec = ModelSpec.preset("llama-3-8b")
    run = RunSettings(world_size=4)
    plan = badam_state(spec, "bf16")
    active = plan.parts["gradients"] // 4  # the active block's fp32 gradient: 4 bytes per parameter
    zero3 = strategy_for("deepspeed.stage=3", world_size=4).estimate_memory(plan, spec, run)
    states = sum(zero3.parts[k] for k in ("weights", "gradients", "optimizer"))
    assert states == pytest.approx((2 * spec.n_params + 16 * active) / 4, rel=1e-6)  # (2M + 16M/D)/N
    zero2 = strategy_for("deepspeed.stage=2", world_size=4).estimate_memory(plan, spec, run)
    assert zero2.parts["weights"] == plan.parts["weights"] and zero2.parts["optimizer"] < plan.parts["optimizer"]
    offload = strategy_for("deepspeed.stage=3", "deepspeed.offload_params=true", world_size=4)
    assert offload.estimate_memory(plan, spec, run).parts["weights"] == 0


# -- two processes ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_full_equals_one_process_and_resumes_exactly(stage, char_data, tmp_path):
    common = [f"data={char_data}", *TINY, "max_iters=4", "eval.interval=2", "log.interval=1", "runtime.threads=1",
              "runtime.precision=fp32", "optim.grad_accum=2"]
    out = tmp_path / "ds"
    log = torchrun(*common, f"out_dir={out}", "batch_size=2", *zero_args(stage, tmp_path))
    assert cli.main(["train", *common, f"out_dir={tmp_path / 'one'}", "batch_size=4", "strategy=single"]) == 0
    assert f"DeepSpeed ZeRO-{stage}" in log

    a, b = records(out, "train"), records(tmp_path / "one", "train")
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    for x, y in zip(a, b):  # 2 ranks x 2 sequences x 2 micro-batches: the same 8 rows per step
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5, rel=0)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], abs=1e-5, rel=0)
    # The ordinary model rank 0 writes beside DeepSpeed's shards is the one-process run's, and loads in one process.
    ours, theirs = gpt_weights(out / "step-000004"), gpt_weights(tmp_path / "one" / "step-000004")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0)
    shards = sorted(p.name for p in (out / "step-000004" / "deepspeed" / "zero").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert cli.main(["sample", str(out / "step-000004"), "--num-samples", "1", "--max-new-tokens", "4"]) == 0

    # Resume from step 2: the same losses, bit for bit, and the same final weights.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("step-000004"))
    torchrun(*common, f"out_dir={resumed}", "batch_size=2", *zero_args(stage, tmp_path))
    assert [r["loss"] for r in records(resumed, "train")] == [r["loss"] for r in a]
    again = gpt_weights(resumed / "step-000004")
    assert all(torch.equal(again[name], ours[name]) for name in ours)


@pytest.mark.slow
@needs_deepspeed
def test_badam_under_zero3_trains_only_the_active_block_and_resumes_exactly(llama_dir, chat_file, tmp_path):
    # Two validation records: rank 0 evaluates both, rank 1 none, right after the engine was rebuilt for a new block.
    val = tmp_path / "val.jsonl"
    val.write_text("".join(chat_file.read_text().splitlines(keepends=True)[:2]))
    common = [f"model={llama_dir}", f"data={chat_file}", f"dataset.val_data={val}", "method=badam",
              "badam.switch_every=2", "badam.switch_mode=ascending", "max_iters=4", "eval.interval=2", "eval.iters=1",
              "log.interval=1", "log.progress=false", "log.plot=false", "optim.warmup_iters=0", "runtime.threads=1",
              "runtime.precision=fp32", "dataset.max_seq_len=64", "batch_size=2", "hf.weights_dtype=bf16",
              *zero_args(3, tmp_path)]
    out = tmp_path / "ds"
    log = torchrun(*common, f"out_dir={out}")
    assert "BAdam trains block model.layers.0." in log and "BAdam trains block model.layers.1." in log
    assert [r["step"] for r in records(out, "eval")] == [2, 4]

    start = {k: v.to(torch.bfloat16) for k, v in load_file(llama_dir / "model.safetensors").items()}  # as loaded
    step2, step4 = (load_file(out / f"step-00000{n}" / "model.safetensors") for n in (2, 4))

    def changed(before, after):
        return {name for name in after if not torch.equal(before[name], after[name])}

    def block(layer):
        return {n for n in step2 if n.startswith(f"model.layers.{layer}.")}

    def matrices(layer):  # every weight matrix moves; a norm weight of 1.0 may move less than bf16 can show
        return {n for n in block(layer) if step2[n].dim() == 2}

    assert matrices(0) <= changed(start, step2) <= block(0)  # steps 1-2: block 0 only
    assert matrices(1) <= changed(step2, step4) <= block(1)  # steps 3-4: block 1 only

    # DeepSpeed's optimizer state (and fp32 masters) hold the active block only, partitioned; the schedule resumes.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("step-000004"))
    torchrun(*common, f"out_dir={resumed}")
    assert [r["loss"] for r in records(resumed, "train")] == [r["loss"] for r in records(out, "train")]
    again = load_file(resumed / "step-000004" / "model.safetensors")
    assert all(torch.equal(again[name], step4[name]) for name in step4)


@pytest.mark.slow
@needs_deepspeed
def test_lora_under_zero3_equals_one_process(llama_dir, chat_file, tmp_path):
    common = [f"model={llama_dir}", f"data={chat_file}", "method=lora", "max_iters=3", "eval.interval=3",
              "eval.iters=1", "log.interval=1", "log.progress=false", "log.plot=false", "optim.warmup_iters=0",
              "runtime.threads=1", "runtime.precision=fp32", "dataset.max_seq_len=64"]
    torchrun(*common, f"out_dir={tmp_path / 'ds'}", "batch_size=2", *zero_args(3, tmp_path))
    assert cli.main(["train", *common, f"out_dir={tmp_path / 'one'}", "batch_size=4", "strategy=single",
                     "eval.iters=2"]) == 0
    assert_same_losses(tmp_path / "ds", tmp_path / "one", 3)
    assert len(records(tmp_path / "ds", "eval")) == 1
    ours = load_file(tmp_path / "ds" / "step-000003" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "one" / "step-000003" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0)
