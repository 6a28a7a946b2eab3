"""Training: the loop, checkpoints, schedule, logging.

`slimtune.train(cfg)` trains: the package itself is callable (a `TrainConfig`, or `key=value` strings as on the
command line), so notebooks and tests need one import.
"""

from __future__ import annotations

import sys
import types


def train(cfg=None, *overrides: str):
    """Train with a `TrainConfig`, or build one from `key=value` strings (as `slimtune train` does)."""
    from slimtune.config import TrainConfig, make_config
    from slimtune.train.loop import train as run

    if cfg is None or isinstance(cfg, str):
        cfg = make_config(TrainConfig, overrides=[*([cfg] if cfg else []), *overrides])
    return run(cfg)


class _CallableModule(types.ModuleType):
    def __call__(self, cfg=None, *overrides: str):
        return train(cfg, *overrides)


sys.modules[__name__].__class__ = _CallableModule
