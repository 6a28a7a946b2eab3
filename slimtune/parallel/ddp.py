"""Data parallelism with torch's own DistributedDataParallel, launched by `torchrun`.

`torchrun --nproc_per_node=N -m slimtune train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we join the process group
(NCCL on CUDA, gloo elsewhere) and let DDP average gradients. slimtune adds no distributed engine of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> DistEnv:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1); a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend)
    return env


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: float, env: DistEnv, device: torch.device) -> float:
    """Mean of a Python float over all ranks (identity for one process)."""
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / env.world_size


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (used to stop all ranks together on a signal)."""
    if not env.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order (only meaningful on rank 0; others get the same list)."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
