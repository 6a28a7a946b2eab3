"""Data parallelism with torch's own DistributedDataParallel, launched by `torchrun`.

`torchrun --nproc_per_node=N -m slimtune train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we join the process group
(NCCL on CUDA, gloo elsewhere) and let DDP average gradients. slimtune adds no distributed engine of its own.
Every rank draws its own share of each global batch; the loss of a step is normalised by the target tokens of the
whole global batch (counted on every rank and summed before backward), so N processes on batch_size B give the
same gradients as one process on N x B.

DDP fixes the parameters it averages when it wraps the model; a method that changes them (BAdam switching blocks)
gets the model wrapped again after each change (`on_trainable_change`). A subclass that wraps the model otherwise
follows such changes in its own `on_trainable_change`, or declares `follows_trainable_changes = False`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.parallel.base import Strategy
from slimtune.registry import STRATEGIES


@STRATEGIES.register("ddp")
class DDP(Strategy):
    """One full replica per process; gradients all-reduced by torch.nn.parallel.DistributedDataParallel."""

    def setup(self, device: torch.device) -> torch.device:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise SlimtuneError(f"strategy={self.name} needs torchrun: torchrun --nproc_per_node=N -m slimtune "
                                f"train ... strategy={self.name}")
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self._device = device
        return device

    def check(self, method, model: nn.Module) -> None:
        if not method.fixed_trainable_set and not self.follows_trainable_changes:
            raise SlimtuneError(
                f"method={method.name} cannot run under strategy={self.name}: it changes which parameters train "
                f"during the run, and strategy={self.name} fixes them when it wraps the model. Use strategy=ddp or "
                f"strategy=fsdp")
        low_precision = next((n for n, p in model.named_parameters() if p.dtype in (torch.float16, torch.bfloat16)),
                             None)
        if not method.grads_in_param_grad and low_precision is not None:
            raise SlimtuneError(
                f"method={method.name} cannot run under strategy={self.name} with 16-bit weights ({low_precision}): "
                f"its hooks move each 16-bit gradient into an fp32 buffer as soon as it is computed, before DDP "
                f"averages it over the ranks. Set hf.weights_dtype=fp32 (runtime.precision still sets the compute "
                f"dtype), or use strategy=fsdp, which averages first")

    def wrap(self, model: nn.Module, init_sync: bool = True) -> nn.Module:
        # DDP registers its gradient hooks on the parameters that train when it wraps the model.
        self._wrapped_trainable = self._trainable(model)
        ids = [self.local_rank] if self._device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, init_sync=init_sync)

    def on_trainable_change(self, model: nn.Module, forward_model: nn.Module) -> nn.Module:
        # A method that changes what trains (BAdam switching blocks) gets a new DDP over the new set. The weights
        # are equal on every rank since the first wrap's broadcast, so the new one skips it.
        if self._trainable(model) == self._wrapped_trainable:
            return forward_model
        return self.wrap(model, init_sync=False)

    @staticmethod
    def _trainable(model: nn.Module) -> list[str]:
        return [name for name, p in model.named_parameters() if p.requires_grad]

    def _no_sync(self, model: nn.Module, last: bool):
        # Only the last micro-batch of a step all-reduces gradients.
        return model.no_sync() if not last else super()._no_sync(model, last)

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def estimate_memory(self, plan, spec, run):
        # A full replica per rank, plus the flat buckets the all-reduce copies every gradient into.
        from slimtune.plan.estimate import ddp

        return ddp(plan, run.world_size)
