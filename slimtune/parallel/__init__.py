"""Strategies: where tensors live and how gradients meet (see `slimtune.parallel.base`)."""

from __future__ import annotations

import os

import torch

from slimtune.registry import STRATEGIES

AUTO_ORDER = ("cpu_shards",)
"""In one process, `strategy=auto` takes the first of these whose `auto_applies` says yes, else `single` (under
torchrun it is `ddp`)."""


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_strategy(cfg, device: torch.device):
    """The strategy the processes are started with, set up: the one named, or for `auto` ddp under torchrun and
    otherwise `single` (which `finish_auto_choice` may still replace once the model exists)."""
    name = cfg.strategy
    if name == "auto":
        name = "ddp" if launched_by_torchrun() else "single"
    strategy = STRATEGIES.get(name)(cfg)
    strategy.device = strategy.setup(device)
    return strategy


def finish_auto_choice(strategy, cfg, method, model):
    """For `strategy=auto` in one process: the first single-process strategy of AUTO_ORDER that applies to this
    method and model (e.g. cpu_shards for small models on CPU), else `strategy` unchanged."""
    if cfg.strategy != "auto" or strategy.world_size > 1:
        return strategy
    for name in AUTO_ORDER:
        cls = STRATEGIES.get(name)
        if cls.auto_applies(cfg, strategy.device, method, model):
            chosen = cls(cfg)
            chosen.device = chosen.setup(strategy.device)
            return chosen
    return strategy
