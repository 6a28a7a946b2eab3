"""Self-describing, atomically written checkpoints: `out_dir/step-NNNNNN/`.

A checkpoint folder holds everything to sample from the model or resume training exactly:

    model.safetensors     weights (tied tensors stored once)
    model_config.json     the architecture (what `slimtune sample` rebuilds the model from)
    optimizer.pt          optimizer state, including any method state (e.g. BAdam's block order and generator)
    trainer.pt            step, RNG states of every rank, data-sampler positions of every rank
    config.yaml           the resolved training config
    meta.json, tokenizer/ the tokenizer description (and files) copied from the data folder

It is written into a hidden temporary folder and renamed into place, so a crash at any moment leaves either the
previous complete checkpoint set or the new one, never a half-written folder that `resume=auto` could pick.
Non-weight files are loaded with `torch.load(weights_only=True)`: no pickle code runs on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import load_model, save_model

from slimtune.errors import SlimtuneError

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in `out_dir`, oldest first (temporary folders are never listed)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "trainer.pt").is_file() and (p / "model.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer_state: dict, trainer_state: dict,
                    config: dict, model_config: dict, write_extra: Callable[[Path], None] | None = None,
                    keep_last: int = 0) -> Path:
    """Write `out_dir/step-NNNNNN/` atomically and prune to the newest `keep_last` (0 keeps all). Returns the path.

    `write_extra(folder)` adds the workload's own files (tokenizer, HF config) into the temporary folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out_dir))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "model_config.json").write_text(json.dumps(model_config, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if write_extra is not None:
            write_extra(tmp)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    missing, unexpected = load_model(model, str(Path(ckpt) / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise SlimtuneError(
            f"{ckpt}/model.safetensors does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_state(ckpt: Path, name: str) -> dict:
    """Load `optimizer.pt` or `trainer.pt` with weights_only=True (tensors and plain containers only)."""
    return torch.load(Path(ckpt) / name, map_location="cpu", weights_only=True)


def read_model_config(ckpt: Path) -> dict:
    path = Path(ckpt) / "model_config.json"
    if not path.is_file():
        raise SlimtuneError(f"{ckpt} is not a slimtune checkpoint folder (no model_config.json)")
    return json.loads(path.read_text())


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """Map the `resume` setting to a checkpoint folder, or None for a fresh start."""
    if resume == "never":
        return None
    if resume in ("auto", "must"):
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None and resume == "must":
            raise SlimtuneError(
                f"resume=must but {out_dir} has no complete checkpoint (step-NNNNNN folder); "
                f"use resume=auto to start fresh when none exists"
            )
        return ckpt
    path = Path(resume)
    if not path.is_dir():
        raise SlimtuneError(f"resume={resume}: no such checkpoint folder (use auto, never, must, or a step-NNNNNN path)")
    if not ((path / "trainer.pt").is_file() and (path / "model.safetensors").is_file()):
        raise SlimtuneError(f"resume={resume}: {path} is not a complete slimtune checkpoint (trainer.pt missing)")
    return path
