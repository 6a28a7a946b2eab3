"""Experiment trackers (log.report_to): TensorBoard's scalars equal metrics.jsonl's, W&B writes an offline run, a
missing library names its extra, a failing tracker never stops the run, a fresh run archives the tracker folders."""

import json

import pytest

from slimtune import train
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.train import trackers
from slimtune.train.checkpoint import archive_previous_run
from slimtune.train.trackers import Tracker, Trackers, scalars

FAST = ["log.progress=false", "log.plot=false", "eval.iters=1", "optim.warmup_iters=1", "dataset.max_seq_len=64",
        "batch_size=4", "runtime.threads=1", "log.interval=1", "dataset.val_fraction=0.1"]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_scalars_equal_metrics_jsonl(llama_dir, chat_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST, "max_iters=4", "eval.interval=2",
          "method=badam", "badam.switch_every=2", "badam.switch_mode=ascending", "log.report_to=tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = records(out)
    expected: dict[str, list] = {}
    for record in logged:
        step = record.get("step", expected_step(logged, record))
        for tag, value in scalars(record).items():
            expected.setdefault(tag, []).append((step, value))
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tok_per_s", "train/peak_mem_bytes", "eval/val_loss",
            "plan/predicted_peak_bytes", "switch/analytic_state_bytes", "peak/measured_peak_bytes"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in values], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in values], rel=1e-6), tag
    # BAdam's block switches and the other events as text; the resolved config as text and hyper-parameters.
    text_tags = set(events.Tags()["tensors"])
    assert {"events/switch/text_summary", "events/plan/text_summary", "config/text_summary"} <= text_tags


def expected_step(logged: list[dict], record: dict) -> int:
    """Records without a step (plan, peak) belong to the last step logged before them."""
    before = logged[:logged.index(record)]
    return max([r["step"] for r in before if "step" in r], default=0)


def test_wandb_offline_writes_a_run_folder(llama_dir, chat_file, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    train(f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST, "max_iters=2", "eval.interval=2",
          "log.report_to=wandb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert "report_to=wandb failed" not in capsys.readouterr().err
    # Resumed (resume=auto from the step-2 checkpoint), the run continues the same W&B run id.
    run_id = (out / "wandb" / "run-id").read_text().strip()
    assert runs[0].name.endswith(f"-{run_id}")
    train(f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST, "max_iters=3", "eval.interval=2",
          "log.report_to=wandb")
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    assert "report_to=wandb failed" not in capsys.readouterr().err


def test_mlflow_writes_its_store_in_out_dir(llama_dir, chat_file, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "ml"
    train(f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST, "max_iters=2", "eval.interval=2",
          "log.report_to=mlflow")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    history = mlflow.MlflowClient().get_metric_history(mlflow.search_runs(output_format="list",
                                                                          search_all_experiments=True)[0].info.run_id,
                                                       "train.loss")
    assert [m.step for m in history] == [1, 2]
    assert list((out / "mlruns" / "artifacts").rglob("step-000000.json"))  # the plan record as an event text


def test_a_missing_tracker_library_names_the_extra(monkeypatch):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    for name in ("tensorboard", "wandb", "mlflow"):
        with pytest.raises(SlimtuneError, match=rf"log.report_to={name} needs the \w+ library.*pip install "
                                                rf"'slimtune\[{name}\]'"):
            make_config(TrainConfig, overrides=["model=m", f"log.report_to={name}"])


def test_report_to_names():
    assert make_config(TrainConfig, overrides=["log.report_to=none"]).log.report_to == []
    with pytest.raises(SlimtuneError, match=r"log.report_to='tensorbord' is not one of .* Did you mean 'tensorboard'"):
        make_config(TrainConfig, overrides=["log.report_to=tensorbord"])


class Broken(Tracker):
    name = "broken"

    def __init__(self):
        self.calls = 0

    def log_scalars(self, values, step):
        self.calls += 1
        raise ConnectionError("service unreachable")

    def close(self):
        pass


class Recorder(Tracker):
    name = "recorder"

    def __init__(self):
        self.seen = []

    def log_scalars(self, values, step):
        self.seen.append((step, values))

    def log_text(self, tag, text, step):
        self.seen.append((step, tag))

    def close(self):
        pass


def test_a_failing_tracker_is_dropped_with_one_warning(capsys):
    broken, recorder = Broken(), Recorder()
    group = Trackers([broken, recorder])
    group.log({"kind": "train", "step": 1, "loss": 2.0, "grad_norm": None, "time": 5.0})
    group.log({"kind": "plan", "predicted_peak_bytes": 10, "parts": {"weights": 4}})
    group.log({"kind": "train", "step": 2, "loss": 1.5})
    group.close()
    assert broken.calls == 1 and capsys.readouterr().err.count("report_to=broken failed") == 1
    assert recorder.seen == [(1, {"train/loss": 2.0}),
                             (1, {"plan/predicted_peak_bytes": 10.0, "plan/parts/weights": 4.0}), (1, "events/plan"),
                             (2, {"train/loss": 1.5})]


def test_a_fresh_run_archives_the_tracker_folders(tmp_path):
    for name in ("tensorboard", "wandb", "mlruns"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    (tmp_path / "data-cache").mkdir()
    archived = archive_previous_run(tmp_path)
    assert {p.name for p in archived.iterdir()} == {"tensorboard", "wandb", "mlruns"}
    assert (tmp_path / "data-cache").is_dir()  # the tokenized cache stays for the next run
