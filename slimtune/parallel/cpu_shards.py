"""strategy=cpu_shards: one micro-batch's forward and backward split by rows over threads, one core each.

Why: at the sizes people train from scratch on a CPU, one op (a 768x128 @ 128x512 product, a GELU, a small
attention) is too small to keep several cores busy, and every parallel op pays a fork/join. Giving each core its
own rows of the batch and running every op single-threaded keeps both cores busy for the whole step (measured in
docs/BENCHMARKS.md §1b). torch releases the GIL inside its ops, so Python threads are enough.

Because the workload's loss is a sum over target tokens (normalised by the step's target count), any batch splits
by rows without weights: the shards' sums add up to the micro-batch's sum, whatever the tokens per row.

What stays exact: each shard runs single-threaded, so its result does not depend on scheduling; shard 0
back-propagates into `.grad`, the others return their gradients, which are added in shard order. A run with the
same number of shards is therefore bit-for-bit repeatable and resumes exactly. Against an unsharded run the
gradients differ by float rounding (a different summation order), not more. The price is memory: one extra
gradient copy per extra shard while they are added.

What is refused (and where `auto` stays off): random ops in the forward (dropout draws from one global
generator, in an order the threads would race for), methods that act on gradients through hooks (BAdam), fp16
loss scaling, compiled models, more shards than rows, non-CPU devices.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.parallel.base import Strategy
from slimtune.registry import STRATEGIES

AUTO_MAX_EXTRA_GRAD_BYTES = 256 * 2**20
"""`strategy=auto` shards only while the extra gradient copies fit in this many bytes (64M fp32 parameters on 2
cores): small models gain the most, and a large model's extra copies would cost real memory."""


@dataclass
class CpuShardsConfig:
    """Row shards of each micro-batch on one-core threads (strategy=cpu_shards)."""

    n: int = 0
    """Shards per micro-batch; 0 = one per torch thread (at most batch_size)."""

    def __post_init__(self):
        if self.n < 0 or self.n == 1:
            raise SlimtuneError(f"cpu_shards.n must be 0 (one per thread) or >= 2, got {self.n}; for no shards use "
                                f"strategy=single")


def _blockers(cfg, device: torch.device, method, model: nn.Module) -> list[str]:
    """Settings that make sharding unsupported, each written as the user would write it."""
    out = []
    if device.type != "cpu":
        out.append(f"device {device} (CPU only)")
    if not method.grads_in_param_grad:
        out.append(f"method={method.name} (it acts on gradients through hooks)")
    dropout = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropout:
        out.append(f"dropout > 0 (in {dropout[0]})")
    if cfg.runtime.compile:
        out.append("runtime.compile=true")
    if cfg.runtime.precision == "fp16":
        out.append("runtime.precision=fp16")
    return out


def _split_rows(batch, n: int) -> list:
    """`batch` (a tensor, or a tuple/list/dict of tensors with the same first dimension) as `n` row shards."""
    if torch.is_tensor(batch):
        return list(batch.tensor_split(n))
    if isinstance(batch, dict):
        parts = {k: _split_rows(v, n) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(n)]
    parts = [_split_rows(v, n) for v in batch]
    return [type(batch)(p[i] for p in parts) for i in range(n)]


@STRATEGIES.register("cpu_shards")
class CpuShards(Strategy):
    """Row shards of every micro-batch on one-core threads; gradients added in a fixed order."""

    config_cls = CpuShardsConfig
    compute_threads = 1

    @classmethod
    def auto_applies(cls, cfg, device: torch.device, method, model: nn.Module) -> bool:
        n = min(torch.get_num_threads(), cfg.batch_size)
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return (n >= 2 and not _blockers(cfg, device, method, model)
                and (n - 1) * grad_bytes <= AUTO_MAX_EXTRA_GRAD_BYTES)

    def setup(self, device: torch.device) -> torch.device:
        self.n = self.options.n or min(torch.get_num_threads(), self.cfg.batch_size)
        if self.n < 2:
            raise SlimtuneError(f"strategy=cpu_shards needs at least 2 shards; torch has {torch.get_num_threads()} "
                                f"thread(s) and batch_size={self.cfg.batch_size}: set cpu_shards.n or runtime.threads")
        if self.n > self.cfg.batch_size:
            raise SlimtuneError(f"cpu_shards.n={self.n} is more than batch_size={self.cfg.batch_size}: every shard "
                                f"needs at least one sequence; lower cpu_shards.n or raise batch_size")
        self._sharded: ShardedBackward | None = None
        self._precision_autocast = None
        return device

    def check(self, method, model: nn.Module) -> None:
        blockers = _blockers(self.cfg, self.device, method, model)
        if blockers:
            raise SlimtuneError(f"strategy=cpu_shards cannot be used with {', '.join(blockers)}: use strategy=single, "
                                f"or change those settings")

    def describe(self) -> str:
        return f"1 process, {self.n} batch shards"

    def estimate_memory(self, plan, spec, run):
        # The shards together hold one micro-batch's activations; every shard but the first returns its own
        # gradient copy, alive while they are added.
        from slimtune.plan.estimate import Plan, format_bytes

        n = getattr(self, "n", 0) or self.options.n or min(torch.get_num_threads(), run.batch)
        extra = (n - 1) * plan.parts["gradients"]
        return plan + Plan(parts={"temporary": extra},
                           notes=[f"cpu_shards: {n} shards, {n - 1} extra gradient copies {format_bytes(extra)}"])

    def forward_backward(self, model, workload, batches, precision):
        if self._sharded is None:
            self._sharded = ShardedBackward(self.n, precision.autocast).__enter__()
        counts = [workload.count_targets(b) for b in batches]
        scale = self._loss_scale(sum(counts))
        trainable = [p for p in model.parameters() if p.requires_grad]
        total = torch.zeros((), device=precision.device)
        for batch in batches:
            shards = [(s, 1.0) for s in _split_rows(batch, self.n)]
            total += self._sharded(lambda b: workload.loss_sum(model, b), shards, scale, trainable).float()
        return total, sum(counts)

    @contextlib.contextmanager
    def evaluating(self):
        if self._sharded is None:
            yield
        else:
            with self._sharded.all_cores():
                yield

    def teardown(self) -> None:
        if self._sharded is not None:
            self._sharded.__exit__(None, None, None)
            self._sharded = None


class ShardedBackward:
    """Runs shard 0 on the calling thread and shards 1..n-1 on worker threads, every one of them single-threaded
    in torch. Use as a context manager; call it once per micro-batch. Shard i always runs on the same thread."""

    def __init__(self, n_shards: int, autocast: Callable[[], ContextManager]):
        if n_shards < 2:
            raise ValueError(f"ShardedBackward needs at least 2 shards, got {n_shards}")
        self.n = n_shards
        self._autocast = autocast
        self._tasks = [queue.SimpleQueue() for _ in range(n_shards - 1)]
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "ShardedBackward":
        self._main_threads = torch.get_num_threads()
        ready = threading.Barrier(self.n)
        for i in range(1, self.n):
            t = threading.Thread(target=self._work, args=(i, ready), name=f"slimtune-shard-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        ready.wait()
        # The calling thread computes shard 0 and, between micro-batches, clipping and the optimizer step, all on
        # one thread: an idle OpenMP team left by a parallel op spins for a while on the very cores the shards
        # need next (measured: 36 -> 41 ms per forward + backward on 2 cores), and the fused optimizer step was
        # no slower on one thread.
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        for q in self._tasks:
            q.put(None)
        for t in self._threads:
            t.join(timeout=60)
        self._threads.clear()
        torch.set_num_threads(self._main_threads)

    @contextlib.contextmanager
    def all_cores(self):
        """Inside: the calling thread uses all its threads again (for unsharded work such as evaluation)."""
        torch.set_num_threads(self._main_threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)

    def _work(self, index: int, ready: threading.Barrier) -> None:
        # Initialise torch's per-thread setting first, or its first parallel op would re-apply the global default.
        torch.get_num_threads()
        torch.set_num_threads(1)
        ready.wait()
        while (task := self._tasks[index - 1].get()) is not None:
            try:
                self._results.put((index, *self._run(*task)))
            except BaseException as exc:  # handed to the calling thread, which raises it
                self._results.put((index, exc, None))

    def _run(self, loss_fn, batch, scale: float, inputs: list[torch.Tensor] | None):
        """One shard's forward and backward: into `.grad` if `inputs` is None, else returned for `inputs`."""
        with self._autocast():
            loss = loss_fn(batch)
        if inputs is None:
            (loss * scale).backward()
            return loss.detach(), None
        return loss.detach(), torch.autograd.grad(loss * scale, inputs, allow_unused=True)

    def __call__(self, loss_fn: Callable[[Any], torch.Tensor], shards: Sequence[tuple[Any, float]], scale: float,
                 trainable: list[torch.Tensor]) -> torch.Tensor:
        """Forward and backward of every shard `(batch, weight)`: loss_fn(batch) * weight * scale is
        back-propagated. Gradients land in the parameters' `.grad`, added in shard order. Returns the detached
        sum of weight * loss."""
        if len(shards) != self.n:
            raise ValueError(f"expected {self.n} shards, got {len(shards)}")
        for i in range(1, self.n):
            batch, weight = shards[i]
            self._tasks[i - 1].put((loss_fn, batch, weight * scale, trainable))
        results: list = [None] * self.n
        try:
            results[0] = self._run(loss_fn, shards[0][0], shards[0][1] * scale, None)
        except BaseException as exc:
            results[0] = (exc, None)
        for _ in range(1, self.n):  # always collect every worker's result, so none is left over for the next call
            index, loss, grads = self._results.get()
            results[index] = (loss, grads)
        failed = [r[0] for r in results if isinstance(r[0], BaseException)]
        if failed:
            raise failed[0]
        total = results[0][0] * shards[0][1]
        for i in range(1, self.n):
            loss, grads = results[i]
            total = total + loss * shards[i][1]
            for p, g in zip(trainable, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.contiguous()
                else:
                    p.grad.add_(g)
        return total
