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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from slimtune.config import TrainConfig, to_dict
from slimtune.data.prepare import read_meta
from slimtune.data.windows import TokenWindows
from slimtune.errors import SlimtuneError
from slimtune.hardware import autocast, matmul_peak_flops, pick_device, resolve_precision
from slimtune.memory import format_bytes, peak_memory_bytes
from slimtune.models.gpt import GPT, GPTConfig
from slimtune.parallel import ddp
from slimtune.train import checkpoint as ckpt_io
from slimtune.train.logging import MetricsLog, plot_losses
from slimtune.train.schedule import cosine_with_warmup


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


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    if cfg.model != "gpt":
        raise SlimtuneError(
            f"model={cfg.model!r}: only model=gpt (train from scratch on prepared data) is available in this version"
        )
    return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device, n_train_tokens: int,
                    verbose: bool = True) -> torch.optim.Optimizer:
    """The method's optimizer: AdamW for `full`, a BlockOptimizer around AdamW for `badam`."""
    from slimtune.methods.full import adamw

    groups = model.param_groups(cfg.weight_decay, cfg.decay_embeddings)
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
        # One "example" is one training window; n/(B·D) balances data across blocks within an epoch.
        switch_every = default_switch_every(n_train_tokens // cfg.block_size, cfg.batch_size * cfg.grad_accum,
                                            len(prefixes))
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
def estimate_loss(model, windows: dict[str, TokenWindows], eval_iters: int, amp, env, device) -> dict[str, float]:
    """Mean loss over `eval_iters` batches per split. The eval generators restart from the same state every time,
    so successive evaluations score the same windows (comparable numbers) and never disturb the training stream."""
    was_training = model.training
    model.eval()
    out = {}
    for split, w in windows.items():
        start = w.state_dict()
        total = 0.0
        for _ in range(eval_iters):
            x, y = w.next_batch()
            with amp:
                _, loss = model(x, y)
            total += loss.item()
        w.load_state_dict(start)
        out[split] = ddp.all_reduce_mean(total / eval_iters, env, device)
    model.train(was_training)
    return out


def train(cfg: TrainConfig) -> TrainResult:
    """Train according to `cfg`; returns where it ended. Resumes from `out_dir` per `cfg.resume`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
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
    if not cfg.data:
        raise SlimtuneError("no data given: set data=FOLDER (a folder written by `slimtune prepare`)")
    data_dir = Path(cfg.data)
    meta = read_meta(data_dir)
    train_windows = TokenWindows(data_dir / "train.bin", meta["dtype"], cfg.block_size, cfg.batch_size, cfg.seed,
                                 env.rank, device)
    eval_windows = {}
    if cfg.eval_interval > 0:
        # Eval streams are separate generators (seed + 1), per rank, reset before every evaluation.
        eval_windows = {
            split: TokenWindows(data_dir / f"{split}.bin", meta["dtype"], cfg.block_size, cfg.batch_size,
                                cfg.seed + 1, env.rank, device)
            for split in ("train", "val")
        }

    peak_flops = matmul_peak_flops(device, compute_dtype) if env.is_main else float("nan")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, meta["vocab_size"]).to(device)
    model_config = asdict(model.config)
    optimizer = build_optimizer(model, cfg, device, meta["train_tokens"], verbose=env.is_main)
    torch.manual_seed(cfg.seed + env.rank)  # dropout masks differ per rank
    scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None

    # ---- resume ---------------------------------------------------------------------------------------------
    step = 0
    resume_from = ckpt_io.resolve_resume(cfg.resume, out_dir)
    metrics = MetricsLog(out_dir / "metrics.jsonl")
    if resume_from is not None:
        _check_same_architecture(ckpt_io.read_model_config(resume_from), model_config, resume_from)
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
            train_windows.load_state_dict(ranks[env.rank]["data"])
        if env.is_main:
            metrics.truncate_after(step)
            tqdm.write(f"resumed from {resume_from} at step {step}")
    elif cfg.resume == "auto" and env.is_main and metrics.path.exists():
        metrics.path.unlink()  # a fresh run in an old out_dir starts a fresh log

    raw_model = model
    if env.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * env.world_size
    trainable = [p for p in raw_model.parameters() if p.requires_grad]

    saved_step = -1

    def save(at_step: int) -> Path | None:
        nonlocal saved_step
        saved_step = at_step
        states = ddp.gather_objects({"rng": _rng_state(device), "data": train_windows.state_dict()}, env)
        path = None
        if env.is_main:
            path = ckpt_io.save_checkpoint(
                out_dir, at_step, raw_model, optimizer.state_dict(),
                {"step": at_step, "world_size": env.world_size, "ranks": states},
                to_dict(cfg), model_config,
                extra_files={"meta.json": data_dir / "meta.json", "tokenizer": data_dir / "tokenizer"},
                keep_last=cfg.keep_last,
            )
        ddp.barrier(env)
        return path

    if env.is_main:
        n_params = raw_model.num_params()
        tqdm.write(f"model: GPT {cfg.n_layer}x{cfg.n_embd}, {n_params / 1e6:.2f}M parameters | method {cfg.method} | "
                   f"device {device} {str(compute_dtype).replace('torch.', '')} | {env.world_size} process(es) | "
                   f"{tokens_per_step} tokens/step")

    bar = tqdm(total=cfg.max_iters, initial=step, desc="train", dynamic_ncols=True,
               disable=not (cfg.progress and env.is_main))
    last_loss = val_loss = None
    last_ckpt = None
    stopped = False
    active_block = getattr(optimizer, "active_block_name", None)
    step_time_ema = None
    model.train()
    with _StopRequest() as stop:
        while step < cfg.max_iters:
            lr = cosine_with_warmup(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, decay_iters) if cfg.decay_lr else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = train_windows.next_batch()
                # Only the last micro-batch all-reduces gradients under DDP.
                sync = model.no_sync() if env.enabled and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with amp:
                        _, loss = model(x, y)
                    scaled = loss / cfg.grad_accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach()
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = clip_gradients(optimizer, trainable, cfg.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            step_time_ema = dt if step_time_ema is None else 0.9 * step_time_ema + 0.1 * dt

            log_now = cfg.log_interval and (step % cfg.log_interval == 0 or step == cfg.max_iters)
            # The same condition on every rank: the mean over ranks is a collective call.
            if log_now or cfg.progress:
                last_loss = ddp.all_reduce_mean((loss_sum / cfg.grad_accum).item(), env, device)
            if env.is_main:
                tok_s = tokens_per_step / step_time_ema
                mfu = raw_model.estimate_mfu(tok_s / env.world_size, peak_flops)
                peak = peak_memory_bytes(device)
                bar.update(1)
                if not bar.disable:
                    bar.set_postfix_str(f"loss {last_loss:.4f} | {tok_s:,.0f} tok/s | MFU {mfu:.0%} | "
                                        f"peak {format_bytes(peak)}", refresh=False)
                if log_now:
                    metrics.write({"kind": "train", "step": step, "loss": last_loss, "lr": lr,
                                   "grad_norm": None if grad_norm is None else float(grad_norm),
                                   "tokens": step * tokens_per_step, "tok_per_s": tok_s, "mfu": mfu,
                                   "peak_mem_bytes": peak, "dt_s": dt})
                block = getattr(optimizer, "active_block_name", None)
                if block is not None and block != active_block:
                    state_bytes = optimizer.optimizer_state_bytes()
                    tqdm.write(f"step {step}: BAdam switched to block {block} "
                               f"(optimizer state {format_bytes(state_bytes)})")
                    metrics.write({"kind": "switch", "step": step, "block": block, "optimizer_state_bytes": state_bytes})
                    active_block = block

            saved_now = False
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.max_iters):
                losses = estimate_loss(model, eval_windows, cfg.eval_iters, amp, env, device)
                val_loss = losses["val"]
                if env.is_main:
                    tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    metrics.write({"kind": "eval", "step": step, "train_loss": losses["train"], "val_loss": val_loss})
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
