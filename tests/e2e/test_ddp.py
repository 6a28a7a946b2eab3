"""DDP under torchrun with two CPU processes (gloo)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_two_processes(char_data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    assert torchrun.exists() or shutil.which("torchrun")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "slimtune", "train", f"data={char_data}", f"out_dir={out}", *TINY, "max_iters=6",
           "eval_interval=3", "log_interval=1", "threads=1"]
    # Own process group: if the run hangs, the workers are killed with the launcher instead of outliving the test.
    popen = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.communicate()
        raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 writes: one metrics file with one line per step, one set of checkpoints.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == ["step-000003", "step-000006"]
    # 2 processes x batch 4 x 32 tokens per step.
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["tokens"] == 6 * 2 * 4 * 32
    state = torch.load(out / "step-000006" / "trainer.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    # Each rank draws its own data stream.
    assert state["ranks"][0]["data"] != state["ranks"][1]["data"]
    assert proc.stdout.count("model: GPT") + proc.stderr.count("model: GPT") == 1
