"""Training records: one JSON line per logged step in `metrics.jsonl` (mirrored to the experiment trackers of
`log.report_to`), and a `loss.png` plot at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from slimtune.memory import format_bytes
from slimtune.train.trackers import Trackers


class MetricsLog:
    """Append-only JSONL metrics, flushed per line so a crash loses nothing already logged. Every record written
    also goes to the run's experiment trackers (`trackers`, see `slimtune.train.trackers`; none until the run opens
    them)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.trackers = Trackers()

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > `step` (written by a run that died after its last checkpoint), so a resumed run's
        log reads as one uninterrupted run."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.log(record)

    def close(self) -> None:
        """Finish the trackers (metrics.jsonl itself is always complete)."""
        self.trackers.close()

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


class Progress:
    """The progress bar of a run: loss, speed (tokens/s, or seconds per step when steps are slow), MFU, peak memory.
    Other output goes through `tqdm.write`, which prints above the bar."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, disable=not enabled)
        self._tok_s = None

    def update(self, loss: float, seconds: float, tokens: int, mfu: float | None, peak_bytes: int,
               uncertain: bool = False) -> None:
        self.bar.update(1)
        if self.bar.disable:
            return
        rate = tokens / seconds
        self._tok_s = rate if self._tok_s is None else 0.9 * self._tok_s + 0.1 * rate
        # Fine-tunes of real models run a step in seconds: "3 tok/s"-style numbers would mislead, so slow steps
        # show seconds per step (the tokens/s stay in metrics.jsonl).
        speed = f"{seconds:.2f} s/step" if seconds >= 1.0 else f"{self._tok_s:,.0f} tok/s"
        util = "MFU ? (peak uncertain)" if uncertain else "" if mfu is None else f"MFU {mfu:.0%}"
        parts = [f"loss {loss:.4f}", speed, util, f"peak {format_bytes(peak_bytes)}"]
        self.bar.set_postfix_str(" | ".join(p for p in parts if p), refresh=False)

    def close(self) -> None:
        self.bar.close()


def plot_losses(records: list[dict], out_path: str | Path) -> Path | None:
    """Plot training loss per step and train/val loss at evaluations; returns the PNG path (None if nothing)."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train (batch)", linewidth=0.8, alpha=0.7)
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
        if all("val_loss" in r for r in evals):
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "s-", label="val (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
