"""Writing a folder atomically: fill a temporary sibling, then rename it into place.

A crash or a failed write therefore never leaves a half-written folder under the final name, and a failed write
leaves nothing at all. Exports, quantized folders, `slimtune prepare` data folders, the GGUF conversion cache and the
tokenized-data cache are written this way. Checkpoints (`slimtune.train.checkpoint`) follow the same rule with more
to it (every rank writes into the temporary folder, a manifest, fsync before the rename, the writer's PID in the
names so that a later run can clean up after a dead one), and use the fsync helpers here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from slimtune.errors import SlimtuneError


def check_new_folder(folder: str | Path, overwrite: bool) -> Path:
    """An output folder must be new or empty unless `overwrite`; checked before the work that fills it."""
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())) and not overwrite:
        raise SlimtuneError(f"output folder {folder} already exists and is not empty; choose another folder or pass "
                            "--overwrite")
    return folder


def write_folder_atomically(target: str | Path, write: Callable[[Path], None], *, replace: bool = False,
                            exist_ok: bool = False) -> Path:
    """Call `write(tmp)` on an empty temporary folder next to `target` (the same file system, so the rename is
    atomic), then rename it to `target`; returns `target`.

    A `target` that exists by then is, with `replace`, replaced once the new folder is complete; with `exist_ok`,
    kept, and the new folder discarded (a concurrent writer finished first, and its copy is equivalent); otherwise
    the rename fails unless `target` is an empty folder."""
    target = Path(target)
    tmp = _make_tmp_dir(target)
    try:
        write(tmp)
        if replace:
            _replace_folder(tmp, target)
            return target
        try:
            os.rename(tmp, target)
        except OSError:
            if exist_ok and target.is_dir():
                shutil.rmtree(tmp)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _make_tmp_dir(target: Path) -> Path:
    """A hidden temporary folder next to `target`, with the permissions a plain mkdir gives (mkdtemp's are 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _replace_folder(tmp: Path, target: Path) -> None:
    """Rename the complete folder `tmp` to `target`, replacing an existing `target` only then."""
    if target.exists():
        # Move the old folder aside first: rename cannot replace a non-empty directory.
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable. Some platforms (Windows) cannot open a folder: nothing to do
    there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. file systems without directory fsync; the data files themselves were fsynced
    finally:
        os.close(fd)
