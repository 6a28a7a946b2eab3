"""kill -9 at random moments of a run that saves every step: every restart resumes from an intact checkpoint,
no temporary folder survives, and the final losses equal an uninterrupted run's, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimtune import cli
from slimtune.train.checkpoint import list_checkpoints, validate_checkpoint
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 20


def args(data, out, iters):
    return ["train", f"data={data}", f"out_dir={out}", *TINY, f"max_iters={iters}", "ckpt.interval=1",
            "ckpt.keep_last=2", "eval.interval=0", "log.interval=1", "runtime.threads=1", "optim.lr_decay_iters=300",
            "gpt.dropout=0.1"]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.slow
def test_random_kills_never_lose_or_corrupt_a_run(char_data, tmp_path):
    iters = 300
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for trial in range(TRIALS):
        proc = subprocess.Popen([sys.executable, "-m", "slimtune", *args(char_data, out, iters)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        # Kill at a random moment once training has begun (start-up alone takes a few seconds).
        deadline = time.time() + 60
        while time.time() < deadline and not list_checkpoints(out) and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        for ckpt in list_checkpoints(out):  # whatever was listed as a checkpoint is whole
            assert validate_checkpoint(ckpt) == [], (trial, ckpt)
        if proc.returncode == 0:
            break
    assert kills >= 15, f"only {kills} kills landed mid-run"
    assert cli.main(args(char_data, out, iters)) == 0  # finish (or confirm) the run
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    straight = tmp_path / "straight"
    assert cli.main(args(char_data, straight, iters)) == 0
    a, b = losses(out), losses(straight)
    assert sorted(a) == list(range(1, iters + 1)) and a == b
