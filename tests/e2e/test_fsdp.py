"""strategy=fsdp (FSDP2) under torchrun with two CPU processes (gloo), and BAdam under FSDP2 and DDP: the same losses
as one process on the whole batch, checkpoints that load as one ordinary model, resume with another world size,
and the refusals."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from slimtune import cli
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.methods import create
from slimtune.parallel.fsdp import FSDP, block_list
from tests.e2e.test_ddp import assert_same_losses, records, torchrun, write_ragged_chats
from tests.tiny_hf import one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> tuple[Path, Path]:
    """Ragged chat records (few and many response tokens), and a validation set of ONE batch: rank 1 evaluates
    nothing, and under FSDP2 every forward is collective, so evaluation must not depend on equal batch counts."""
    return write_ragged_chats(tmp_path_factory.mktemp("chat"))


def common(llama_dir, chat, steps: int) -> list[str]:
    train, val = chat
    return [f"model={llama_dir}", f"data={train}", f"dataset.val_data={val}", f"max_iters={steps}",
            "eval.interval=2", "eval.iters=1", "log.interval=1", "log.progress=false", "log.plot=false",
            "optim.warmup_iters=0", f"optim.lr_decay_iters={steps}", "runtime.threads=1", "dataset.max_seq_len=64",
            "runtime.precision=fp32"]


@pytest.mark.slow
def test_full_fsdp_equals_one_process_and_saves_one_ordinary_model(llama_dir, chat, tmp_path):
    """Two micro-batches per step (only the last reduce-scatters), one ordinary model in every checkpoint, and a
    resume with one process from the two processes' sharded optimizer state."""
    args = [*common(llama_dir, chat, 4), "method=full", "optim.grad_accum=2"]
    log = torchrun(*args, f"out_dir={tmp_path / 'fsdp'}", "batch_size=1", "strategy=fsdp")
    assert cli.main(["train", *args, f"out_dir={tmp_path / 'one'}", "batch_size=2", "strategy=single",
                     "eval.iters=2"]) == 0
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    assert_same_losses(fsdp, one, 4)
    assert "strategy fsdp: 2 process(es), FSDP2 over 2 blocks + root" in log
    (peak,) = records(fsdp, "peak")
    assert len(peak["per_rank_peak_bytes"]) == 2 and "largest of 2 ranks" in log

    # The checkpoint is one ordinary model (the tied head stored once) that transformers loads in one process...
    ckpt = fsdp / "step-000004"
    assert {p.name for p in (ckpt / "optimizer").iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    reference = load_file(one / "step-000004" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in reference:
            torch.testing.assert_close(tensor, reference[name], atol=1e-5, rtol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    # ... and one process resumes the sharded optimizer state written by two (torch.distributed.checkpoint reshards).
    log = torchrun(*common(llama_dir, chat, 6), "method=full", "optim.grad_accum=2", "batch_size=2",
                   "strategy=fsdp", f"out_dir={tmp_path / 'resumed'}", f"resume={fsdp / 'step-000002'}", nproc=1)
    assert "resumed from" in log and "resuming with 1" in log
    assert [r["step"] for r in records(tmp_path / "resumed", "train")] == [3, 4, 5, 6]


@pytest.mark.slow
def test_lora_fsdp_equals_one_process(llama_dir, chat, tmp_path):
    args = [*common(llama_dir, chat, 3), "method=lora"]
    torchrun(*args, f"out_dir={tmp_path / 'fsdp'}", "batch_size=2", "strategy=fsdp")
    assert cli.main(["train", *args, f"out_dir={tmp_path / 'one'}", "batch_size=4", "strategy=single",
                     "eval.iters=2"]) == 0
    assert_same_losses(tmp_path / "fsdp", tmp_path / "one", 3)
    a = load_file(tmp_path / "fsdp" / "step-000003" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "step-000003" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


@pytest.mark.slow
def test_qlora_torchao_nf4_shards_under_fsdp_and_equals_one_process(chat, tmp_path):
    """NF4 base weights (torchao) split over the ranks; 256 wide, so that 2 divides every weight's scales."""
    pytest.importorskip("torchao")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_hf import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    wide = tmp_path / "wide-llama"
    LlamaForCausalLM(config).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    args = [*common(wide, chat, 2), "method=qlora", "qlora.backend=torchao", "qlora.compute_dtype=fp32"]
    log = torchrun(*args, f"out_dir={tmp_path / 'fsdp'}", "batch_size=2", "strategy=fsdp")
    assert cli.main(["train", *args, f"out_dir={tmp_path / 'one'}", "batch_size=4", "strategy=single",
                     "eval.iters=2"]) == 0
    assert_same_losses(tmp_path / "fsdp", tmp_path / "one", 2)
    assert "torchao nf4" in log


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


@pytest.mark.slow
def test_badam_under_fsdp_and_ddp_trains_the_active_block_and_resumes_exactly(llama_dir, chat, tmp_path):
    """Blocks switch every 2 steps, layer 0 then layer 1: between checkpoints only the active layer changes. Under
    FSDP2 the optimizer follows the switch (its state sharded like the block); under DDP the model is wrapped again
    after each switch. Both give one process's losses, and an FSDP2 run resumed mid-block (from step 3: block order,
    generator, step in block and the block's sharded moments come from optimizer.pt) repeats the uninterrupted one
    exactly."""
    args = [*common(llama_dir, chat, 4), "method=badam", "badam.switch_every=2", "badam.switch_mode=ascending",
            "ckpt.interval=3", "ckpt.keep_last=3"]
    torchrun(*args, f"out_dir={tmp_path / 'fsdp'}", "batch_size=2", "strategy=fsdp")
    assert cli.main(["train", *args, f"out_dir={tmp_path / 'one'}", "batch_size=4", "strategy=single",
                     "eval.iters=2"]) == 0
    assert_same_losses(tmp_path / "fsdp", tmp_path / "one", 4)
    switches = [r["block"] for r in records(tmp_path / "fsdp", "switch")]
    assert switches == ["model.layers.0.", "model.layers.1.", "model.layers.0."]

    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    step2, step4 = weights(tmp_path / "fsdp" / "step-000002"), weights(tmp_path / "fsdp" / "step-000004")
    for name, before in initial.items():
        if name not in step2:
            continue  # the tied head, stored once
        layer0, layer1 = name.startswith("model.layers.0."), name.startswith("model.layers.1.")
        assert torch.equal(step2[name], before) != layer0, name  # steps 1-2: only layer 0 trains
        assert torch.equal(step4[name], step2[name]) != layer1, name  # steps 3-4: only layer 1 trains

    resumed = tmp_path / "resumed"
    torchrun(*args, f"out_dir={resumed}", "batch_size=2", "strategy=fsdp",
             f"resume={tmp_path / 'fsdp' / 'step-000003'}")
    x, y = records(tmp_path / "fsdp", "train")[3:], records(resumed, "train")
    assert [r["step"] for r in y] == [4] and [r["loss"] for r in x] == [r["loss"] for r in y]
    assert torch.equal(weights(resumed / "step-000004")["model.layers.1.mlp.up_proj.weight"],
                       step4["model.layers.1.mlp.up_proj.weight"])

    log = torchrun(*args, f"out_dir={tmp_path / 'ddp'}", "batch_size=2", "strategy=ddp")
    assert_same_losses(tmp_path / "ddp", tmp_path / "one", 4)
    assert "step 2: BAdam trains block model.layers.1." in log


# ---------------------------------------------------------------------------------------------------------------
# Refusals and pieces, in one process
# ---------------------------------------------------------------------------------------------------------------


def strategy_for(*overrides: str, world_size: int = 2) -> FSDP:
    cfg = make_config(TrainConfig, overrides=["strategy=fsdp", *overrides])
    strategy = FSDP(cfg)
    strategy.device, strategy.world_size = torch.device("cpu"), world_size
    return strategy


def test_strategy_fsdp_without_torchrun_names_the_launch_command(tiny_args, capsys, monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert cli.main(["train", *tiny_args, "strategy=fsdp"]) == 2
    assert "strategy=fsdp needs torchrun: torchrun --nproc_per_node=N -m slimtune train" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,model,message", [
    (["optim.name=adamw8bit"], nn.Linear(2, 2), "optim.name=adamw8bit cannot run under strategy=fsdp"),
    (["fsdp.offload=true"], nn.Linear(2, 2), "fsdp.offload=true moves state"),
])
def test_refusals_name_the_key_and_what_to_use(overrides, model, message):
    strategy = strategy_for(*overrides)
    with pytest.raises(SlimtuneError, match=message):
        strategy.check(create(strategy.cfg), model)


def test_bitsandbytes_4bit_weights_are_refused_with_the_alternatives():
    model = nn.Linear(2, 2)
    model.weight.quant_state = object()  # what bitsandbytes' Params4bit carries
    strategy = strategy_for()
    with pytest.raises(SlimtuneError, match="qlora.backend=torchao") as info:
        strategy.check(create(strategy.cfg), model)
    assert "method=qlora cannot" not in str(info.value) and "bitsandbytes 4-bit" in str(info.value)


def test_nf4_weights_that_do_not_split_evenly_are_refused():
    pytest.importorskip("torchao")
    from slimtune.methods.lora import nf4_linears

    model = nf4_linears(nn.Sequential(nn.Linear(32, 32)), torch.float32)  # 1 024 weights: one scale-of-scales
    with pytest.raises(SlimtuneError, match="cannot be sharded over 2 processes"):
        strategy_for().check(create(strategy_for().cfg), model)


def test_block_list_is_the_largest_stack_of_one_block_class(llama_dir):
    from transformers import AutoModelForCausalLM

    from slimtune.models.gpt import GPT, GPTConfig

    llama = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert block_list(llama) is llama.model.layers
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50))
    assert block_list(gpt) is gpt.transformer.h
    assert block_list(nn.Sequential(nn.Linear(2, 2))) is None


def test_planner_shards_states_and_gathers_one_block(capsys):
    """`slimtune estimate --strategy fsdp` is the registered strategy's own estimate: weights, gradients and
    optimizer state 1/N per device, plus the gathered root unit and one block."""
    import argparse

    from slimtune.plan import cli as plan_cli

    def per_device(*argv: str) -> dict:
        parser = argparse.ArgumentParser(prog="slimtune")
        plan_cli.add_parser(parser.add_subparsers(dest="verb"))
        assert plan_cli.run(parser.parse_args(["estimate", "--preset", "llama-2-7b", *argv, "--json"])) == 0
        return json.loads(capsys.readouterr().out)["per_device"][0]["parts"]

    one, four = per_device("--method", "full"), per_device("--method", "full", "--devices", "4", "--strategy", "fsdp")
    for part in ("weights", "gradients", "optimizer"):
        assert four[part] == -(-one[part] // 4)
    assert four["temporary"] > one["temporary"]  # the gathered units


def test_planner_with_offload_keeps_only_gathered_units_and_activations_on_the_device():
    from types import SimpleNamespace

    from slimtune.plan.parts import Plan

    plan = Plan(parts={"weights": 800, "gradients": 800, "optimizer": 1600, "activations": 100, "temporary": 0})
    spec = SimpleNamespace(embedding_params=10, norm_params=1, head_params=0, layer_params=20)
    run = SimpleNamespace(world_size=2, weight_dtype="fp32")
    sharded = strategy_for().estimate_memory(plan, spec, run)
    assert [sharded.parts[k] for k in ("weights", "gradients", "optimizer")] == [400, 400, 800]
    assert sharded.parts["temporary"] == 2 * 4 * (10 + 1 + 20)  # gathered weights and gradients of root + block
    offloaded = strategy_for("fsdp.offload=true").estimate_memory(plan, spec, run)
    assert offloaded.parts["weights"] == offloaded.parts["optimizer"] == offloaded.parts["gradients"] == 0
    assert offloaded.host_bytes == 1600 and offloaded.parts["activations"] == 100


def test_ddp_refuses_badam_on_16_bit_weights_and_says_why():
    """BAdam's hooks move a 16-bit gradient into its fp32 buffer before DDP's reducer sees it (the hook runs first),
    so DDP would average nothing; fp32 weights (any compute precision) or FSDP2 (hooks run after the reduce) work."""
    from slimtune.parallel.ddp import DDP

    cfg = make_config(TrainConfig, overrides=["strategy=ddp", "method=badam"])
    strategy = DDP(cfg)
    with pytest.raises(SlimtuneError, match="hf.weights_dtype=fp32.*strategy=fsdp"):
        strategy.check(create(cfg), nn.Linear(2, 2).to(torch.bfloat16))
    strategy.check(create(cfg), nn.Linear(2, 2))  # fp32 weights: BAdam runs, re-wrapped at each switch
