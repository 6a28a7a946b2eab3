"""Writing an output folder (export, quantize) atomically: a temporary sibling renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from slimtune.errors import SlimtuneError


def write_folder(out_dir: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` on an empty temporary folder next to ``out_dir``, then rename it to ``out_dir``.

    An existing non-empty ``out_dir`` is an error unless ``overwrite``; it is then replaced only once the new
    folder is complete. A failed ``write`` leaves nothing behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        if not overwrite:
            raise SlimtuneError(f"output folder {out_dir} already exists and is not empty; choose another folder or "
                                "pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like a plain mkdir
    try:
        write(tmp)
        from slimtune.models.hf import replace_folder

        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
