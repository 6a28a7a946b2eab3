"""Every command of the README's tour runs, in the order given, on tiny stand-ins (offline, seconds).

The substitutions below are the only differences from what a user types: tiny random models for SmolLM2 and BERT
(the real model's training speed is the benchmarks' business), 2 training steps instead of hundreds, and short
generations. Input files the README assumes the user has are written first."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimtune import cli
from tests.tiny_hf import one_torch_thread, save_tiny_bert, save_tiny_llama  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def tour_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(("slimtune ", "torchrun ")):
                commands.append(line)
    return commands


def _inputs(cwd: Path) -> dict[str, str]:
    words = "apple river stone cloud".split()
    chats = [{"messages": [{"role": "user", "content": f"reverse: {' '.join(words[:i])}"},
                           {"role": "assistant", "content": " ".join(reversed(words[:i]))}]} for i in range(1, 5)] * 3
    (cwd / "my_chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (cwd / "held_out.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:2]))
    (cwd / "alpaca.json").write_text(json.dumps([{"question": f"say {w}", "answer": w} for w in words * 3]))
    (cwd / "reviews.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in
                                               [("good film", "pos"), ("awful plot", "neg")] * 6))
    (cwd / "prompts.jsonl").write_text(json.dumps({"prompt": "reverse: apple river"}) + "\n")
    speakers = {"user": "human", "assistant": "tutor"}
    (cwd / "sharegpt.jsonl").write_text("".join(json.dumps({"conversations": [
        {"from": speakers[m["role"]], "value": m["content"]} for m in c["messages"]]}) + "\n" for c in chats))
    import datasets

    datasets.Dataset.from_list(chats).to_parquet(str(cwd / "chats.parquet"))
    corpus = "the quick brown fox jumps over the lazy dog. " * 200
    (cwd / "my_corpus.txt").write_text(corpus)
    (cwd / "corpus.txt").write_text(corpus)
    shutil.copytree(ROOT / "configs", cwd / "configs")
    return {"model=smollm2-135m": f"model={save_tiny_llama(cwd / 'tiny-llama')}",
            "model=path/to/bert": f"model={save_tiny_bert(cwd / 'tiny-bert')}",
            "path/to/hf_tokenizer_folder": str(cwd / "tiny-llama"),
            "step-000300": "step-000002"}


TINY_TRAIN = ["max_iters=2", "log.progress=false", "log.plot=false"]
EXTRA = {"train": TINY_TRAIN, "bench": ["--steps", "1", "--warmup", "0"],
         "chat": ["--max-new-tokens", "4"], "generate": ["--max-new-tokens", "4"],
         "eval": ["--max-new-tokens", "4"], "sample": ["--max-new-tokens", "20"]}


def test_the_readme_has_a_tour():
    commands = tour_commands()
    assert len(commands) >= 15 and any(c.startswith("torchrun") for c in commands)


@pytest.mark.slow
def test_every_tour_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    replace = _inputs(tmp_path)
    for command in tour_commands():
        for old, new in replace.items():
            command = command.replace(old, new)
        argv = shlex.split(command, comments=True)
        extra = EXTRA.get(argv[1] if argv[0] == "slimtune" else "train", [])
        if argv[0] == "torchrun":
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv[1:], *extra, "resume=never"],
                                  cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
            assert proc.returncode == 0, (command, proc.stderr[-3000:])
            continue
        if argv[1] == "chat":
            monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello\n/exit\n"))
        if argv[1] == "train":  # after the README's own keys (so ours win), before any --option
            at = next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))
            if any(a.startswith("num_epochs=") for a in argv):  # the README's run length is already short
                extra = [e for e in extra if not e.startswith("max_iters=")]
            argv = argv[:at] + extra + argv[at:]
            extra = []
        code = cli.main(argv[1:] + extra)
        captured = capsys.readouterr()
        assert code == 0, (command, captured.err[-3000:])
    assert (tmp_path / "my_model" / "config.json").is_file() and (tmp_path / "replies.jsonl").is_file()
    assert (tmp_path / "out" / "alpaca" / "step-000002").is_dir()
