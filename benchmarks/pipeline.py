"""Pipeline splitting: the partitioner's plan against measured stage times, and pipelined throughput.

For an MLP, a CNN with skip connections, a small ViT (the cases of the old pipeline_tool: FFNET, CNN, ViT) and
slimtune's GPT, and for 2 and 4 stages:

- planned max/mean: the slowest stage's time over the mean stage time, from the profiled unit times summed per stage
  (the exact partition of `slimtune.parallel.partition`, balance=time);
- measured max/mean: the same stages run as one module each (forward + backward of a micro-batch, median of
  repeats), which includes what the per-unit sums miss (cache effects between units, per-call overheads);
- ratio = measured / planned (target <= 1.15);
- the equal-layer split's measured max/mean beside it;
- bubble fraction of 1F1B with the run's micro-batches;
- pipelined throughput: N processes (gloo, one torch thread each) running torch's Schedule1F1B over the planned
  stages, against the unsplit model in one process on one thread (same batch, same micro-batches).

    .venv/bin/python benchmarks/pipeline.py            # all models, 2 and 4 stages
    .venv/bin/python benchmarks/pipeline.py --models gpt --stages 2 --steps 5

On a 2-core CPU, 4 stages run 4 processes on 2 cores: oversubscribed, so their throughput measures the pipeline's
overhead, not a speed-up. The plan-vs-measured columns do not depend on that: they run in one process.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimtune.host import cpu_class  # noqa: E402
from slimtune.parallel.partition import bubble_fraction, equal_layer_split, stage_costs  # noqa: E402
from slimtune.parallel.pipeline import PipelineRunner, plan_partition  # noqa: E402
from slimtune.parallel.profile import profile_units  # noqa: E402
from slimtune.parallel.units import Chain, cut_units, fx_units  # noqa: E402

MICROBATCHES = 4


# ---------------------------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------------------------


class FFNet(nn.Module):
    """An MLP of uneven widths (so equal layer counts are not equal work)."""

    def __init__(self, widths=(256, 1024, 1024, 512, 2048, 256, 512, 128), classes: int = 10):
        super().__init__()
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            self.add_module(f"fc{i}", nn.Sequential(nn.Linear(a, b), nn.ReLU()))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class CNN(nn.Module):
    """Residual stages that halve the resolution and double the channels: early blocks cost the most time."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block1, self.block2 = ResBlock(16), ResBlock(16)
        self.down1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.block3, self.block4 = ResBlock(32), ResBlock(32)
        self.down2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.block5, self.block6 = ResBlock(64), ResBlock(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        skip = x
        x = self.block2(self.block1(x)) + skip  # a skip over two blocks: it crosses unit boundaries
        x = self.block4(self.block3(F.relu(self.down1(x))))
        x = self.block6(self.block5(F.relu(self.down2(x))))
        return self.head(x.mean(dim=(2, 3)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        shape = (x.shape[0], x.shape[1], self.heads, x.shape[2] // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, head dim)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image: int = 32, patch: int = 4, dim: int = 128, depth: int = 6, heads: int = 4):
        super().__init__()
        self.patches = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        for i in range(depth):
            self.add_module(f"block{i}", ViTBlock(dim, heads))
        self.depth = depth
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, images):
        x = self.patches(images).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for i in range(self.depth):
            x = getattr(self, f"block{i}")(x)
        return self.head(self.norm(x[:, 0]))


def make_case(name: str, batch: int):
    """(units, a batch, the unsplit loss of a micro-batch) for a model with fixed seeds."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "gpt":
        from slimtune.models.gpt import GPT, GPTConfig

        model = GPT(GPTConfig(block_size=128, vocab_size=512, n_layer=8, n_head=4, n_embd=128))
        units = cut_units(model)
        ids = torch.randint(0, 512, (batch, 129), generator=g)
        return model, units, (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    model, shape = {"mlp": (FFNet(), (256,)), "cnn": (CNN(), (3, 32, 32)), "vit": (ViT(), (3, 32, 32))}[name]
    units = fx_units(model)
    return model, units, (torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def micro(batch, n: int, i: int):
    return tuple(t.tensor_split(n)[i] for t in batch)


def measured_stage_seconds(units, parts, batch, repeats: int) -> list[float]:
    """Forward + backward seconds of each stage run as one module on its real inputs (one micro-batch), median."""
    args, target = units.inputs(micro(batch, MICROBATCHES, 0))
    values = args
    out = []
    for s, part in enumerate(parts):
        stage = Chain([units.modules[i] for i in part])
        inputs = tuple(v.detach().requires_grad_(v.is_floating_point()) for v in values)
        times = []
        for rep in range(repeats + 1):
            start = time.perf_counter()
            result = stage(*inputs)
            if s == len(parts) - 1:
                units.loss_sum(result, target).backward()
            else:
                outs = [r for r in (result if isinstance(result, tuple) else (result,)) if r.requires_grad]
                torch.autograd.backward(outs, [torch.ones_like(r) for r in outs])
            if rep:
                times.append(time.perf_counter() - start)
        out.append(statistics.median(times))
        values = tuple(r.detach() for r in (result if isinstance(result, tuple) else (result,)))
    for module in units.modules:
        module.zero_grad(set_to_none=True)
    return out


def unsplit_seconds(model_name: str, batch_size: int, steps: int) -> float:
    """Median seconds of one step (forward + backward of all micro-batches) of the whole model, one thread."""
    model, units, batch = make_case(model_name, batch_size)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        for i in range(MICROBATCHES):
            args, target = units.inputs(micro(batch, MICROBATCHES, i))
            values = args
            for unit in units.modules:
                out = unit(*values)
                values = out if isinstance(out, tuple) else (out,)
            units.loss_sum(values[0], target).backward()
        if step:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def _pipelined_worker(rank: int, world: int, port: int, model_name: str, batch_size: int, parts, steps: int, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, units, batch = make_case(model_name, batch_size)
        runner = PipelineRunner(units, parts, "1f1b", MICROBATCHES, torch.device("cpu"))
        times = []
        for step in range(steps + 1):
            dist.barrier()
            start = time.perf_counter()
            runner.step(batch, 1.0)
            dist.barrier()
            if step:
                times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        if rank == 0:
            out["seconds"] = statistics.median(times)
    finally:
        dist.destroy_process_group()


def pipelined_seconds(model_name: str, batch_size: int, parts, steps: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_pipelined_worker, args=(len(parts), port, model_name, batch_size, parts, steps, out),
                           nprocs=len(parts), start_method="spawn")
        return out["seconds"]


def max_over_mean(values: list[float]) -> float:
    return max(values) / (sum(values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mlp", "cnn", "vit", "gpt"])
    parser.add_argument("--stages", nargs="*", type=int, default=[2, 4])
    parser.add_argument("--batch", type=int, default=64, help="rows per step (split into 4 micro-batches)")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per unit and per stage")
    parser.add_argument("--steps", type=int, default=10, help="timed pipelined / unsplit steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"host: {cpu_class()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; one torch thread per "
          f"process; batch {args.batch} in {MICROBATCHES} micro-batches; schedule 1f1b")
    print("| model | units | stages | planned max/mean | measured max/mean | measured/planned | equal-layer measured "
          "max/mean | bubble | pipelined steps/s | unsplit steps/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model, units, batch = make_case(name, args.batch)
        costs = profile_units(units, micro(batch, MICROBATCHES, 0), repeats=args.repeats)
        unsplit = unsplit_seconds(name, args.batch, args.steps)
        for stages in args.stages:
            parts = plan_partition(costs, stages, "1f1b", MICROBATCHES)
            planned = max_over_mean(stage_costs(costs.seconds, parts))
            measured = max_over_mean(measured_stage_seconds(units, parts, batch, args.repeats))
            equal = max_over_mean(measured_stage_seconds(units, equal_layer_split(len(units), stages), batch,
                                                         args.repeats))
            piped = pipelined_seconds(name, args.batch, parts, args.steps)
            print(f"| {name} | {len(units)} | {stages} | {planned:.2f} | {measured:.2f} | {measured / planned:.2f} | "
                  f"{equal:.2f} | {bubble_fraction('1f1b', stages, MICROBATCHES):.2f} | {1 / piped:.1f} | "
                  f"{1 / unsplit:.1f} | {unsplit / piped:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
