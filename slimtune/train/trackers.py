"""Experiment trackers (`log.report_to`): every record written to metrics.jsonl also goes to TensorBoard, Weights &
Biases and/or MLflow, through their own libraries (optional extras).

A record becomes, in each tracker:

    train, eval   scalars `train/loss`, `train/lr`, ..., `eval/val_loss` at the record's step
    other kinds   (plan, peak, switch, epoch, ...) their numbers as scalars `KIND/FIELD` (e.g.
                  `plan/predicted_peak_bytes`, `epoch/epoch`), and the whole record as text under `events/KIND`

The resolved config is logged once as hyper-parameters. Only the main process reports (the loop passes no trackers
to the others). A tracker library that is not installed is an error before anything trains (it names the extra);
a tracker that fails while the run trains (a full disk, an unreachable W&B service) prints one warning and is
dropped, because losing a dashboard must never cost the training run.

Files go under out_dir: `tensorboard/`, `wandb/` (W&B's run folders; `WANDB_MODE=offline` writes them without a
network, `wandb sync` uploads them later) and `mlruns/` (MLflow's SQLite store `mlflow.db` and its artifacts,
unless `MLFLOW_TRACKING_URI` names another store). A fresh run moves an earlier run's folders into
out_dir/previous-runs/ with its other results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import sys
from pathlib import Path

from slimtune.errors import SlimtuneError

TRACKER_DIRS = ("tensorboard", "wandb", "mlruns")
"""Folders the trackers write in out_dir (archived with the run's other results)."""
SCALAR_KINDS = ("train", "eval")
NOT_SCALARS = ("kind", "step", "time")


def check_installed(names: list[str]) -> None:
    """A SlimtuneError naming the extra to install for the first tracker in `names` whose library is missing (each
    tracker's library, and the slimtune extra that installs it, have the tracker's name)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise SlimtuneError(f"log.report_to={name} needs the {name} library, which is not installed: "
                                f"pip install 'slimtune[{name}]' (or remove {name} from log.report_to)")


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record as `{tag: value}`: `train/loss`, `eval/val_loss`, `plan/parts/weights`.
    Missing values (None), flags (bools) and the step and wall time are left out."""
    out = {}
    head = prefix or f"{record['kind']}/"
    for key, value in record.items():
        if key in NOT_SCALARS and not prefix:
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{head}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[head + key] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """`{"optim": {"lr": 1}}` → `{"optim.lr": 1}`; lists and empty values as text (what hyper-parameter tables
    take)."""
    out: dict = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return out


class Tracker:
    """One tracker's side of `Trackers`: the config once, then scalars and event text at steps."""

    name: str

    def log_config(self, config: dict) -> None:
        raise NotImplementedError

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_text(self, tag: str, text: str, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, out_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides what a crashed run logged after its last checkpoint (as metrics.jsonl does)
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log_config(self, config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(flat_config(config), {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in _yaml(config).splitlines()))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, out_dir: Path, start_step: int):
        import wandb

        # A short start timeout (unless WANDB_INIT_TIMEOUT sets one): an unreachable service fails the start in
        # about 10-20 s (a warning; training goes on) instead of holding the run for W&B's default 90 s. Logging
        # itself is asynchronous and never waits for the network.
        timeout = {} if "WANDB_INIT_TIMEOUT" in os.environ else {"init_timeout": 10}
        # A resumed run continues its W&B run (same id; offline, a new folder with that id, which `wandb sync`
        # adds to the same run). W&B keeps steps increasing: steps logged after the checkpoint and before the
        # interruption are not logged again.
        run_id = _run_id(out_dir / "wandb", start_step, lambda: secrets.token_hex(4))  # W&B's 8-character ids
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "slimtune"), name=out_dir.resolve().name,
                              dir=str(out_dir), id=run_id, resume="allow",
                              settings=wandb.Settings(console="off", **timeout))

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: text}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, out_dir: Path, start_step: int):
        import mlflow

        self.mlflow = mlflow
        experiment = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow's own store in out_dir: runs in an SQLite database (its file store is deprecated), artifacts
            # (the event texts) beside it rather than in the working directory.
            folder = (out_dir / "mlruns").resolve()
            folder.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
            found = mlflow.get_experiment_by_name("slimtune")
            experiment = found.experiment_id if found else mlflow.create_experiment(
                "slimtune", artifact_location=(folder / "artifacts").as_uri())
        # A resumed run continues its MLflow run (the id kept in out_dir/mlruns/run-id).
        folder = out_dir / "mlruns"
        previous = _run_id(folder, start_step, lambda: None)
        self.run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(
            experiment_id=experiment, run_name=out_dir.resolve().name)
        if not previous:
            _run_id(folder, 0, lambda: self.run.info.run_id)

    def log_config(self, config: dict) -> None:
        self.mlflow.log_params(flat_config(config))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({tag.replace("/", "."): v for tag, v in values.items()}, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.mlflow.log_text(text, f"{tag}/step-{step:06d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


def _run_id(folder: Path, start_step: int, new) -> str | None:
    """The tracker run id of this out_dir: the one kept in `folder`/run-id when the run resumes (start_step > 0),
    else ``new()``, which is kept there for a later resume."""
    path = folder / "run-id"
    if start_step > 0 and path.is_file():
        return path.read_text().strip()
    run_id = new()
    if run_id:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


TRACKERS = {cls.name: cls for cls in (TensorBoardTracker, WandbTracker, MlflowTracker)}


class Trackers:
    """The trackers of one run, fed with metrics records (`log`). A tracker that raises is dropped with a warning."""

    def __init__(self, trackers: list[Tracker] = ()):
        self.trackers = list(trackers)
        self.step = 0

    @classmethod
    def open(cls, names: list[str], out_dir: Path, start_step: int, config: dict) -> "Trackers":
        """Start the trackers `names` writing under `out_dir` from `start_step` on, and log `config` to each."""
        check_installed(names)
        out = cls()
        out.step = start_step
        for name in names:
            out._call(name, lambda: out.trackers.append(TRACKERS[name](Path(out_dir), start_step)))
        out._each(lambda t: t.log_config(config))
        return out

    def log(self, record: dict) -> None:
        """Report one metrics record (see the module docstring); records without a step belong to the last step."""
        self.step = record.get("step", self.step)
        values = scalars(record)
        if values:
            self._each(lambda t: t.log_scalars(values, self.step))
        if record["kind"] not in SCALAR_KINDS:
            text = json.dumps(record)
            self._each(lambda t: t.log_text(f"events/{record['kind']}", text, self.step))

    def close(self) -> None:
        self._each(lambda t: t.close())
        self.trackers = []

    def _each(self, action) -> None:
        for tracker in list(self.trackers):
            if not self._call(tracker.name, lambda: action(tracker)):
                self.trackers.remove(tracker)

    @staticmethod
    def _call(name: str, action) -> bool:
        # Any failure of a tracker library (network, disk, its own bugs) is reported, and that tracker stops; the
        # run and metrics.jsonl go on.
        try:
            action()
            return True
        except Exception as exc:  # noqa: BLE001 - see above: a dashboard must not end a training run
            print(f"warning: log.report_to={name} failed ({type(exc).__name__}: {exc}); the run continues without "
                  f"{name} (metrics.jsonl has every record)", file=sys.stderr)
            return False


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
