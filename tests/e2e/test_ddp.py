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


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "slimtune",
           "train", *map(str, args)]
    # Own process group: if the run hangs, the workers are killed with the launcher instead of outliving the test.
    popen = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.communicate()
        raise
    assert popen.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_whole_batch(char_data, tmp_path):
    common = [f"data={char_data}", *TINY, "max_iters=6", "eval.interval=3", "log.interval=1", "runtime.threads=1"]
    proc = torchrun(*common, f"out_dir={tmp_path / 'ddp'}", "batch_size=2")
    assert cli.main(["train", *common, f"out_dir={tmp_path / 'one'}", "batch_size=4", "strategy=single"]) == 0

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    a, b = records(ddp, "train"), records(one, "train")
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):  # 2 x 2 sequences per step = 4 sequences per step, the same rows in the same order
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5, rel=0)
        assert x["tokens"] == y["tokens"] == x["step"] * 4 * 32
    for x, y in zip(records(ddp, "eval"), records(one, "eval")):
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-5, rel=0)
    # Only rank 0 writes: one metrics file, one set of checkpoints, one model line.
    assert sorted(p.name for p in ddp.iterdir() if p.name.startswith("step-")) == ["step-000003", "step-000006"]
    state = torch.load(ddp / "step-000006" / "trainer.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2 and state["strategy"] == "ddp"
    assert proc.stdout.count("model: GPT") + proc.stderr.count("model: GPT") == 1
    assert "strategy ddp: 2 process(es)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_ddp_fine_tune_weighs_tokens_and_evaluates_like_one_process(tmp_path):
    """Ragged instruction data (few and many response tokens per record) and a validation set of ONE batch: under
    DDP rank 1 has no validation batch at all; the reported validation loss must still be the whole set's."""
    llama = save_tiny_llama(tmp_path / "llama")
    words = "apple river stone cloud hello world quick brown fox".split()

    def chat(i):
        answer = " ".join(words[: 1 + (i * 5) % 9] * (1 + i % 3))
        return {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": answer}]}

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(16)))
    val.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(100, 102)))  # 2 records: rank 0 takes both
    common = [f"model={llama}", f"data={train}", f"dataset.val_data={val}", "max_iters=3", "eval.interval=3",
              "eval.iters=1", "log.interval=1", "log.progress=false", "log.plot=false", "optim.warmup_iters=0",
              "runtime.threads=1", "dataset.max_seq_len=64"]
    torchrun(*common, f"out_dir={tmp_path / 'ddp'}", "batch_size=2")
    assert cli.main(["train", *common, f"out_dir={tmp_path / 'one'}", "batch_size=4", "strategy=single",
                     "eval.iters=2"]) == 0
    a, b = records(tmp_path / "ddp", "train"), records(tmp_path / "one", "train")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5, rel=0)
    (ea,), (eb,) = records(tmp_path / "ddp", "eval"), records(tmp_path / "one", "eval")
    assert ea["val_loss"] == pytest.approx(eb["val_loss"], abs=1e-5, rel=0)
