"""CPU batch shards: one micro-batch's forward and backward split by rows over threads, one core each.

Why: at the sizes people train from scratch on a CPU, one op (a 768x128 @ 128x512 product, a GELU, a small
attention) is too small to keep several cores busy, and every parallel op pays a fork/join. Giving each core its
own rows of the batch and running every op single-threaded keeps both cores busy for the whole step (measured on
2 cores, nanoGPT's README config: forward + backward 41 -> 36 ms; a 6x384 GPT at block 256 gains nothing; see
docs/BENCHMARKS.md §1b). torch releases the GIL inside its ops, so Python threads are enough.

What stays exact: each shard runs single-threaded, so its result does not depend on scheduling; shard 0
back-propagates into `.grad`, the others return their gradients, which are added in shard order. A run with the
same number of shards is therefore bit-for-bit repeatable and resumes exactly. Against an unsharded run the
gradients differ by float rounding (a different summation order), not more. The price is memory: one extra
gradient copy per extra shard while they are added.

What is not supported (and why `cpu_shards` refuses or `auto` stays at 1): random ops in the forward (dropout
draws from one global generator, in an order the threads would race for), DDP (it all-reduces from `.grad`
hooks that `autograd.grad` does not fire), BAdam (it may step from gradient hooks), fp16 loss scaling, compiled
models, and workloads that cannot split a batch by rows.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable, ContextManager, Sequence

import torch

from slimtune.errors import SlimtuneError

AUTO_MAX_EXTRA_GRAD_BYTES = 256 * 2**20
"""`cpu_shards=0` (auto) shards only while the extra gradient copies fit in this many bytes (64M fp32 parameters
on 2 cores): small models gain the most, and a large model's extra copies would cost real memory."""


def cpu_shards_for(cfg, device: torch.device, model: torch.nn.Module, *, distributed: bool,
                   can_split_rows: bool) -> int:
    """`cfg.cpu_shards` resolved for this run (a TrainConfig; 0 = auto)."""
    blockers = []
    if not can_split_rows:
        blockers.append(f"model={cfg.model} (only model=gpt batches split by rows)")
    if cfg.method != "full":
        blockers.append(f"method={cfg.method}")
    if cfg.dropout > 0:
        blockers.append(f"dropout={cfg.dropout}")
    if cfg.compile:
        blockers.append("compile=true")
    if distributed:
        blockers.append("torchrun/DDP")
    if cfg.precision == "fp16":
        blockers.append("precision=fp16")
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return resolve_cpu_shards(cfg.cpu_shards, device=device, batch_size=cfg.batch_size,
                              threads=torch.get_num_threads(), trainable_grad_bytes=grad_bytes, blockers=blockers)


def resolve_cpu_shards(requested: int, *, device: torch.device, batch_size: int, threads: int,
                       trainable_grad_bytes: int, blockers: Sequence[str]) -> int:
    """How many row shards each micro-batch runs as. `requested`: the `cpu_shards` setting (0 = auto).
    `blockers`: settings that make sharding unsupported, each written as the user would write it."""
    if requested == 1:
        return 1
    if requested == 0:
        n = min(threads, batch_size)
        if device.type != "cpu" or n < 2 or blockers or (n - 1) * trainable_grad_bytes > AUTO_MAX_EXTRA_GRAD_BYTES:
            return 1
        return n
    if device.type != "cpu":
        raise SlimtuneError(f"cpu_shards={requested} applies to CPU training, but device is {device}; "
                            f"set cpu_shards=1 (or 0 for auto)")
    if blockers:
        raise SlimtuneError(f"cpu_shards={requested} cannot be used with {', '.join(blockers)}: "
                            f"set cpu_shards=1, or change those settings")
    if requested > batch_size:
        raise SlimtuneError(f"cpu_shards={requested} is more than batch_size={batch_size}: every shard needs at "
                            f"least one sequence; lower cpu_shards or raise batch_size")
    return requested


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
        sum of weight * loss (the whole micro-batch's loss when the weights are the shards' shares)."""
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
