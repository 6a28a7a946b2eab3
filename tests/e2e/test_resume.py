"""Crash and signal recovery: a resumed run reproduces the uninterrupted run's losses bit for bit (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimtune import cli
from slimtune.train.checkpoint import list_checkpoints
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def train_args(data, out, *extra):
    # dropout > 0 so the RNG state matters; cosine schedule pinned to 20 steps so max_iters does not change it.
    return ["train", f"data={data}", f"out_dir={out}", *TINY, "gpt.dropout=0.1", "log.interval=1", "optim.lr_decay_iters=20",
            "eval.interval=0", "runtime.threads=1", *extra]


# Batch shards on worker threads (cpu_shards) need dropout=0; the data order and sums must still resume exactly.
SHARDED = ("gpt.dropout=0", "runtime.threads=2", "strategy=cpu_shards", "cpu_shards.n=2")


def spawn(args, **env):
    return subprocess.Popen([sys.executable, "-m", "slimtune", *map(str, args)], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("extra", [(), SHARDED], ids=["plain", "cpu_shards"])
def test_kill_and_resume_is_bit_identical(char_data, tmp_path, capsys, extra):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert cli.main(train_args(char_data, straight, "max_iters=20", *extra)) == 0
    assert ("2 batch shards" in capsys.readouterr().out) == bool(extra)

    # The same run, SIGKILLed right after its step-10 checkpoint (as an OOM kill or preemption would).
    proc = spawn(train_args(char_data, crashed, "max_iters=20", "ckpt.interval=10", *extra),
                 SLIMTUNE_FAULT_KILL_AT_STEP="10")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(crashed)] == ["step-000010"]

    assert cli.main(train_args(char_data, crashed, "max_iters=20", "ckpt.interval=10", *extra)) == 0  # resume=auto
    a, b = losses(straight), losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert a == b  # exact float equality, every step


def test_sigint_saves_and_resume_continues_exactly(char_data, tmp_path):
    out = tmp_path / "interrupted"
    args = train_args(char_data, out, "max_iters=400", "optim.decay_lr=false", "optim.warmup_iters=0")
    proc = spawn(args)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    stopped_at = max(losses(out))
    assert stopped_at < 400
    assert [p.name for p in list_checkpoints(out)] == [f"step-{stopped_at:06d}"]
    assert "stopped by signal" in stdout

    total = stopped_at + 5
    assert cli.main(train_args(char_data, out, f"max_iters={total}", "optim.decay_lr=false", "optim.warmup_iters=0")) == 0
    straight = tmp_path / "straight"
    assert cli.main(train_args(char_data, straight, f"max_iters={total}", "optim.decay_lr=false", "optim.warmup_iters=0")) == 0
    assert losses(out) == losses(straight)


def test_resume_auto_starts_fresh_without_checkpoint_and_never_ignores_one(char_data, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(train_args(char_data, out, "max_iters=3")) == 0
    assert "resumed from" not in capsys.readouterr().out  # auto with no checkpoint: a fresh start
    first = losses(out)
    assert cli.main(train_args(char_data, out, "max_iters=5", "resume=never")) == 0
    said = capsys.readouterr().out
    # resume=never retrained from step 1 (auto would have continued at step 4), after archiving the first run.
    assert "resumed from" not in said and "moved them to" in said
    again = losses(out)
    assert sorted(again) == [1, 2, 3, 4, 5] and {s: again[s] for s in first} == first  # same seed, same losses
    (archive,) = (out / "previous-runs").iterdir()
    assert losses(archive) == first
    assert cli.main(train_args(char_data, out, "max_iters=6")) == 0  # auto continues the newest run
    assert f"resumed from {out / 'step-000005'} at step 5" in capsys.readouterr().out
