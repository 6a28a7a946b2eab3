"""DDP under torchrun with two CPU processes (gloo): the same losses as one process on the whole batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune import cli
from tests.conftest import TINY
from tests.tiny_hf import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args: str, nproc: int = 2) -> str:
    """`slimtune train ARGS` under torchrun with `nproc` CPU processes; returns everything they printed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", "-m",
           "slimtune", "train", *map(str, args)]
    # Own process group: if the run hangs, the workers are killed with the launcher instead of outliving the test.
    popen = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
                             start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.communicate()
        raise
    # On failure: every rank's error lines (the first failing rank is not always the last to write), the Python
    # stacks faulthandler printed for a rank that crashed in native code, then the tail.
    lines = stderr.splitlines()
    errors = [line for line in lines if "Error" in line or "error:" in line or "terminate" in line]
    crashes = [line for i in (i for i, line in enumerate(lines) if line.startswith("Fatal Python error"))
               for line in lines[i:i + 40]]
    assert popen.returncode == 0, ("\n".join(errors[:20]) + "\n...\n" + "\n".join(crashes[:80]) + "\n...\n"
                                   + stderr[-1500:])
    return stdout + stderr


def test_a_torchrun_worker_ends_without_the_interpreter_shutdown():
    """Gloo's threads outlive DDP's process group, and one that frees tensors during the interpreter's shutdown
    aborts the process: a worker leaves with os._exit once its output is flushed."""
    code = ("import atexit, runpy, sys; atexit.register(lambda: print('SHUTDOWN RAN')); "
            "sys.argv = ['slimtune']; runpy.run_module('slimtune', run_name='__main__')")
    for env, shutdown in (({"RANK": "0", "WORLD_SIZE": "2"}, False), ({}, True)):
        clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              env={**clean, **env})
        assert proc.returncode == 0, proc.stderr
        assert "usage: slimtune" in proc.stdout  # flushed before os._exit
        assert ("SHUTDOWN RAN" in proc.stdout) == shutdown


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def assert_same_losses(a: Path, b: Path, steps: int) -> None:
    """Runs `a` and `b` logged the same train losses for steps 1..steps and the same evaluations (within 1e-5)."""
    x, y = records(a, "train"), records(b, "train")
    assert [r["step"] for r in x] == [r["step"] for r in y] == list(range(1, steps + 1))
    for r, s in zip(x, y, strict=True):
        assert r["loss"] == pytest.approx(s["loss"], abs=1e-5, rel=0)
    evals = records(a, "eval")
    assert evals, f"{a} logged no evaluation to compare"
    for r, s in zip(evals, records(b, "eval"), strict=True):
        assert r["val_loss"] == pytest.approx(s["val_loss"], abs=1e-5, rel=0)


def write_ragged_chats(folder: Path) -> tuple[Path, Path]:
    """16 chat records with few and many response tokens, and a validation file of 2 records (ONE batch of 2: rank 0
    takes both, rank 1 evaluates nothing)."""
    words = "apple river stone cloud hello world quick brown fox".split()

    def chat(i):
        answer = " ".join(words[: 1 + (i * 5) % 9] * (1 + i % 3))
        return {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": answer}]}

    train, val = folder / "train.jsonl", folder / "val.jsonl"
    train.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(16)))
    val.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(100, 102)))
    return train, val


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_whole_batch(char_data, tmp_path):
    common = [f"data={char_data}", *TINY, "max_iters=6", "eval.interval=3", "log.interval=1", "runtime.threads=1",
              "runtime.precision=fp32"]
    log = torchrun(*common, f"out_dir={tmp_path / 'ddp'}", "batch_size=2")
    assert cli.main(["train", *common, f"out_dir={tmp_path / 'one'}", "batch_size=4", "strategy=single"]) == 0

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    a, b = records(ddp, "train"), records(one, "train")
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):  # 2 x 2 sequences per step = 4 sequences per step, the same rows in order
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5, rel=0)
        assert x["tokens"] == y["tokens"] == x["step"] * 4 * 32
    evals = records(ddp, "eval")
    assert [r["step"] for r in evals] == [3, 6]
    for x, y in zip(evals, records(one, "eval"), strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-5, rel=0)
    # Only rank 0 writes: one metrics file, one set of checkpoints, one model line.
    assert sorted(p.name for p in ddp.iterdir() if p.name.startswith("step-")) == ["step-000003", "step-000006"]
    state = torch.load(ddp / "step-000006" / "trainer.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2 and state["strategy"] == "ddp"
    assert log.count("model: GPT") == 1
    assert "strategy ddp: 2 process(es)" in log
    (peak,) = records(ddp, "peak")  # each rank's measured peak, the largest compared with the plan
    assert len(peak["per_rank_peak_bytes"]) == 2 and peak["measured_peak_bytes"] == max(peak["per_rank_peak_bytes"])
    assert "largest of 2 ranks" in log


@pytest.mark.slow
def test_ddp_fine_tune_weighs_tokens_and_evaluates_like_one_process(tmp_path):
    """Ragged instruction data (few and many response tokens per record) and a validation set of ONE batch: under
    DDP rank 1 has no validation batch at all; the reported validation loss must still be the whole set's."""
    llama = save_tiny_llama(tmp_path / "llama")
    train, val = write_ragged_chats(tmp_path)
    common = [f"model={llama}", f"data={train}", f"dataset.val_data={val}", "max_iters=3", "eval.interval=3",
              "eval.iters=1", "log.interval=1", "log.progress=false", "log.plot=false", "optim.warmup_iters=0",
              "runtime.threads=1", "runtime.precision=fp32", "dataset.max_seq_len=64"]
    torchrun(*common, f"out_dir={tmp_path / 'ddp'}", "batch_size=2")
    assert cli.main(["train", *common, f"out_dir={tmp_path / 'one'}", "batch_size=4", "strategy=single",
                     "eval.iters=2"]) == 0
    assert_same_losses(tmp_path / "ddp", tmp_path / "one", 3)
    assert len(records(tmp_path / "ddp", "eval")) == 1
