"""The CLI end to end on tiny models: verbs, files written, losses, and every bad-input error."""

import json
import platform
import subprocess
import sys

import pytest

from slimtune import cli
from tests.conftest import TINY


def run(args, capsys=None):
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err if capsys else ""
    return code, err


def test_command_map_matches_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == set(cli.COMMANDS)


def test_help_for_every_verb(capsys):
    out = subprocess.run([sys.executable, "-m", "slimtune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(v in out.stdout for v in cli.COMMANDS)  # the entry point, as a process
    for verb in cli.COMMANDS:  # each verb's help in this process (a process each cost ~4 s of imports)
        with pytest.raises(SystemExit) as done:
            cli.main([verb, "--help"])
        assert done.value.code == 0, (verb, capsys.readouterr().err)
        text = capsys.readouterr().out
        assert text.startswith("usage: slimtune " + verb), verb
        if verb == "train":
            assert "batch_size  (int, default 12)" in text and "Sequences per micro-batch" in text
            assert "badam.switch_every" in text and "gpt.n_layer  (int, default 6)" in text


def test_prepare_train_sample(corpus_file, tmp_path, capsys):
    data = tmp_path / "data"
    assert run(["prepare", corpus_file, "--out", data, "--no-progress"])[0] == 0
    out = tmp_path / "out"
    args = ["train", f"data={data}", f"out_dir={out}", *TINY, "max_iters=60", "eval.interval=30", "log.interval=5",
            "lr=3e-3", "log.plot=true", "ckpt.keep_last=1"]
    assert run(args)[0] == 0
    ckpts = sorted(p.name for p in out.iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000060"]  # keep_last=1 pruned step-000030
    files = {p.name for p in (out / "step-000060").iterdir()}
    assert {"model.safetensors", "optimizer.pt", "trainer.pt", "config.yaml", "model_config.json",
            "meta.json"} <= files
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left
    assert (out / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    assert [r["step"] for r in evals] == [30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 4.6  # ln(99) = 4.6: better than uniform, and falling
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert all(r["peak_mem_bytes"] > 0 and r["tok_per_s"] > 0 and r["flops_per_s"] > 0 for r in train)
    assert all(r["mfu"] is None or 0 < r["mfu"] <= 1 for r in train)

    capsys.readouterr()
    code = cli.main(["sample", str(out), "--prompt", "Return the", "--max-new-tokens", "25", "--num-samples", "2"])
    text = capsys.readouterr().out
    assert code == 0 and text.count("Return the") == 2 and "sample 2" in text


def test_bench_reports(capsys):
    code = cli.main(["bench", "gpt.n_layer=1", "gpt.n_head=2", "gpt.n_embd=32", "gpt.block_size=16", "batch_size=2", "--steps", "2",
                     "--warmup", "1"])
    out = capsys.readouterr().out
    assert code == 0
    for key in ("tokens/s", "GFLOP/s", "MFU", "peak memory", "matmul ", "synthetic vocabulary of 65 tokens"):
        assert key in out
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert ("allocator keep" if glibc else "allocator system") in out
    # conftest runs torch on 2 threads: auto gives each thread one of the 2 sequences.
    assert "strategy=cpu_shards (1 process, 2 batch shards)" in out
    code = cli.main(["bench", "gpt.n_layer=1", "gpt.n_head=2", "gpt.n_embd=32", "gpt.block_size=16", "batch_size=2", "strategy=single",
                     "--steps", "1", "--warmup", "0"])
    assert code == 0 and "strategy=single" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["batchsize=3"], "unknown config key 'batchsize'. Did you mean 'batch_size'?"),
        (["batch_size=three"], "batch_size must be int, got 'three'"),
        (["batch_size=0"], "batch_size must be a positive integer, got 0"),
        (["resume=must"], "resume=must but"),
        (["gpt.block_size=40000"], "fewer than gpt.block_size+1 = 40001"),
        (["strategy=cpu_shards", "gpt.dropout=0.1"],
         "strategy=cpu_shards cannot be used with dropout > 0 (in transformer.drop): use strategy=single"),
        (["strategy=cpu_shards", "cpu_shards.n=5"], "cpu_shards.n=5 is more than batch_size=4"),
        (["cpu_shards.n=2"], "cpu_shards.n applies to strategy=cpu_shards, but strategy=auto"),
        (["method=badam", "strategy=ddp"], "strategy=ddp needs torchrun"),
    ],
)
def test_train_bad_input(tiny_args, capsys, extra, message):
    code, err = run(["train", *tiny_args, "max_iters=2", *extra], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_train_missing_data_and_unknown_argument(tmp_path, capsys):
    code, err = run(["train", f"data={tmp_path / 'nope'}", *TINY], capsys)
    assert code == 2 and "data folder" in err and "does not exist" in err and "slimtune prepare" in err
    code, err = run(["train", "oops"], capsys)
    assert code == 2 and "unexpected argument 'oops'" in err


def test_too_short_data(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("abcdefghij" * 3)
    run(["prepare", tmp_path / "t.txt", "--out", tmp_path / "d", "--no-progress"])
    code, err = run(["train", f"data={tmp_path / 'd'}", f"out_dir={tmp_path / 'o'}", *TINY], capsys)
    assert code == 2 and "train.bin holds 27 tokens, fewer than gpt.block_size+1 = 33" in err


def test_non_utf8_prepare_exit_code(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"ok line\n\xff\xfe broken\n")
    code, err = run(["prepare", tmp_path / "bad.txt", "--out", tmp_path / "d"], capsys)
    assert code == 2 and "not valid UTF-8 at byte offset 8 (line 2)" in err


def test_resume_explicit_missing_checkpoint(tiny_args, tmp_path, capsys):
    code, err = run(["train", *tiny_args, f"resume={tmp_path / 'out' / 'step-000100'}"], capsys)
    assert code == 2 and "no such checkpoint folder" in err


def test_checkpoint_from_different_model_config(tiny_args, capsys):
    assert run(["train", *tiny_args, "max_iters=2", "eval.interval=0"])[0] == 0
    code, err = run(["train", *tiny_args, "max_iters=4", "gpt.n_embd=64"], capsys)
    assert code == 2 and "trained with a different model" in err and "n_embd: checkpoint 32 vs config 64" in err


def test_sample_bad_checkpoint(tmp_path, capsys):
    code, err = run(["sample", tmp_path], capsys)
    assert code == 2 and "neither a checkpoint folder nor an out_dir" in err
