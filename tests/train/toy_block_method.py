"""A toy method whose trainable set changes during the run, built on the Method hooks alone (no BlockOptimizer):
the first and the second half of the transformer blocks train in turn, `toy_halves.switch_every` steps each.

Only the active half has optimizer state: its moments start afresh each time it becomes active (as under DeepSpeed,
whose engine is rebuilt with a fresh optimizer for every trainable set). Which half trains is the method's own state
(`state_dict`), so a resumed run trains the half it stopped in.

`register()` adds `method=toy_halves` (a test does, for its own duration); a `python -m slimtune` process run from
the repository root finds it through `SLIMTUNE_PLUGINS=tests.train.toy_block_plugin`, which calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.errors import SlimtuneError
from slimtune.methods.base import Method, build_adam
from slimtune.parallel.fsdp import block_list
from slimtune.registry import METHODS

NAME = "toy_halves"
PLUGIN = "tests.train.toy_block_plugin"
"""The module a SLIMTUNE_PLUGINS list names to register the toy in another process."""


@dataclass
class ToyHalvesConfig:
    """Toy method: the two halves of the transformer blocks train in turn."""

    switch_every: int = 2
    """Optimizer steps of one half before the other half trains."""

    def __post_init__(self):
        if self.switch_every < 1:
            raise SlimtuneError(f"toy_halves.switch_every must be >= 1, got {self.switch_every}")


class ToyHalves(Method):
    config_cls = ToyHalvesConfig
    fixed_trainable_set = False

    def prepare(self, model):
        blocks = block_list(model)
        if blocks is None or len(blocks) < 2:
            raise SlimtuneError("method=toy_halves needs a model with at least 2 transformer blocks")
        ids = [{id(p) for p in block.parameters()} for block in blocks]
        half = len(blocks) // 2
        first, second = set().union(*ids[:half]), set().union(*ids[half:])
        self.halves = ([n for n, p in model.named_parameters() if id(p) in first],
                       [n for n, p in model.named_parameters() if id(p) in second])
        self.active = 0
        self._params = dict(model.named_parameters())
        self._activate(0)
        return model

    def _activate(self, half: int) -> None:
        self.active = half
        trains = set(self.halves[half])
        for name, p in self._params.items():
            p.requires_grad_(name in trains)

    def build_optimizer(self, model, ctx):
        # The strategy may have replaced the parameters (FSDP2's sharded ones): take them from the model it gives.
        self._params = dict(model.named_parameters())
        self._activate(self.active)
        both = [self._params[n] for half in self.halves for n in half]
        groups = [{"params": [p for p in both if p.dim() >= 2], "weight_decay": self.cfg.optim.weight_decay},
                  {"params": [p for p in both if p.dim() < 2], "weight_decay": 0.0}]
        return build_adam(groups, self.cfg, ctx.device)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> list[dict]:
        if step % self.options.switch_every:
            return []
        old = self.active
        for name in self.halves[old]:  # its moments start afresh when it trains again
            optimizer.state.pop(self._params[name], None)
        self._activate(1 - old)
        return [{"kind": "toy_switch", "step": step, "half": self.active,
                 "message": f"step {step}: toy_halves trains half {self.active}"}]

    def state_dict(self) -> dict:
        return {"active": self.active}

    def load_state_dict(self, state: dict) -> None:
        self._activate(state.get("active", 0))


def register() -> None:
    METHODS.register(NAME)(ToyHalves)
