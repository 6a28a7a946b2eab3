"""`slimtune bench`: time forward + backward + optimizer step for a GPT config and batch.

Reports tokens/s, achieved FLOP/s, MFU against the *measured* fp32 (or bf16) matmul peak of this machine (the
probe runs here, and its result is cached for the MFU shown by training runs), and the peak memory. Inputs are
random token ids over a synthetic vocabulary (65 tokens unless --vocab-size is given), so no data folder is needed;
the parameter count therefore differs from a run on real data by the embedding rows of the real vocabulary.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.hardware import matmul_peak_flops, synchronize
from slimtune.memory import format_bytes, peak_memory_bytes
from slimtune.models.gpt import GPT, GPTConfig
from slimtune.train.flops import step_flops_per_token
from slimtune.train.loop import prepare_model, shard_and_build_optimizer, start_run
from slimtune.train.workloads import Workload


@dataclass
class BenchResult:
    config: str
    device: str
    dtype: str
    threads: int
    params: int
    vocab_size: int
    tokens_per_step: int
    step_seconds: float
    tokens_per_second: float
    flops_per_second: float
    peak_flops: float
    mfu: float
    peak_memory_bytes: int


class _SyntheticTokens(Workload):
    """The workload interface over one fixed batch of random tokens."""

    n_train_examples = 10**6
    """As in a long run (e.g. BAdam's default switch interval is then its longest)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.batch = (x, y)

    def batch_tokens(self, batch) -> int:
        return batch[0].numel()

    def count_targets(self, batch) -> int:
        return batch[1].numel()

    def loss_sum(self, model, batch):
        return model(*batch, reduction="sum")[1]

    def forward_flops_per_token(self, model) -> float:
        return model.forward_flops_per_token()


def run_bench(cfg: TrainConfig, steps: int = 20, warmup: int = 3, vocab_size: int = 65) -> BenchResult:
    """Median time of `steps` training steps after `warmup` untimed ones."""
    if not cfg.is_gpt:
        raise SlimtuneError("slimtune bench times slimtune's GPT (model=gpt) from its gpt.* keys")
    threads = torch.get_num_threads()
    try:
        return _run_bench(cfg, steps, warmup, vocab_size)
    finally:
        torch.set_num_threads(threads)  # runtime.threads holds for the benchmark only


def _run_bench(cfg: TrainConfig, steps: int, warmup: int, vocab_size: int) -> BenchResult:
    """Set up as `slimtune train` does (`slimtune.train.loop.setup`'s steps: the strategy shards the model, builds
    the optimizer and wraps the forward), without data, checkpoints or logs."""
    strategy, precision, method = start_run(cfg)
    device = strategy.device
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, vocab_size, (cfg.batch_size, cfg.gpt.block_size + 1), generator=g).to(device)
    work = _SyntheticTokens(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    grad_accum, max_norm = cfg.optim.grad_accum, cfg.optim.grad_clip
    times = []
    try:
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(vocab_size=vocab_size, **asdict(cfg.gpt)))
        strategy, model, backend = prepare_model(cfg, model, strategy, method, work)
        params = model.num_params()
        flops_per_token = step_flops_per_token(model, work.forward_flops_per_token(model))  # of the whole model
        model, optimizer = shard_and_build_optimizer(cfg, model, strategy, method, work.n_train_examples,
                                                     verbose=False)
        forward_model = strategy.wrap(model)
        clip = (lambda: method.clip_grad_norm_(model, optimizer, max_norm)) if max_norm > 0 else None
        for i in range(warmup + steps):
            synchronize(device)
            t0 = time.perf_counter()
            strategy.forward_backward(forward_model, work, [work.batch] * grad_accum, precision)
            strategy.optimizer_step(optimizer, precision, clip)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        strategy.teardown()
    dt = statistics.median(times)
    tokens = cfg.batch_size * cfg.gpt.block_size * grad_accum
    tok_s = tokens / dt
    peak = matmul_peak_flops(device, precision.dtype)  # after teardown: every thread is back in torch's pool
    flops = flops_per_token * tok_s
    g_ = cfg.gpt
    return BenchResult(
        config=f"gpt.n_layer={g_.n_layer} gpt.n_head={g_.n_head} gpt.n_embd={g_.n_embd} "
               f"gpt.block_size={g_.block_size} batch_size={cfg.batch_size} optim.grad_accum={grad_accum} "
               f"method={cfg.method} strategy={strategy.name} ({strategy.describe()})"
               f"{', ' + backend if backend else ''}",
        device=str(device), dtype=precision.name, threads=torch.get_num_threads(),
        params=params, vocab_size=vocab_size, tokens_per_step=tokens, step_seconds=dt,
        tokens_per_second=tok_s, flops_per_second=flops, peak_flops=peak, mfu=flops / peak,
        peak_memory_bytes=peak_memory_bytes(device),
    )


def format_report(r: BenchResult) -> str:
    return "\n".join([
        f"config        {r.config}",
        f"device        {r.device} ({r.dtype}, {r.threads} threads), {r.params / 1e6:.2f}M parameters "
        f"(synthetic vocabulary of {r.vocab_size} tokens)",
        f"step          {r.step_seconds * 1000:.1f} ms for {r.tokens_per_step} tokens (median)",
        f"throughput    {r.tokens_per_second:,.0f} tokens/s",
        f"compute       {r.flops_per_second / 1e9:.1f} GFLOP/s of a measured {r.peak_flops / 1e9:.1f} GFLOP/s "
        f"matmul peak",
        f"MFU           {r.mfu:.1%}",
        f"peak memory   {format_bytes(r.peak_memory_bytes)}",
    ])
