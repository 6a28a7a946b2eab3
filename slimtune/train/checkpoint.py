"""Self-describing, crash-safe, self-validating checkpoints: `out_dir/step-NNNNNN/`.

A checkpoint folder holds everything to sample from the model or resume training exactly:

    model.safetensors     weights (tied tensors stored once), or adapter_model.safetensors: the workload's
                          `write_files(folder)` callback writes these, plus any tokenizer / HF config files
    model_config.json     the architecture (what `slimtune sample` rebuilds the model from)
    optimizer.pt          optimizer state, including any method state (e.g. BAdam's block order and generator)
    trainer.pt            step, RNG states of every rank, data-sampler positions of every rank
    config.yaml           the resolved training config
    checkpoint.json       the manifest, written last: {"format": 1, "step": N, "files": {relative path: bytes}}

Writing: everything goes into a hidden `.step-NNNNNN.tmp-<pid>-<random>` folder, is fsynced, and the folder is
renamed into place, so a crash leaves either the previous checkpoint set or the new one. A folder without
`checkpoint.json` is never listed, so a save that died before its manifest can never be resumed from.

Reading: `validate_checkpoint` compares the folder with its manifest (missing or resized files), checks that every
`*.safetensors` header describes exactly the bytes on disk, and that `optimizer.pt` / `trainer.pt` are intact zip
archives. It reads headers only (milliseconds, whatever the model size). `resolve_resume` uses it to skip damaged
checkpoints (with a warning; they are never deleted) and to refuse an explicitly named damaged one.

Housekeeping: `clean_stale_temp_dirs` removes temp folders whose writer process is gone; `archive_previous_run`
moves another run's results out of the way of a fresh run (into `previous-runs/`), so `keep_last` pruning only
ever sees this run's checkpoints. Nothing here deletes a finished checkpoint except `keep_last` pruning, and
pruning only touches intact checkpoints older than the one just written.

Non-weight files are loaded with `torch.load(weights_only=True)`: no pickle code runs on load.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model

from slimtune.atomic import fsync_dir, fsync_file
from slimtune.errors import SlimtuneError
from slimtune.train.trackers import TRACKER_DIRS

MANIFEST = "checkpoint.json"
MANIFEST_FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d{6,})$")
# Hidden folders a save leaves behind if it dies: `.step-NNNNNN.tmp-<pid>-<random>` (being written) and
# `.step-NNNNNN.old-<pid>-<random>` (the previous copy of a step being re-saved).
WRITER_DIR = re.compile(r"^\.(step-\d{6,})\.(tmp|old)-(\d+)-[A-Za-z0-9_]+$")
# Left by versions before the manifest, which did not record the writer: `tempfile.mkdtemp` names and `.old`.
LEGACY_TMP_DIR = re.compile(r"^\.(step-\d{6,})\.[a-z0-9_]{8}$")
LEGACY_OLD_DIR = re.compile(r"^\.(step-\d{6,})\.old$")
# What a training run writes at the top of out_dir besides its step folders; `archive_previous_run` moves these.
RUN_OUTPUT_PATTERNS = ("metrics.jsonl", "loss.png", "config.yaml", "plan.*", "*.log")
ARCHIVE_DIR = "previous-runs"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _step_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """All `step-NNNNNN` folders in `out_dir`, with or without a manifest, oldest first."""
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """`step-NNNNNN` folders in `out_dir` that have a manifest, oldest first. Temporary folders are never listed,
    nor folders without `checkpoint.json` (an interrupted save, or a version of slimtune before manifests)."""
    return [p for _, p in _step_dirs(Path(out_dir)) if (p / MANIFEST).is_file()]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint with a manifest (not validated: see `resolve_resume` for that)."""
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


# --- writing ------------------------------------------------------------------------------------------------------

def new_checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """A fresh temporary folder for step `step`'s checkpoint, named so that `clean_stale_temp_dirs` can tell whether
    the process writing it still runs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{step_dir_name(step)}.tmp-{os.getpid()}-", dir=out_dir))


def save_checkpoint(out_dir: str | Path, step: int, write_files: Callable[[Path], None], optimizer_state: dict,
                    trainer_state: dict, config: dict, model_config: dict, keep_last: int = 0,
                    tmp: Path | None = None) -> Path:
    """Write `out_dir/step-NNNNNN/` atomically, then prune to the newest `keep_last` (0 keeps all). Returns the path.

    `write_files(folder)` writes the weights (e.g. `model.safetensors`) and any tokenizer / config files into the
    temporary folder; this function adds optimizer.pt, trainer.pt, model_config.json, config.yaml and, last, the
    manifest. `tmp` is a folder from `new_checkpoint_dir` that other processes may already have added files to.
    Saving a step that already exists replaces it."""
    out_dir = Path(out_dir)
    final = out_dir / step_dir_name(step)
    tmp = tmp if tmp is not None else new_checkpoint_dir(out_dir, step)
    try:
        write_files(tmp)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "model_config.json").write_text(json.dumps(model_config, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        files = _file_sizes(tmp)
        files.pop(MANIFEST, None)  # a callback must not pre-empt the manifest; it describes the others
        for rel in files:
            fsync_file(tmp / rel)
        # The manifest goes last and is flushed only after the data: its presence means every listed byte is on disk.
        manifest = tmp / MANIFEST
        manifest.write_text(json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1))
        fsync_file(manifest)
        for folder in {(tmp / rel).parent for rel in files} | {tmp}:
            fsync_dir(folder)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            # There is no portable atomic swap of two folders: for a moment the step exists only as `old` (and as
            # the complete `tmp`); `clean_stale_temp_dirs` puts `old` back if we die right here.
            old = out_dir / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(out_dir)
            shutil.rmtree(old, ignore_errors=True)  # leftovers carry our PID: a later run's cleanup removes them
        else:
            os.replace(tmp, final)
        fsync_dir(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last > 0:
        _prune(out_dir, step, keep_last)
    return final


def _prune(out_dir: Path, step: int, keep_last: int) -> None:
    """Delete intact, manifest-listed checkpoints older than `step`, keeping the newest `keep_last` counting
    `step` itself. Newer steps (another branch of the run) and damaged folders (kept for inspection) stay."""
    older = [p for p in list_checkpoints(out_dir) if int(STEP_DIR.match(p.name).group(1)) < step]
    intact = [p for p in older if not validate_checkpoint(p)]
    for p in intact[:max(0, len(intact) - (keep_last - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def _file_sizes(folder: Path) -> dict[str, int]:
    """{path relative to `folder` with / separators: size in bytes} for every file below `folder`."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    return dict(sorted(sizes.items()))


# --- validating ---------------------------------------------------------------------------------------------------

def validate_checkpoint(path: str | Path) -> list[str]:
    """Problems with the checkpoint folder `path`, each a short phrase naming the file; empty when intact.

    Cheap: compares sizes with the manifest, parses safetensors headers and looks for the zip directory of the
    .pt files, without loading any tensor."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return [f"{MANIFEST} is missing (the save was interrupted, or it was written before slimtune kept manifests)"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{MANIFEST} is unreadable ({e})"]
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return [f"{MANIFEST} is not a format-{MANIFEST_FORMAT} slimtune manifest"]
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        return [f"{MANIFEST} is unreadable (no 'files' table of sizes)"]

    problems = []
    step_match = STEP_DIR.match(path.name)
    if step_match and manifest.get("step") != int(step_match.group(1)):
        problems.append(f"{MANIFEST} is for step {manifest.get('step')}, not {int(step_match.group(1))}")
    damaged = set()
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
            damaged.add(rel)
            continue
        size = file.stat().st_size
        if size < expected:
            problems.append(f"{rel} is truncated ({size:,} of {expected:,} bytes)")
            damaged.add(rel)
        elif size > expected:
            problems.append(f"{rel} has {size:,} bytes, the manifest says {expected:,}")
            damaged.add(rel)
    for name in ("optimizer.pt", "trainer.pt", "model_config.json"):
        if name not in files and not (path / name).is_file():
            problems.append(f"{name} is missing")
            damaged.add(name)
    for rel in sorted(files):
        if rel in damaged:
            continue  # one problem per file is enough
        if rel.endswith(".safetensors"):
            problem = _safetensors_problem(path / rel, rel)
        elif rel in ("optimizer.pt", "trainer.pt"):
            problem = None if zipfile.is_zipfile(path / rel) else f"{rel} is not a readable torch archive"
        else:
            problem = None
        if problem:
            problems.append(problem)
    return problems


def _safetensors_problem(file: Path, rel: str) -> str | None:
    """Why the safetensors header of `file` does not describe exactly its bytes, or None.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [start, end]}}
    (plus an optional "__metadata__"), then the tensor data; offsets count from the end of the header."""
    size = file.stat().st_size
    if size < 8:
        return f"{rel} is too short for a safetensors file ({size:,} bytes)"
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            return f"{rel} is truncated (its header alone needs {8 + header_len:,} bytes, the file has {size:,})"
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{rel} has an unreadable safetensors header"
    if not isinstance(header, dict):
        return f"{rel} has an unreadable safetensors header"
    data_len = size - 8 - header_len
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            return f"{rel} has an unreadable safetensors header (tensor {name!r})"
        if offsets[1] > data_len:
            end = 8 + header_len + offsets[1]
            return f"{rel} is truncated (tensor {name!r} ends at byte {end:,}, the file has {size:,})"
        end_max = max(end_max, offsets[1])
    if end_max != data_len:
        return f"{rel} has {data_len - end_max:,} bytes after its last tensor"
    return None


# --- reading ------------------------------------------------------------------------------------------------------

def save_state_dict(source: torch.nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    """Write a module's weights, or a whole model's state dict gathered by a sharding strategy, as safetensors.
    Tied weights are stored once: in a state dict they are one tensor under several names (the first name is kept,
    and `load_model_weights` ties the others back)."""
    if isinstance(source, torch.nn.Module):
        save_model(source, str(path))
        return
    first_name: dict[tuple, str] = {}
    tensors = {}
    for name, tensor in source.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in first_name:
            continue
        first_name[key] = name
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(path))


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    path = Path(ckpt) / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError) as e:
        raise SlimtuneError(f"{path} cannot be read ({e}); the checkpoint is damaged: resume with resume=auto "
                            f"(it skips damaged checkpoints) or name another step-NNNNNN folder") from e
    except RuntimeError as e:  # load_state_dict: a tensor of the wrong shape
        raise SlimtuneError(f"{path} does not match the model: {e}") from e
    if missing or unexpected:
        raise SlimtuneError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def load_state(ckpt: Path, name: str) -> dict:
    """Load `optimizer.pt` or `trainer.pt` with weights_only=True (tensors and plain containers only)."""
    path = Path(ckpt) / name
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:  # torch reports a damaged zip archive as RuntimeError
        raise SlimtuneError(f"{path} cannot be read ({e}); the checkpoint is damaged: resume with resume=auto "
                            f"(it skips damaged checkpoints) or name another step-NNNNNN folder") from e


def read_model_config(ckpt: Path) -> dict:
    path = Path(ckpt) / "model_config.json"
    if not path.is_file():
        raise SlimtuneError(f"{ckpt} is not a slimtune checkpoint folder (no model_config.json)")
    return json.loads(path.read_text())


def resolve_resume(resume: str, out_dir: str | Path, warn: Callable[[str], object] = print) -> Path | None:
    """Map the `resume` setting to an intact checkpoint folder, or None for a fresh start.

    auto / must: the newest step folder that validates; each newer damaged one is reported through `warn` and left
    in place. never: None. A path: that folder, which must validate."""
    if resume == "never":
        return None
    if resume in ("auto", "must"):
        damaged = []
        for _, ckpt in reversed(_step_dirs(Path(out_dir))):
            problems = validate_checkpoint(ckpt)
            if not problems:
                return ckpt
            damaged.append(ckpt.name)
            warn(f"warning: skipping checkpoint {ckpt}, it cannot be resumed from: {'; '.join(problems)} "
                 f"(left in place)")
        if resume == "must":
            found = f" (damaged: {', '.join(damaged)})" if damaged else ""
            raise SlimtuneError(
                f"resume=must but {out_dir} has no intact checkpoint (step-NNNNNN folder){found}; "
                f"use resume=auto to start fresh when none exists"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise SlimtuneError(
            f"resume={resume}: no such checkpoint folder (use auto, never, must, or a step-NNNNNN path)")
    problems = validate_checkpoint(path)
    if problems:
        raise SlimtuneError(f"resume={resume}: the checkpoint is damaged: {'; '.join(problems)}. "
                            f"Use resume=auto to continue from the newest intact checkpoint in out_dir instead")
    return path


# --- housekeeping -------------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates the process instead of probing it: assume alive, keep the folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists but belongs to another user
        return True
    return True


def clean_stale_temp_dirs(out_dir: str | Path) -> list[Path]:
    """Remove hidden temp folders in `out_dir` left by saves whose process is gone. Returns the removed folders.

    Folders naming a live PID are kept (a save may be running in another process). Legacy temp folders (no PID)
    are removed. A leftover previous copy (`.step-NNNNNN.old...`) whose step folder is missing is the only copy of
    that step, from a save that died mid-swap: it is renamed back into place rather than removed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    for p in sorted(out_dir.iterdir()):
        if not p.is_dir() or p.is_symlink():
            continue
        if m := WRITER_DIR.match(p.name):
            step_name, kind, pid = m.group(1), m.group(2), int(m.group(3))
            if _pid_alive(pid):
                continue
        elif m := LEGACY_OLD_DIR.match(p.name):
            step_name, kind = m.group(1), "old"
        elif m := LEGACY_TMP_DIR.match(p.name):
            step_name, kind = m.group(1), "tmp"
        else:
            continue
        final = out_dir / step_name
        if kind == "old" and not final.exists():
            os.replace(p, final)
            continue
        try:
            shutil.rmtree(p)
        except OSError:
            continue  # e.g. permissions: left for the next run to retry, and not reported as removed
        removed.append(p)
    return removed


def archive_previous_run(out_dir: str | Path) -> Path | None:
    """Move another run's results out of `out_dir` before a fresh run; returns the archive folder, or None.

    Moves the step-NNNNNN folders, the experiment trackers' folders (`TRACKER_DIRS`) and the top-level files in
    `RUN_OUTPUT_PATTERNS` into `out_dir/previous-runs/run-YYYYmmdd-HHMMSS[-N]/`, a new folder every time. Nothing is deleted. Without this, a
    fresh run's `keep_last` pruning would count the old run's checkpoints (and delete the new one)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    items = sorted(p for p in out_dir.iterdir()
                   if (STEP_DIR.match(p.name) and p.is_dir())
                   or (p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_OUTPUT_PATTERNS))
                   or (p.is_dir() and p.name in TRACKER_DIRS))
    if not items:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archives = out_dir / ARCHIVE_DIR
    archives.mkdir(exist_ok=True)
    dest, n = archives / f"run-{stamp}", 1
    while True:
        try:
            dest.mkdir()  # never reuse a folder: the existence check and the claim are one step
            break
        except FileExistsError:
            n += 1
            dest = archives / f"run-{stamp}-{n}"
    for p in items:
        os.replace(p, dest / p.name)  # same file system: a rename, no copy
    fsync_dir(dest)
    fsync_dir(out_dir)
    return dest
