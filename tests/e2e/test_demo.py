"""The demo's code path on a tiny model (fast), and the GPT-from-scratch demo."""

import json
import re

import pytest

from slimtune import cli
from tests.tiny_hf import save_tiny_llama


def test_finetune_demo_prints_before_after_table(tmp_path, capsys):
    from slimtune.demo import run_finetune_demo

    model = save_tiny_llama(tmp_path / "tiny")
    result = run_finetune_demo(tmp_path / "demo", model=str(model), steps=3, n_train=40, n_test=3, method="full",
                               extra=["log.progress=false", "dataset.max_seq_len=128"])
    out = capsys.readouterr().out
    assert "| prompt" in out and "| expected" in out and "fine-tuned |" in out
    assert "(base)" in out and "after slimtune fine-tuning" in out and "3 steps x 8" in out
    assert "peak memory" in out and "total time" in out
    # The table reports the accuracies the demo measured, as counts of the 3 held-out prompts.
    base, tuned = result["base_accuracy"], result["tuned_accuracy"]
    assert base * 3 == round(base * 3) and tuned * 3 == round(tuned * 3)
    assert f"| {base:.0%} ({round(base * 3)}/3)" in out and f"| {tuned:.0%} ({round(tuned * 3)}/3)" in out
    assert result["peak_memory_bytes"] > 0 and result["method"] == "full"
    assert (tmp_path / "demo" / "run" / "step-000003" / "config.json").is_file()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_demo_with_adapter_methods(method, tmp_path, capsys):
    """`slimtune demo --method lora|qlora`: the same table, from an adapter-only checkpoint."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from slimtune.demo import run_finetune_demo

    model = save_tiny_llama(tmp_path / "tiny")
    result = run_finetune_demo(tmp_path / "demo", model=str(model), steps=2, n_train=40, n_test=2, method=method,
                               extra=["log.progress=false", "dataset.max_seq_len=128"])
    out = capsys.readouterr().out
    assert "after slimtune fine-tuning" in out and re.search(rf"\| {method} +\|", out)
    ckpt = tmp_path / "demo" / "run" / "step-000002"
    assert result["method"] == method and (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()  # the adapter only
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_scratch_demo_quick(tmp_path, capsys):
    assert cli.main(["demo", "--scratch", "--quick", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "sample from the trained model" in out and "final val loss" in out
