"""Fine-tuning Hugging Face models through the one loop: SFT on chat data, classification, chat/generate/eval/export."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune import cli
from slimtune.train.checkpoint import list_checkpoints
from tests.tiny_hf import save_tiny_bert, write_sentiment_jsonl

ROOT = Path(__file__).resolve().parents[2]
FAST = ["log.progress=false", "log.plot=false", "eval.iters=2", "optim.warmup_iters=2", "dataset.max_seq_len=64", "batch_size=4",
        "runtime.threads=1"]


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_sft_trains_checkpoints_and_exports(llama_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "sft"
    args = ["train", f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST, "max_iters=30", "lr=3e-3",
            "eval.interval=15", "log.interval=5", "dataset.val_fraction=0.1"]
    assert cli.main(args) == 0
    train = records(out, "train")
    evals = records(out, "eval")
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert [e["step"] for e in evals] == [15, 30] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    ckpt = out / "step-000030"
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "trainer.pt"} <= {
        p.name for p in ckpt.iterdir()}
    # The checkpoint folder itself loads with plain transformers, and export writes an equivalent plain folder.
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert cli.main(["export", str(out), str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        diff = (direct(ids).logits - exported(ids).logits).abs().max().item()
    assert diff < 1e-5

    capsys.readouterr()
    assert cli.main(["eval", str(ckpt), "--data", str(chat_file), "--limit", "8", "--accuracy",
                     "--max-new-tokens", "8", "--max-seq-len", "64"]) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "exact match" in text and "of 8" in text

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "reverse the words: apple river", "id": 1}\n{"prompt": "hello", "id": 2}\n')
    assert cli.main(["generate", str(ckpt), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                     "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and all(isinstance(r["output"], str) for r in rows)


def test_chat_streams_replies(llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/exit\n"))
    assert cli.main(["chat", str(llama_dir), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant: ") == 1 and "/exit" in out


def test_sft_kill_and_resume_is_bit_identical(llama_dir, chat_file, tmp_path):
    def args(out):
        return ["train", f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST, "max_iters=12",
                "ckpt.interval=6", "eval.interval=0", "log.interval=1", "dataset.val_fraction=0"]

    assert cli.main(args(tmp_path / "straight")) == 0
    proc = subprocess.run([sys.executable, "-m", "slimtune", *args(tmp_path / "crashed")], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "SLIMTUNE_FAULT_KILL_AT_STEP": "6"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["step-000006"]
    assert cli.main(args(tmp_path / "crashed")) == 0
    a = {r["step"]: r["loss"] for r in records(tmp_path / "straight", "train")}
    b = {r["step"]: r["loss"] for r in records(tmp_path / "crashed", "train")}
    assert sorted(a) == list(range(1, 13)) and a == b


def test_classification_finetune_learns(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert")
    write_sentiment_jsonl(tmp_path / "cls.jsonl")
    out = tmp_path / "cls"
    assert cli.main(["train", f"model={bert}", "hf.task=classify", f"data={tmp_path / 'cls.jsonl'}", f"out_dir={out}",
                     *FAST, "batch_size=8", "max_iters=60", "lr=3e-3", "eval.interval=60", "dataset.val_fraction=0.2",
                     "optim.weight_decay=0"]) == 0
    evals = records(out, "eval")
    assert evals[-1]["val_loss"] < 0.3  # separable: near-perfect after 60 steps (ln 2 = 0.69 is chance)
    cfg = json.loads((out / "step-000060" / "config.json").read_text())
    assert sorted(cfg["id2label"].values()) == ["neg", "pos"]


def test_finetune_bad_input_reports_file_and_line(llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [oops\n')
    code = cli.main(["train", f"model={llama_dir}", f"data={bad}", f"out_dir={tmp_path / 'o'}", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:2" in err and "not valid JSON" in err
    code = cli.main(["train", f"model={tmp_path / 'no-such-model'}", f"data={bad}", f"out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2 and "no-such-model" in err
    code = cli.main(["chat", str(tmp_path)])
    assert code == 2


def test_badam_with_checkpointing_and_onednn_matches_plain_run(llama_dir, chat_file, tmp_path, capsys):
    """Recomputing activations (gradient_checkpointing) and oneDNN products change speed and memory, not the run."""
    from slimtune.kernels import onednn_available

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    losses = {}
    for name, extra in {"plain": ["runtime.matmul=aten"], "ckpt+onednn": ["runtime.matmul=onednn", "hf.gradient_checkpointing=true"]}.items():
        out = tmp_path / name
        args = ["train", f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST, "max_iters=6",
                "method=badam", "badam.switch_every=2", "badam.switch_mode=ascending", "eval.interval=0",
                "log.interval=1", "lr=3e-3", *extra]
        assert cli.main(args) == 0
        assert f"matmul {extra[0].split('=')[1]}" in capsys.readouterr().out
        losses[name] = [r["loss"] for r in records(out, "train")]
    assert len(losses["plain"]) == 6
    assert losses["ckpt+onednn"] == pytest.approx(losses["plain"], abs=1e-4)


def test_lora_checkpoint_works_with_eval_generate_chat_and_export(llama_dir, chat_file, tmp_path, monkeypatch, capsys):
    """An adapter checkpoint holds no full weights: the verbs rebuild base + adapter from its config."""
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    assert cli.main(["train", f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST, "max_iters=4",
                     "method=lora", "eval.interval=0", "dataset.val_fraction=0"]) == 0
    ckpt = out / "step-000004"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    capsys.readouterr()
    assert cli.main(["eval", str(ckpt), "--data", str(chat_file), "--limit", "4", "--max-seq-len", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello", "id": 1}\n')
    assert cli.main(["generate", str(out), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                     "--max-new-tokens", "3"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    assert cli.main(["chat", str(ckpt), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert cli.main(["export", str(ckpt), str(tmp_path / "merged"), "--merge"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert cli.main(["export", str(llama_dir), str(tmp_path / "x"), "--merge"]) == 2
    assert "has no export option merge" in capsys.readouterr().err
