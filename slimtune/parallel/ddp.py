"""Data parallelism with torch's own DistributedDataParallel, launched by `torchrun`.

`torchrun --nproc_per_node=N -m slimtune train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we join the process group
(NCCL on CUDA, gloo elsewhere) and let DDP average gradients. slimtune adds no distributed engine of its own.
Every rank draws its own share of each global batch; the loss of a step is normalised by the target tokens of the
whole global batch (counted on every rank and summed before backward), so N processes on batch_size B give the
same gradients as one process on N x B.
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
            raise SlimtuneError("strategy=ddp needs torchrun: torchrun --nproc_per_node=N -m slimtune train ...")
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
        if not method.fixed_trainable_set:
            raise SlimtuneError(
                f"method={method.name} cannot run under strategy=ddp: DDP fixes the set of parameters with gradients "
                f"when it wraps the model, and {method.name} changes it during training. Train it in one process "
                f"(strategy=single), or use a sharded strategy once it is available")

    def wrap(self, model: nn.Module) -> nn.Module:
        ids = [self.local_rank] if self._device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

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
