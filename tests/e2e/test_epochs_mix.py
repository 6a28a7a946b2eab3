"""Fine-tuning on the data people already have: parquet / Arrow / save_to_disk / ShareGPT train with the batches of
the equivalent JSONL, a weighted mix of two files resumes exactly, and num_epochs sets the run's length."""

import json
import shutil

import pytest

from slimtune import train
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError

datasets = pytest.importorskip("datasets")

FAST = ["log.progress=false", "log.plot=false", "optim.warmup_iters=1", "dataset.max_seq_len=128", "batch_size=4",
        "runtime.threads=1", "log.interval=1", "eval.interval=0", "dataset.val_fraction=0"]


def records(out, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out, "train")}


def test_parquet_arrow_saved_folder_and_sharegpt_train_like_the_jsonl(llama_dir, chat_file, tmp_path):
    rows = [json.loads(line) for line in chat_file.read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "chat.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]}
             for r in rows]
    (tmp_path / "share.jsonl").write_text("".join(json.dumps(r) + "\n" for r in share))
    inputs = {"jsonl": chat_file, "parquet": tmp_path / "chat.parquet", "saved": tmp_path / "saved",
              "arrow": next((tmp_path / "saved").glob("*.arrow")), "sharegpt": tmp_path / "share.jsonl"}
    for name, path in inputs.items():
        train(f"model={llama_dir}", f"data={path}", f"out_dir={tmp_path / name}", *FAST, "max_iters=3")
    expected = losses(tmp_path / "jsonl")
    assert sorted(expected) == [1, 2, 3]
    for name in inputs:
        assert losses(tmp_path / name) == expected, name


def test_a_weighted_mix_of_two_files_with_their_own_column_maps_resumes_exactly(llama_dir, chat_file, tmp_path):
    alpaca = [{"question": f"reverse the words: {w} {v}", "answer": f"{v} {w}"}
              for w, v in zip("apple river stone cloud tree lake".split(), "sun moon star hill road sea".split())]
    datasets.Dataset.from_list(alpaca).to_parquet(str(tmp_path / "qa.parquet"))
    config = tmp_path / "mix.yaml"
    config.write_text(f"data:\n  - {chat_file}\n  - path: {tmp_path / 'qa.parquet'}\n"
                      "    column_map: {instruction: question, output: answer}\n"
                      "dataset:\n  weights: [0.7, 0.3]\n")
    out = tmp_path / "mix"
    args = [str(config), f"model={llama_dir}", f"out_dir={out}", *FAST, "max_iters=8", "ckpt.interval=4"]
    cfg = make_config(TrainConfig, [args[0]], args[1:])
    train(cfg)
    straight = losses(out)
    shutil.rmtree(out / "step-000008")  # as if the run died after its checkpoint at step 4
    train(make_config(TrainConfig, [args[0]], args[1:]))
    assert losses(out) == straight and sorted(straight) == list(range(1, 9))


def test_num_epochs_sets_the_steps_and_logs_each_epoch(llama_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "epochs"
    # 40 conversations in batches of 4: 10 batches per epoch, 2 per step, so 2 epochs are 10 steps.
    result = train(f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST, "num_epochs=2",
                   "optim.grad_accum=2")
    assert result.step == 10 and max(losses(out)) == 10
    assert [(r["step"], r["epoch"]) for r in records(out, "epoch")] == [(5, 1), (10, 2)]
    assert "epoch 1 done at step 5 (10 batches per epoch)" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["num_epochs=2", "max_iters=10"], r"num_epochs=2 and max_iters=10 \(command line\) both set the length"),
    (["data=[a.jsonl,b.jsonl]", "dataset.weights=[1,2,3]"], r"has 3 weights for 2 data file\(s\)"),
    (["data=[a.jsonl,b.jsonl]", "dataset.weights=[0,0]"], r"sum to 0; they must sum to a positive number"),
    (["data=[a.jsonl,b.jsonl]", "dataset.weights=[1,-1]"], r"every weight must be a number >= 0, got -1"),
    (["num_epochs=0"], r"num_epochs must be > 0"),
])
def test_bad_run_lengths_and_weights_are_errors(overrides, message):
    with pytest.raises(SlimtuneError, match=message):
        make_config(TrainConfig, overrides=["model=some/model", "data=a.jsonl", *overrides])
