"""The demo's code path on a tiny model (fast), and the GPT-from-scratch demo."""

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


def test_scratch_demo_quick(tmp_path, capsys):
    assert cli.main(["demo", "--scratch", "--quick", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "sample from the trained model" in out and "final val loss" in out
