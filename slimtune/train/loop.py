"""The one training loop: setup → fit → evaluate → save.

Methods (full, badam, ...) only decide what is trainable and how it is stepped (`build_optimizer`); strategies
(one process, DDP) only decide where tensors live. The loop itself never asks which one is running.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from slimtune.config import TrainConfig, to_dict
from slimtune.errors import SlimtuneError
from slimtune.hardware import autocast, matmul_peak_flops, pick_device, resolve_precision
from slimtune.kernels import choose_matmul, use_onednn_linear
from slimtune.memory import format_bytes, peak_memory_bytes, set_cpu_allocator
from slimtune.parallel import ddp
from slimtune.train import checkpoint as ckpt_io
from slimtune.train.logging import MetricsLog, plot_losses
from slimtune.train.schedule import cosine_with_warmup
from slimtune.train.shards import ShardedBackward, cpu_shards_for
from slimtune.train.workloads import Workload, build_workload, decay_groups


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    checkpoint: Path | None
    last_loss: float | None
    val_loss: float | None
    stopped_by_signal: bool
    peak_memory_bytes: int


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step, saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, n_train_examples: int,
                    verbose: bool = True) -> torch.optim.Optimizer:
    """The method's optimizer: AdamW for `full`, a BlockOptimizer around AdamW for `badam`."""
    from slimtune.methods.full import adamw

    groups = decay_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    base = adamw(groups, cfg.lr, (cfg.beta1, cfg.beta2), device)
    if cfg.method == "full":
        return base
    from slimtune.methods.badam import BlockOptimizer, auto_block_prefixes, default_switch_every

    named = list(model.named_parameters())
    prefixes = auto_block_prefixes(named, granularity=cfg.badam.granularity,
                                   include_embedding=cfg.badam.include_embedding,
                                   include_lm_head=cfg.badam.include_lm_head)
    switch_every = cfg.badam.switch_every
    if switch_every is None:
        # The paper's rule balances the data seen by each block within an epoch.
        switch_every = default_switch_every(n_train_examples, cfg.batch_size * cfg.grad_accum, len(prefixes))
    return BlockOptimizer(base_optimizer=base, named_parameters_list=named, block_prefix_list=prefixes,
                          switch_block_every=switch_every, switch_mode=cfg.badam.switch_mode,
                          active_modules=list(cfg.badam.active_modules), seed=cfg.seed, verbose=1 if verbose else 0)


def clip_gradients(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm. A method that keeps gradients elsewhere (BAdam's fp32 buffers for bf16
    weights) provides its own `clip_grad_norm_`; otherwise the parameters' `.grad` are clipped."""
    own = getattr(optimizer, "clip_grad_norm_", None)
    if own is not None:
        return own(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def _check_same_architecture(saved: dict, current: dict, ckpt: Path) -> None:
    diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise SlimtuneError(
            f"checkpoint {ckpt} was trained with a different model config ({details}). Use the checkpoint's "
            f"settings, or resume=never / another out_dir to start a new run."
        )


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def estimate_loss(model, workload: Workload, eval_iters: int, amp, env, device) -> dict[str, float]:
    """Mean loss over up to `eval_iters` batches per split (the same batches at every evaluation, so successive
    numbers are comparable; evaluation never disturbs the training data stream). Splits without data are left out."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        total, count = 0.0, 0
        for batch in workload.eval_batches(split, eval_iters):
            with amp:
                total += workload.loss(model, batch).item()
            count += 1
        if ddp.all_reduce_mean(float(count), env, device) > 0:
            out[split] = ddp.all_reduce_mean(total / max(count, 1), env, device)
    model.train(was_training)
    return out


def train(cfg: TrainConfig) -> TrainResult:
    """Train according to `cfg`; returns where it ended. Resumes from `out_dir` per `cfg.resume`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        set_cpu_allocator(cfg.cpu_allocator)
    env = ddp.init_from_env(device.type)
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    try:
        return _train(cfg, device, env)
    finally:
        ddp.shutdown(env)


def _train(cfg: TrainConfig, device: torch.device, env: ddp.DistEnv) -> TrainResult:
    out_dir = Path(cfg.out_dir)
    compute_dtype = resolve_precision(cfg.precision, device)
    amp = autocast(device, compute_dtype)
    # Measured before seeding: the measurement must not depend on, or change, the training RNG.
    peak_flops = matmul_peak_flops(device, compute_dtype) if env.is_main else float("nan")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    workload = build_workload(cfg, env.rank, env.world_size, device)
    model = workload.model.to(device)
    n_shards = cpu_shards_for(cfg, device, model, distributed=env.enabled, can_split_rows=workload.can_split_rows)
    matmul = choose_matmul(cfg.matmul, device, compile=cfg.compile, threads=1 if n_shards > 1 else None)
    if matmul == "onednn":
        use_onednn_linear(model)
    optimizer = build_optimizer(model, cfg, device, workload.n_train_examples, verbose=env.is_main)
    torch.manual_seed(cfg.seed + env.rank)  # dropout masks differ per rank
    scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None

    # ---- resume ---------------------------------------------------------------------------------------------
    step = 0
    resume_from = ckpt_io.resolve_resume(cfg.resume, out_dir)
    metrics = MetricsLog(out_dir / "metrics.jsonl")
    if resume_from is not None:
        _check_same_architecture(ckpt_io.read_model_config(resume_from), workload.model_config, resume_from)
        ckpt_io.load_model_weights(model, resume_from)
        try:
            optimizer.load_state_dict(ckpt_io.load_state(resume_from, "optimizer.pt"))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise SlimtuneError(
                f"{resume_from}/optimizer.pt does not fit this run's optimizer (method={cfg.method}): {exc}. "
                f"Resume with the method the checkpoint was trained with, or start fresh with resume=never."
            ) from None
        trainer_state = ckpt_io.load_state(resume_from, "trainer.pt")
        step = trainer_state["step"]
        ranks = trainer_state["ranks"]
        if len(ranks) != env.world_size and env.is_main:
            tqdm.write(f"warning: checkpoint written by {len(ranks)} processes, resuming with {env.world_size}; "
                       f"data order will differ from an uninterrupted run")
        if env.rank < len(ranks):
            _set_rng_state(ranks[env.rank]["rng"], device)
            workload.load_state_dict(ranks[env.rank]["data"])
        if env.is_main:
            metrics.truncate_after(step)
            tqdm.write(f"resumed from {resume_from} at step {step}")
    elif env.is_main and metrics.path.exists():
        metrics.path.unlink()  # a fresh run in an old out_dir starts a fresh log

    raw_model = model
    if env.enabled and cfg.method == "badam":
        raise SlimtuneError("method=badam under torchrun/DDP is not supported yet (DDP fixes the trainable set at "
                            "wrap time, BAdam changes it every switch); train BAdam in one process")
    if env.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    # All parameters: which ones train may change during the run (BAdam); clipping skips those without gradients.
    params = list(raw_model.parameters())
    n_params = sum(p.numel() for p in params)
    flops_per_token = workload.flops_per_token()  # fixed for the run: counting parameters every step costs time

    saved_step = -1

    def save(at_step: int) -> Path | None:
        nonlocal saved_step
        saved_step = at_step
        states = ddp.gather_objects({"rng": _rng_state(device), "data": workload.state_dict()}, env)
        path = None
        if env.is_main:
            path = ckpt_io.save_checkpoint(
                out_dir, at_step, raw_model, optimizer.state_dict(),
                {"step": at_step, "world_size": env.world_size, "ranks": states, "tokens": tokens_seen},
                to_dict(cfg), workload.model_config, write_extra=workload.save_files, keep_last=cfg.keep_last,
            )
        ddp.barrier(env)
        return path

    if env.is_main:
        tqdm.write(f"model: {workload.describe()} | method {cfg.method} | device {device} "
                   f"{str(compute_dtype).replace('torch.', '')} | matmul {matmul} | "
                   f"{f'{n_shards} batch shards | ' if n_shards > 1 else ''}{env.world_size} process(es) | "
                   f"{cfg.batch_size * cfg.grad_accum * env.world_size} sequences/step")

    bar = tqdm(total=cfg.max_iters, initial=step, desc="train", dynamic_ncols=True,
               disable=not (cfg.progress and env.is_main))
    last_loss = val_loss = None
    last_ckpt = None
    stopped = False

    def announce_block(at_step: int, block: str) -> None:
        # The analytic Adam state of the new block (moments + fp32 grads, + masters for low-precision weights).
        expected = optimizer.analytic_state_bytes()
        tqdm.write(f"step {at_step}: BAdam trains block {block} ({optimizer.active_numel() / 1e6:.2f}M parameters, "
                   f"optimizer state {format_bytes(expected)})")
        metrics.write({"kind": "switch", "step": at_step, "block": block, "analytic_state_bytes": expected})

    active_block = getattr(optimizer, "active_block_name", None)
    if active_block is not None and env.is_main:
        announce_block(step, active_block)
    tok_s_ema = None
    tokens_seen = trainer_state["tokens"] if resume_from is not None else 0
    model.train()
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(_StopRequest())
        sharded = stack.enter_context(ShardedBackward(n_shards, lambda: autocast(device, compute_dtype))) \
            if n_shards > 1 else None
        while step < cfg.max_iters:
            lr = cosine_with_warmup(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, decay_iters) if cfg.decay_lr else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            step_tokens = 0
            for micro in range(cfg.grad_accum):
                batch = workload.next_batch()
                step_tokens += workload.batch_tokens(batch)
                if sharded is not None:
                    loss_sum += sharded(partial(workload.loss, model), workload.split_batch(batch, n_shards),
                                        1 / cfg.grad_accum, [p for p in params if p.requires_grad])
                    continue
                # Only the last micro-batch all-reduces gradients under DDP.
                sync = model.no_sync() if env.enabled and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with amp:
                        loss = workload.loss(model, batch)
                    scaled = loss / cfg.grad_accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach()
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = clip_gradients(optimizer, params, cfg.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            step_tokens *= env.world_size  # ranks draw batches of the same shape (padding aside)
            tokens_seen += step_tokens
            tok_s_ema = step_tokens / dt if tok_s_ema is None else 0.9 * tok_s_ema + 0.1 * step_tokens / dt

            log_now = cfg.log_interval and (step % cfg.log_interval == 0 or step == cfg.max_iters)
            # The same condition on every rank: the mean over ranks is a collective call.
            if log_now or cfg.progress:
                last_loss = ddp.all_reduce_mean((loss_sum / cfg.grad_accum).item(), env, device)
            if env.is_main:
                tok_s = tok_s_ema
                # 6N per token assumes every weight gets a gradient; with a frozen part (BAdam) the weight-gradient
                # third shrinks to the trainable share: 2N forward + 2N input-gradients + 2N_trainable.
                share = sum(p.numel() for p in params if p.requires_grad) / n_params
                mfu = flops_per_token * (4 + 2 * share) / 6 * tok_s / env.world_size / peak_flops
                peak = peak_memory_bytes(device)
                bar.update(1)
                if not bar.disable:
                    bar.set_postfix_str(f"loss {last_loss:.4f} | {tok_s:,.0f} tok/s | MFU {mfu:.0%} | "
                                        f"peak {format_bytes(peak)}", refresh=False)
                if log_now:
                    record = {"kind": "train", "step": step, "loss": last_loss, "lr": lr,
                              "grad_norm": None if grad_norm is None else float(grad_norm),
                              "tokens": tokens_seen, "tok_per_s": tok_s, "mfu": mfu, "peak_mem_bytes": peak,
                              "dt_s": dt, "time": time.time()}
                    if hasattr(optimizer, "optimizer_state_bytes"):
                        record["optimizer_state_bytes"] = optimizer.optimizer_state_bytes()
                    metrics.write(record)
                block = getattr(optimizer, "active_block_name", None)
                if block is not None and block != active_block:
                    announce_block(step, block)
                    active_block = block

            saved_now = False
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.max_iters):
                with sharded.all_cores() if sharded is not None else contextlib.nullcontext():
                    losses = estimate_loss(model, workload, cfg.eval_iters, amp, env, device)
                val_loss = losses.get("val", val_loss)
                if env.is_main:
                    tqdm.write(f"step {step}: " + ", ".join(f"{k} loss {v:.4f}" for k, v in losses.items()))
                    metrics.write({"kind": "eval", "step": step, **{f"{k}_loss": v for k, v in losses.items()}})
                last_ckpt, saved_now = save(step), True
            elif cfg.save_interval and step % cfg.save_interval == 0:
                last_ckpt, saved_now = save(step), True

            if saved_now and os.environ.get("SLIMTUNE_FAULT_KILL_AT_STEP") == str(step):
                # Fault injection for the crash-recovery tests: die like an OOM-killed or preempted job would.
                os.kill(os.getpid(), signal.SIGKILL)
            if ddp.any_rank(stop.requested, env, device):
                if not saved_now:
                    last_ckpt = save(step)
                stopped = True
                if env.is_main:
                    tqdm.write(f"stopped by signal at step {step}; checkpoint saved to {last_ckpt}. "
                               f"Run the same command again (resume=auto) to continue.")
                break
            if not math.isfinite(last_loss if last_loss is not None else 0.0):
                raise SlimtuneError(f"loss became {last_loss} at step {step}; lower lr or enable grad_clip")
    bar.close()
    if saved_step != step:  # decided identically on every rank: saving is collective
        last_ckpt = save(step)
    peak = peak_memory_bytes(device)
    if env.is_main:
        if cfg.plot:
            plot_losses(metrics.read(), out_dir / "loss.png")
        tqdm.write(f"done: step {step}, checkpoint {last_ckpt}, peak memory {format_bytes(peak)}")
    return TrainResult(out_dir, step, last_ckpt, last_loss, val_loss, stopped, peak)
