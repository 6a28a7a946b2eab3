"""The loop's correctness: token-weighted gradient accumulation, no NaN checkpoints, fresh runs never pruned against
old ones, the schedule warning on resume, the cosine schedule, MFU never above 100 %, a pinned-value regression."""

from __future__ import annotations

import json
import math

import pytest
import torch

import slimtune
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.train.checkpoint import list_checkpoints
from tests.conftest import TINY, free_port
from tests.tiny_hf import one_torch_thread, save_tiny_llama  # noqa: F401


def _records(out, kind="train"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _gpt(char_data, out, *extra):
    return make_config(TrainConfig, overrides=[f"data={char_data}", f"out_dir={out}", *TINY, "log.interval=1",
                                               "eval.interval=0", "runtime.threads=1", *extra])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny")


@pytest.fixture(scope="module")
def ragged_chat(tmp_path_factory):
    """Chat records whose answers differ a lot in length: few response tokens in some, many in others."""
    path = tmp_path_factory.mktemp("chat") / "ragged.jsonl"
    words = "apple river stone cloud hello world quick brown fox".split()
    with open(path, "w") as f:
        for i in range(16):
            answer = " ".join(words[: 1 + (i * 5) % 9] * (1 + i % 3))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def _llama_grads(llama, data, batch_size, accum, dtype=torch.float32, drop_last=False):
    """One optimizer step's gradients of the tiny Llama (batch_size x accum records, `dtype` compute), the
    micro-batches' response-token counts and the step's mean loss; `drop_last` forgets the last micro-batch."""
    from slimtune.methods.full import Full
    from slimtune.models.build import build_model
    from slimtune.parallel.single import Single
    from slimtune.train.precision import Precision
    from slimtune.train.workloads import build_workload

    cfg = make_config(TrainConfig, overrides=[f"model={llama}", f"data={data}", f"batch_size={batch_size}",
                                              f"optim.grad_accum={accum}", "dataset.val_fraction=0"])
    cpu = torch.device("cpu")
    workload = build_workload(cfg, 0, 1, cpu)
    model = build_model(cfg, workload.model_spec(), Full(cfg).load_options()).model.train()
    batches = [workload.next_batch() for _ in range(accum)][: accum - drop_last]
    counts = [workload.count_targets(b) for b in batches]
    loss, n = Single(cfg).forward_backward(model, workload, batches, Precision(cpu, dtype))
    return {k: p.grad.clone() for k, p in model.named_parameters()}, counts, loss / n


def test_grad_accum_weighs_every_response_token_equally(llama, ragged_chat, tmp_path):
    """batch_size=4 grad_accum=1 and batch_size=2 grad_accum=2 give the same gradients on variable-length data."""
    whole, whole_counts, whole_loss = _llama_grads(llama, ragged_chat, 4, 1)
    split, split_counts, split_loss = _llama_grads(llama, ragged_chat, 2, 2)
    assert split_counts[0] != split_counts[1]  # the two micro-batches hold different numbers of response tokens
    assert sum(split_counts) == whole_counts[0]
    assert split_loss.item() == pytest.approx(whole_loss.item(), rel=1e-6)
    for name, g in whole.items():
        torch.testing.assert_close(split[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_grad_accum_under_bf16_autocast_weighs_tokens_as_fp32_does(llama, ragged_chat):
    """What precision=auto runs on bf16-capable CPUs (Zen 4, Sapphire Rapids), on any host: the split step's
    gradients equal the whole batch's up to bf16 rounding, measured in this process as the distance between the
    whole batch in fp32 and in bf16, while a step that weighs a micro-batch wrongly (here: loses one) lies far
    outside that tolerance."""
    ref, _, ref_loss = _llama_grads(llama, ragged_chat, 4, 1)
    whole, _, whole_loss = _llama_grads(llama, ragged_chat, 4, 1, torch.bfloat16)
    split, _, split_loss = _llama_grads(llama, ragged_chat, 2, 2, torch.bfloat16)
    wrong, _, _ = _llama_grads(llama, ragged_chat, 2, 2, torch.bfloat16, drop_last=True)

    def distance(a, b):  # the largest difference of any gradient, relative to that gradient's scale
        return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in b)

    rounding = distance(whole, ref)
    assert 0 < rounding < 0.1  # bf16 autocast really ran, and only rounds
    assert distance(split, whole) <= 2 * rounding
    assert distance(wrong, whole) > 4 * rounding
    assert abs(split_loss.item() - whole_loss.item()) <= 2 * abs(whole_loss.item() - ref_loss.item()) + 1e-6


def test_fresh_run_is_not_pruned_against_an_older_run(char_data, tmp_path, capsys):
    out = tmp_path / "o"
    slimtune.train(_gpt(char_data, out, "max_iters=20", "ckpt.keep_last=1", "ckpt.interval=10"))
    old_losses = {r["step"]: r["loss"] for r in _records(out)}
    slimtune.train(_gpt(char_data, out, "max_iters=10", "ckpt.keep_last=1", "resume=never", "ckpt.interval=5"))
    said = capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out)] == ["step-000010"]  # the new run's own checkpoint survives
    archives = list((out / "previous-runs").iterdir())
    assert len(archives) == 1 and f"moved them to {archives[0]}" in said
    assert (archives[0] / "step-000020").is_dir()  # nothing of the old run was deleted
    assert {r["step"]: r["loss"] for r in _records(archives[0])} == old_losses
    # resume=auto continues the new run, not the old one.
    result = slimtune.train(_gpt(char_data, out, "max_iters=12", "ckpt.keep_last=1"))
    assert result.step == 12 and "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in _records(out)] == list(range(1, 13))


def test_a_finished_run_frees_its_model(char_data, tmp_path, monkeypatch):
    """FSDP's sharded model sits in reference cycles (a world of one process here): train() frees it before it
    returns, without waiting for the garbage collector."""
    import gc

    from slimtune.models.gpt import GPT

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)

    def models() -> int:
        return sum(isinstance(o, GPT) for o in gc.get_objects())

    gc.collect()
    before = models()
    gc.disable()  # only what train() frees counts
    try:
        slimtune.train(_gpt(char_data, tmp_path / "o", "max_iters=2", "strategy=fsdp"))
        assert models() == before
    finally:
        gc.enable()


def test_non_finite_loss_stops_before_any_checkpoint_of_it(char_data, tmp_path, monkeypatch):
    from slimtune.train import workloads

    real = workloads.LMWorkload.loss_sum
    calls = {"n": 0}

    def poisoned(self, model, batch):
        calls["n"] += 1
        loss = real(self, model, batch)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(workloads.LMWorkload, "loss_sum", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SlimtuneError, match=r"loss became nan at step 4; no checkpoint was written"):
        slimtune.train(_gpt(char_data, out, "max_iters=10", "ckpt.interval=1", "ckpt.keep_last=1",
                            "strategy=single"))
    assert [p.name for p in list_checkpoints(out)] == ["step-000003"]  # the last good one is kept


def test_changed_schedule_on_resume_is_reported(char_data, tmp_path, capsys):
    out = tmp_path / "s"
    slimtune.train(_gpt(char_data, out, "max_iters=4"))
    capsys.readouterr()
    slimtune.train(_gpt(char_data, out, "max_iters=6"))
    said = capsys.readouterr().out
    assert "decays over 4 steps, this run's over 6" in said and "optim.lr_decay_iters=4" in said


def test_learning_rate_schedule_in_the_log(char_data, tmp_path):
    out = tmp_path / "lr"
    slimtune.train(_gpt(char_data, out, "max_iters=10", "lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_iters=2",
                        "optim.lr_decay_iters=8"))
    lrs = [r["lr"] for r in _records(out)]  # record of step k holds the lr of 0-based optimizer step k-1
    # Warmup lr*(s+1)/3 for s < 2, then cosine from 1e-3 to 1e-4 over steps 2..8, then the floor.
    expected = [1e-3 / 3, 2e-3 / 3] + [1e-4 + 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) * 0.9e-3
                                       for s in range(2, 8)] + [1e-4, 1e-4]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_mfu_is_never_above_one(char_data, tmp_path, monkeypatch):
    from slimtune.train import loop

    monkeypatch.setattr(loop, "known_matmul_peak", lambda device, dtype: 1.0)  # a peak far too low
    out = tmp_path / "m"
    slimtune.train(_gpt(char_data, out, "max_iters=3"))
    records = _records(out)
    assert all(r["mfu"] is None and r["peak_flops_uncertain"] for r in records)
    assert all(r["flops_per_s"] > 0 for r in records)


def test_step_flops_count_only_the_backward_that_runs():
    from slimtune.models.gpt import GPT, GPTConfig
    from slimtune.train.flops import step_flops_per_token

    model = GPT(GPTConfig(vocab_size=64, n_layer=4, n_head=2, n_embd=32, block_size=16))
    n = sum(p.numel() for p in model.parameters())
    fwd = 2 * n
    assert step_flops_per_token(model, fwd) == pytest.approx(6 * n)
    for p in model.parameters():
        p.requires_grad_(False)
    top = list(model.transformer.h[3].parameters())
    for p in top:
        p.requires_grad_(True)
    above = sum(p.numel() for p in top) + sum(p.numel() for p in model.transformer.ln_f.parameters())
    trainable = sum(p.numel() for p in top)
    assert step_flops_per_token(model, fwd) == pytest.approx(fwd + fwd * above / n + 2 * trainable)
    assert step_flops_per_token(model, fwd) < 0.5 * 6 * n


def test_pinned_losses(char_data, tmp_path):
    """Fixed seed, tiny GPT, fp32, one thread: the first five losses to 4 decimals. A change here means the
    numerics of the model, data order, loss or optimizer changed; update the numbers only on purpose."""
    out = tmp_path / "pin"
    slimtune.train(_gpt(char_data, out, "max_iters=5", "strategy=single", "runtime.matmul=aten",
                        "runtime.precision=fp32"))
    losses = [round(r["loss"], 4) for r in _records(out)]
    assert losses == PINNED, losses


PINNED = [4.5518, 4.5381, 4.519, 4.4557, 4.4334]


def test_compile_compiles_what_the_loss_really_runs(llama, ragged_chat, monkeypatch):
    """The chunked loss calls the decoder below the head, never the outer model's forward: compile that."""
    from slimtune.models.build import build_model
    from slimtune.train.workloads import build_workload

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    cfg = make_config(TrainConfig, overrides=[f"model={llama}", f"data={ragged_chat}", "runtime.compile=true"])
    workload = build_workload(cfg, 0, 1, torch.device("cpu"))
    model = build_model(cfg, workload.model_spec(), {}).model
    workload.compile(model)
    assert compiled == [model.model]


def test_fp16_loss_scaler_state_is_saved_and_restored():
    from slimtune.train.precision import Precision

    p = Precision(torch.device("cpu"), torch.float16)
    grown = {**p.scaler.state_dict(), "scale": 1024.0, "_growth_tracker": 7}  # as after many overflow-free steps
    p.scaler.load_state_dict(grown)
    state = p.state_dict()
    assert state["grad_scaler"]["scale"] == 1024.0 and state["grad_scaler"]["_growth_tracker"] == 7
    q = Precision(torch.device("cpu"), torch.float16)
    q.load_state_dict(state)
    assert q.scaler.get_scale() == 1024.0 and q.scaler.state_dict() == state["grad_scaler"]
    assert Precision(torch.device("cpu"), torch.float32).state_dict() == {}


def test_trainer_state_holds_precision_method_and_schedule(char_data, tmp_path):
    out = tmp_path / "t"
    slimtune.train(_gpt(char_data, out, "max_iters=2"))
    state = torch.load(out / "step-000002" / "trainer.pt", weights_only=True)
    assert state["precision"] == {} and state["method"] == {}
    assert state["schedule"] == {"decay_iters": 2, "warmup_iters": 2}


def test_bf16_fine_tune_runs_end_to_end_on_cpu(llama, ragged_chat, tmp_path, monkeypatch, capsys):
    """precision=auto on a CPU whose bf16 matmul pays (the probe forced, so any host runs this branch)."""
    monkeypatch.setenv("SLIMTUNE_BF16_SPEEDUP", "2.37")  # what the probe measured on an AMD Zen 4
    out = tmp_path / "bf16"
    result = slimtune.train(make_config(TrainConfig, overrides=[
        f"model={llama}", f"data={ragged_chat}", f"out_dir={out}", "runtime.precision=auto", "max_iters=3",
        "batch_size=4", "log.interval=1", "log.progress=false", "log.plot=false", "eval.interval=3",
        "dataset.val_fraction=0.25"]))
    losses = [r["loss"] for r in _records(out)]
    assert result.step == 3 and len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result.val_loss)
    assert [r["settings"]["act_dtype"] for r in _records(out, "plan")] == ["bf16"]
    assert "device cpu, bf16 autocast (runtime.precision=auto: a bf16 matmul runs 2.37x" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["random", "ascending", "descending", "fixed"])
def test_badam_through_the_loop_logs_blocks_and_resumes_exactly(char_data, tmp_path, mode, capsys):
    badam = ["method=badam", "badam.switch_every=3", f"badam.switch_mode={mode}", "optim.lr_decay_iters=8"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    slimtune.train(_gpt(char_data, straight, *badam, "max_iters=8"))
    assert "BAdam trains block" in capsys.readouterr().out
    slimtune.train(_gpt(char_data, resumed, *badam, "max_iters=4"))
    slimtune.train(_gpt(char_data, resumed, *badam, "max_iters=8"))
    a, b = _records(straight), _records(resumed)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["block"] for r in a] == [r["block"] for r in b]
    # Adam's state of a block exists from its first step until the switch away from it (steps 3, 6: just switched).
    assert all((r["optimizer_state_bytes"] > 0) == (r["step"] % 3 != 0 or mode == "fixed") for r in a)
    switches = _records(straight, "switch")
    assert [s["step"] for s in switches] == ([0] if mode == "fixed" else [0, 3, 6])
    assert all(s["analytic_state_bytes"] > 0 and s["block"] for s in switches)
    if mode == "ascending":
        assert [s["block"] for s in switches] == ["transformer.h.0.", "transformer.h.1.", "transformer.h.0."]
