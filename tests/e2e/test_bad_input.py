"""What a new user hits: a table of bad inputs, each answered with exit code 2, one message naming the file, line or
key, and never a traceback. A crash (an unexpected exception) is a short message plus a saved traceback, exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune import cli
from tests.conftest import TINY
from tests.tiny_hf import one_torch_thread, save_tiny_bert, save_tiny_llama  # noqa: F401


@pytest.fixture(scope="module")
def files(tmp_path_factory, char_data):
    """Every input a case needs, made once: good ones to break, and broken ones."""
    d = tmp_path_factory.mktemp("bad")
    f = {"gpt_data": char_data, "dir": d}
    f["llama"] = save_tiny_llama(d / "llama")
    f["bert"] = save_tiny_bert(d / "bert")
    good = {"instruction": "reverse: a b", "output": "b a"}
    (d / "good.jsonl").write_text("\n".join(json.dumps(good) for _ in range(8)) + "\n")
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n\n  \n")
    (d / "malformed.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    (d / "nofields.jsonl").write_text(json.dumps({"foo": 1, "bar": 2}) + "\n")
    (d / "wrongtype.jsonl").write_text(json.dumps({"instruction": 5, "output": ["x"]}) + "\n")
    (d / "nolabel.jsonl").write_text(json.dumps({"text": "good film"}) + "\n")
    (d / "latin1.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    (d / "bad.yaml").write_text("lr: [1, 2\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "afile").write_text("x")
    (d / "fake.gguf").write_bytes(b"not a gguf file at all")
    (d / "nonempty").mkdir()
    (d / "nonempty" / "x").write_text("x")
    (d / "tiny.txt").write_text("abcdefghij" * 3)
    (d / "latin1.txt").write_bytes(b"ok\n\xff\xfe\n")
    (d / "prompts.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    return f


def gpt(f, *extra):
    return ["train", f"data={f['gpt_data']}", f"out_dir={f['dir'] / 'out-gpt'}", *TINY, "max_iters=2", *extra]


def hf(f, data="good.jsonl", *extra):
    return ["train", f"model={f['llama']}", f"data={f['dir'] / data}", f"out_dir={f['dir'] / 'out-hf'}", "max_iters=1",
            "batch_size=2", "log.progress=false", "log.plot=false", "eval.interval=0", *extra]


CASES = {
    # data
    "gpt data folder missing": (lambda f: gpt(f, f"data={f['dir'] / 'nope'}"), "does not exist"),
    "gpt data too short": (lambda f: ["prepare", f["dir"] / "tiny.txt", "--out", f["dir"] / "tinydata",
                                      "--no-progress"], None),
    "prepare non-UTF-8": (lambda f: ["prepare", f["dir"] / "latin1.txt", "--out", f["dir"] / "l"],
                          "not valid UTF-8 at byte offset 3 (line 2)"),
    "prepare nothing": (lambda f: ["prepare", "--out", f["dir"] / "n"], "give input text files"),
    "empty JSONL": (lambda f: hf(f, "empty.jsonl"), "has no records"),
    "blank JSONL": (lambda f: hf(f, "blank.jsonl"), "has no records"),
    "malformed JSONL line": (lambda f: hf(f, "malformed.jsonl"), "malformed.jsonl:2"),
    "records without known fields": (lambda f: hf(f, "nofields.jsonl"), "nofields.jsonl"),
    "fields of the wrong type": (lambda f: hf(f, "wrongtype.jsonl"), "wrongtype.jsonl"),
    "non-UTF-8 JSONL": (lambda f: hf(f, "latin1.jsonl"), "latin1.jsonl"),
    "data file missing": (lambda f: hf(f, "missing.jsonl"), "missing.jsonl"),
    "val_data file missing": (lambda f: hf(f, "good.jsonl", f"dataset.val_data={f['dir'] / 'noval.jsonl'}"),
                              "noval.jsonl"),
    "column_map to a missing column": (lambda f: hf(f, "good.jsonl", "dataset.column_map.instruction=question"),
                                       "question"),
    "classification without labels": (lambda f: ["train", f"model={f['bert']}", "hf.task=classify",
                                                 f"data={f['dir'] / 'nolabel.jsonl'}", f"out_dir={f['dir'] / 'c'}"],
                                      "nolabel.jsonl"),
    # config
    "unknown key": (lambda f: gpt(f, "batchsize=3"), "unknown config key 'batchsize'. Did you mean 'batch_size'?"),
    "wrong type": (lambda f: gpt(f, "batch_size=three"), "batch_size must be int, got 'three'"),
    "non-positive batch": (lambda f: gpt(f, "batch_size=0"), "batch_size must be a positive integer"),
    "negative lr": (lambda f: gpt(f, "lr=-1"), "lr must be > 0"),
    "bad YAML": (lambda f: ["train", f["dir"] / "bad.yaml"], "bad.yaml:2: invalid YAML"),
    "YAML not a mapping": (lambda f: ["train", f["dir"] / "list.yaml"], "must be a mapping"),
    "config file missing": (lambda f: ["train", f["dir"] / "nope.yaml"], "nope.yaml does not exist"),
    "unexpected argument": (lambda f: ["train", "oops"], "unexpected argument 'oops'"),
    "unknown method": (lambda f: gpt(f, "method=lora2"), "method='lora2' is not one of"),
    "unknown strategy": (lambda f: gpt(f, "strategy=fsdb"), "strategy='fsdb' is not one of"),
    "heads do not divide width": (lambda f: gpt(f, "gpt.n_head=5"), "divisible by gpt.n_head=5"),
    "GPT key with an HF model": (lambda f: hf(f, "good.jsonl", "gpt.n_layer=4"), "gpt.n_layer sets slimtune's GPT"),
    "method key for another method": (lambda f: gpt(f, "badam.switch_every=3"), "applies to method=badam"),
    "strategy ddp without torchrun": (lambda f: gpt(f, "strategy=ddp"), "strategy=ddp needs torchrun"),
    "device not present": (lambda f: gpt(f, "runtime.device=cuda"), "no CUDA GPU"),
    "fp16 on CPU": (lambda f: gpt(f, "runtime.precision=fp16", "runtime.device=cpu"),
                    "runtime.precision=fp16 is not supported on CPU"),
    # out_dir and resume
    "out_dir is a file": (lambda f: gpt(f, f"out_dir={f['dir'] / 'afile'}"), "is a file, not a folder"),
    "out_dir below a file": (lambda f: gpt(f, f"out_dir={f['dir'] / 'afile' / 'sub'}"), "cannot be written"),
    "resume=must without checkpoint": (lambda f: gpt(f, f"out_dir={f['dir'] / 'fresh'}", "resume=must"),
                                       "resume=must but"),
    "resume to a missing folder": (lambda f: gpt(f, f"resume={f['dir'] / 'step-000100'}"), "no such checkpoint"),
    # models
    "model path missing": (lambda f: hf(f, "good.jsonl", f"model={f['dir'] / 'nomodel'}"), "nomodel"),
    "non-GGUF .gguf file": (lambda f: hf(f, "good.jsonl", f"model={f['dir'] / 'fake.gguf'}"), "fake.gguf"),
    # other verbs
    "sample a folder without checkpoints": (lambda f: ["sample", f["dir"] / "nonempty"], "neither a checkpoint"),
    "export into a non-empty folder": (lambda f: ["export", f["llama"], f["dir"] / "nonempty"], "--overwrite"),
    "eval data missing": (lambda f: ["eval", f["llama"], "--data", f["dir"] / "nodata.jsonl"], "nodata.jsonl"),
    "eval model missing": (lambda f: ["eval", f["dir"] / "nomodel", "--data", f["dir"] / "good.jsonl"], "nomodel"),
    "generate with prompt and input": (lambda f: ["generate", f["llama"], "--prompt", "x", "--input",
                                                  f["dir"] / "prompts.jsonl"], "either --prompt"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_message(files, name, capsys):
    make_args, message = CASES[name]
    code = cli.main([str(a) for a in make_args(files)])
    captured = capsys.readouterr()
    if message is None:  # a warning, not an error: the corpus is accepted but flagged
        assert code == 0 and "warning:" in captured.err
        return
    assert code == 2, (name, captured.err[-2000:])
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err
    assert message in captured.err, captured.err


class _AnyPath(dict):
    """Stands in for the `files` fixture: every input a case names, as a path that does not exist."""

    def __missing__(self, key: str) -> Path:
        return Path("/nonexistent") / key


def test_every_case_runs_a_verb_and_expects_a_specific_message():
    """The table itself, so that the test above cannot pass vacuously: at least thirty error cases, each running a
    real verb and expecting a specific text (an empty one would match any error); the warning case is the only one
    without."""
    for name, (make_args, message) in CASES.items():
        assert str(make_args(_AnyPath())[0]) in cli.COMMANDS, name
        assert message is None or (isinstance(message, str) and len(message.strip()) >= 4), name
    assert [name for name, (_, message) in CASES.items() if message is None] == ["gpt data too short"]
    assert sum(message is not None for _, message in CASES.values()) >= 30


def test_an_unexpected_exception_is_a_short_message_and_a_saved_traceback(tmp_path, capsys, monkeypatch):
    from slimtune.train import loop

    def broken(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(loop, "train", broken)
    code = cli.main(["train", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "internal error (ZeroDivisionError: a bug)" in err
    (saved,) = tmp_path.glob("slimtune-error-*.txt")
    assert str(saved) in err and "Traceback" in saved.read_text() and "ZeroDivisionError" in saved.read_text()


def test_damaged_newest_checkpoint_falls_back_with_a_warning(files, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main([str(a) for a in gpt(files, f"out_dir={out}", "max_iters=4", "ckpt.interval=2",
                                         "eval.interval=0")]) == 0
    weights = out / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    capsys.readouterr()
    code = cli.main([str(a) for a in gpt(files, f"out_dir={out}", f"resume={out / 'step-000004'}")])
    err = capsys.readouterr().err
    assert code == 2 and "model.safetensors" in err and "Traceback" not in err
    assert cli.main([str(a) for a in gpt(files, f"out_dir={out}", "max_iters=3", "eval.interval=0")]) == 0
    said = capsys.readouterr()
    text = said.out + said.err
    assert "step-000004" in text and "model.safetensors" in text and "resumed from" in text
    assert f"{out / 'step-000002'} at step 2" in text
    assert weights.exists()  # the damaged one is reported, never deleted


def test_dry_run_resolves_everything_and_writes_nothing(files, tmp_path, capsys):
    out = tmp_path / "dry"
    assert cli.main([str(a) for a in gpt(files, f"out_dir={out}", "--dry-run")]) == 0
    text = capsys.readouterr().out
    assert "resolved config:" in text and "n_layer: 2" in text and "start: fresh" in text
    assert "warning: optim.warmup_iters=2 is not shorter than max_iters=2" in text
    assert not out.exists()
    assert cli.main([str(a) for a in hf(files, "missing.jsonl", "--dry-run")]) == 2


def test_config_is_written_before_the_first_step(files, tmp_path, capsys, monkeypatch):
    from slimtune.train import loop

    seen = {}

    def first_step(run):
        seen["config"] = (Path(run.cfg.out_dir) / "config.yaml").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_step", first_step)
    cli.main([str(a) for a in gpt(files, f"out_dir={tmp_path / 'c'}")])
    assert seen == {"config": True} and f"config: {tmp_path / 'c' / 'config.yaml'}" in capsys.readouterr().out
