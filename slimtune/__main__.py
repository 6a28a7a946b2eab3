import os
import sys

from slimtune.cli import main


def exit_worker(code: int) -> None:
    """End a torchrun worker without the interpreter's shutdown. torch's DDP keeps references to the process group
    after it is destroyed (torch 2.13), so gloo's worker threads outlive it; if one of them drops its last
    collective's tensors while the interpreter shuts down, it needs the GIL that is gone and the process aborts
    (SIGABRT, "terminate called without an active exception") after a run that succeeded. Everything of the run is
    written and closed by now (checkpoints are renamed into place, logs and trackers closed); only the streams are
    flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # a worker of torchrun or the deepspeed launcher
        exit_worker(code)
    raise SystemExit(code)
