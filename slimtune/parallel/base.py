"""The Strategy interface: where tensors live and how gradients meet.

A strategy is one class registered by name (`@STRATEGIES.register("ddp")`, see `slimtune.registry`), optionally
with its own config section. The loop calls, in this order:

    setup(device)                  join the processes (if any); returns this rank's device
    check(method, model)           refuse a method it cannot run, saying why and what to use instead
                                   (a resumed run's weights are loaded into the whole model here, before sharding)
    shard(model, method)           the part of the model this rank trains (FSDP2 shards, a pipeline stage);
                                   the optimizer is built after it, from what it returns
    build_optimizer(method, model, ctx)
    load_optimizer_state_dict / load_shards      a resumed run's optimizer state
    wrap(model)                    the module the forward runs through (e.g. DistributedDataParallel)
    ... every step:
    forward_backward(model, workload, batches, precision)
                                   forward and backward over the micro-batches of one optimizer step, with the
                                   loss normalised by the target tokens of the whole step on all ranks
    optimizer_step(optimizer, precision, clip)
    on_trainable_change(model, forward_model)    after a step with method events (e.g. a BAdam block switch)
    all_sum / any / gather / barrier   collectives for metrics, stop signals and per-rank state
    eval_loss_sum(...) / evaluating()  evaluation of one batch, and the context around evaluation
    full_state_dict / optimizer_state_dict / save_shards / save(write)
                                   checkpoints: every checkpoint is one ordinary model that rank 0 writes (sharded
                                   strategies gather it first); per-rank shards may go beside it
    teardown()

Capabilities (class attributes a strategy declares; methods declare theirs, see `slimtune.methods.base`):

    follows_trainable_changes   True: `on_trainable_change` follows a method whose trainable set changes during
                                the run (`Method.fixed_trainable_set` False), e.g. by wrapping the model again.
                                False: what trains is fixed once set up, and `check` refuses such a method.

This base class is the single-process behaviour; `single` is exactly it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn as nn


class Strategy:
    name: ClassVar[str]
    config_cls: ClassVar[type | None] = None
    compute_threads: int | None = None
    """Threads one product runs on (None: torch's setting); kernel choices are timed at this count."""
    follows_trainable_changes: ClassVar[bool] = True
    """Whether `on_trainable_change` follows a method whose trainable set changes (see the module docstring)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.options = cfg.section(self.name) if self.config_cls is not None else None
        self.rank, self.local_rank, self.world_size = 0, 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which share of every global batch this rank reads (ranks of one model replica, such as a pipeline's
        stages, read the same share)."""
        return self.rank

    @property
    def data_world_size(self) -> int:
        """Shares every global batch is cut into: the number of model replicas."""
        return self.world_size

    @classmethod
    def auto_applies(cls, cfg, device: torch.device, method, model: nn.Module) -> bool:
        """Whether `strategy=auto` picks this single-process strategy for this method and model (asked in the
        order of `slimtune.parallel.AUTO_ORDER`)."""
        return False

    # -- set-up ---------------------------------------------------------------------------------------------------

    def setup(self, device: torch.device) -> torch.device:
        return device

    def check(self, method, model: nn.Module) -> None:
        pass

    def shard(self, model: nn.Module, method) -> nn.Module:
        """The module this rank trains (it becomes the run's model: the optimizer, clipping and the method see only
        it). Called with the whole, prepared model before the optimizer exists. One process trains all of it."""
        return model

    def build_optimizer(self, method, model: nn.Module, ctx) -> torch.optim.Optimizer:
        return method.build_optimizer(model, ctx)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def on_trainable_change(self, model: nn.Module, forward_model: nn.Module) -> nn.Module:
        """Called after a step whose method reported events: which parameters train may have changed (a BAdam
        block switch). Returns the module the next forward runs through: `forward_model`, or for a strategy that
        fixes the trainable set when it wraps (DDP), `model` wrapped again."""
        return forward_model

    def teardown(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.world_size} process(es)"

    # -- one optimizer step ---------------------------------------------------------------------------------------

    def forward_backward(self, model: nn.Module, workload, batches: Sequence[Any], precision) -> tuple[torch.Tensor, int]:
        """Forward and backward of every micro-batch; gradients are d(sum of token losses)/d(w) / (target tokens of
        the step on all ranks). Returns (sum of this rank's token losses, detached; this rank's target tokens)."""
        counts = [workload.count_targets(b) for b in batches]
        scale = self._loss_scale(sum(counts))
        total = torch.zeros((), device=precision.device)
        for i, batch in enumerate(batches):
            with self._no_sync(model, last=i == len(batches) - 1):
                with precision.autocast():
                    loss_sum = workload.loss_sum(model, batch)
                precision.backward(loss_sum * scale)
            total += loss_sum.detach().float()
        return total, sum(counts)

    def _loss_scale(self, local_targets: int) -> float:
        """1 / (target tokens of this step on all ranks), times the world size that gradient averaging divides by."""
        (global_targets,) = self.all_sum([float(local_targets)])
        return self.world_size / max(global_targets, 1.0)

    def _no_sync(self, model: nn.Module, last: bool):
        return contextlib.nullcontext()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, precision,
                       clip: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
        precision.unscale_(optimizer)
        grad_norm = clip() if clip is not None else None
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def eval_loss_sum(self, model: nn.Module, workload, batch, precision) -> tuple[float, int]:
        """(sum of token losses, target tokens) of one evaluation batch on this rank; the loop adds them over ranks."""
        with precision.autocast():
            loss = workload.loss_sum(model, batch).item()
        return loss, workload.count_targets(batch)

    @contextlib.contextmanager
    def evaluating(self):
        """Around evaluation (e.g. give the threads back to one process-wide pool)."""
        yield

    # -- collectives ----------------------------------------------------------------------------------------------

    def all_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def any(self, flag: bool) -> bool:
        return flag

    def gather(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Collective. On rank 0, the whole model's state dict (plain CPU tensors, keyed as the unsharded model's
        `state_dict()`) for the method to save as one ordinary model; None elsewhere. None on rank 0 too means the
        live model is whole and the method saves it directly (no copy)."""
        return None

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Collective. What rank 0 writes as the checkpoint's optimizer.pt (other ranks' result is not used)."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def save_shards(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Collective. Files every rank writes into the checkpoint's temporary `folder` (e.g. sharded optimizer state
        through torch.distributed.checkpoint) before rank 0 completes it; nothing by default."""

    def load_shards(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """On resume, after `load_optimizer_state_dict`: read what `save_shards` wrote."""

    def save(self, write: Callable[[], Any]):
        """Run `write` (which writes one ordinary checkpoint) on rank 0; every rank returns after it is done."""
        result = write() if self.is_main else None
        self.barrier()
        return result

    # -- planning -------------------------------------------------------------------------------------------------

    def estimate_memory(self, plan, spec, run):
        """What one rank holds (a `slimtune.plan.estimate.Plan`), given the method's single-device `plan` for the
        model `spec` and the run's settings `run` (`run.world_size` ranks). One process holds everything."""
        return plan

    def estimate_per_device(self, plan, spec, run) -> list:
        """One plan per rank, for `slimtune estimate`'s columns; every rank holds the same unless a strategy (a
        pipeline, whose stages differ) says otherwise."""
        return [self.estimate_memory(plan, spec, run)] * run.world_size
