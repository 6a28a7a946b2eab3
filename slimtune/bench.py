"""`slimtune bench`: time forward + backward + optimizer step for a model config and batch.

Reports tokens/s, achieved FLOP/s, MFU against the *measured* fp32 (or bf16) matmul peak of this machine, and the
peak memory. Inputs are random token ids, so no data folder is needed.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.kernels import choose_matmul, use_onednn_linear
from slimtune.hardware import autocast, matmul_peak_flops, pick_device, resolve_precision, synchronize
from slimtune.memory import format_bytes, peak_memory_bytes, set_cpu_allocator
from slimtune.models.gpt import GPT, GPTConfig
from slimtune.train.loop import build_optimizer, clip_gradients
from slimtune.train.shards import ShardedBackward, cpu_shards_for


@dataclass
class BenchResult:
    config: str
    device: str
    dtype: str
    threads: int
    params: int
    tokens_per_step: int
    step_seconds: float
    tokens_per_second: float
    flops_per_second: float
    peak_flops: float
    mfu: float
    peak_memory_bytes: int


def run_bench(cfg: TrainConfig, steps: int = 20, warmup: int = 3, vocab_size: int = 65) -> BenchResult:
    """Median time of `steps` training steps after `warmup` untimed ones."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    allocator = ""
    if device.type == "cpu":
        allocator = f" cpu_allocator={cfg.cpu_allocator if set_cpu_allocator(cfg.cpu_allocator) else 'system'}"
    dtype = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    if cfg.model != "gpt":
        raise SlimtuneError("slimtune bench times slimtune's GPT (model=gpt) from its n_layer/n_head/n_embd keys")
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)).to(device)
    n_shards = cpu_shards_for(cfg, device, model, distributed=False, can_split_rows=True)
    matmul = choose_matmul(cfg.matmul, device, compile=cfg.compile, threads=1 if n_shards > 1 else None)
    if matmul == "onednn":
        use_onednn_linear(model)
    optimizer = build_optimizer(model, cfg, device, n_train_examples=10**6, verbose=False)
    if cfg.compile:
        model = torch.compile(model)
    amp = autocast(device, dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=g).to(device)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    params = [p for p in model.parameters() if p.requires_grad]
    shards = [((xs, ys), xs.shape[0] / cfg.batch_size)
              for xs, ys in zip(inputs.tensor_split(n_shards), targets.tensor_split(n_shards))]

    def loss_of(batch):
        return model(*batch)[1]

    times = []
    with contextlib.ExitStack() as stack:
        sharded = stack.enter_context(ShardedBackward(n_shards, lambda: autocast(device, dtype))) \
            if n_shards > 1 else None
        for i in range(warmup + steps):
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(cfg.grad_accum):
                if sharded is not None:
                    sharded(loss_of, shards, 1 / cfg.grad_accum, params)
                    continue
                with amp:
                    loss = loss_of((inputs, targets))
                (loss / cfg.grad_accum).backward()
            if cfg.grad_clip > 0:
                clip_gradients(optimizer, params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    raw = getattr(model, "_orig_mod", model)
    dt = statistics.median(times)
    tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum
    tok_s = tokens / dt
    peak = matmul_peak_flops(device, dtype)
    flops = raw.flops_per_token() * tok_s
    return BenchResult(
        config=f"n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} block_size={cfg.block_size} "
               f"batch_size={cfg.batch_size} grad_accum={cfg.grad_accum} method={cfg.method} matmul={matmul} "
               f"cpu_shards={n_shards}"
               f"{allocator}",
        device=str(device), dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(),
        params=raw.num_params(), tokens_per_step=tokens, step_seconds=dt, tokens_per_second=tok_s,
        flops_per_second=flops, peak_flops=peak, mfu=flops / peak, peak_memory_bytes=peak_memory_bytes(device),
    )


def format_report(r: BenchResult) -> str:
    return "\n".join([
        f"config        {r.config}",
        f"device        {r.device} ({r.dtype}, {r.threads} threads), {r.params / 1e6:.2f}M parameters",
        f"step          {r.step_seconds * 1000:.1f} ms for {r.tokens_per_step} tokens (median)",
        f"throughput    {r.tokens_per_second:,.0f} tokens/s",
        f"compute       {r.flops_per_second / 1e9:.1f} GFLOP/s of a measured {r.peak_flops / 1e9:.1f} GFLOP/s "
        f"matmul peak",
        f"MFU           {r.mfu:.1%}",
        f"peak memory   {format_bytes(r.peak_memory_bytes)}",
    ])
