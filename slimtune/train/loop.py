"""The one training loop: setup → fit → evaluate → save.

What is trainable and how it is stepped is the method's business (`slimtune.methods`); where tensors live and how
gradients meet is the strategy's (`slimtune.parallel`); what the data and the loss are is the workload's
(`slimtune.train.workloads`); how the model is loaded is `slimtune.models.build`'s, with the method's options; device
speed-ups are `slimtune.backends`'. This file only calls their interfaces, in the order described in
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from slimtune.backends import cpu as cpu_backend
from slimtune import methods
from slimtune.config import TrainConfig, to_dict
from slimtune.errors import SlimtuneError
from slimtune.hardware import describe_precision, known_matmul_peak, pick_device, resolve_precision
from slimtune.memory import format_bytes, peak_memory_bytes
from slimtune.methods.base import Method, OptimizerContext
from slimtune.models.build import build_model
from slimtune.parallel import finish_auto_choice, start_strategy
from slimtune.parallel.base import Strategy
from slimtune.plan.run import RunPlan, plan_before_loading, plan_for_run
from slimtune.train import checkpoint as ckpt_io
from slimtune.train.flops import step_flops_per_token
from slimtune.train.logging import MetricsLog, Progress, plot_losses
from slimtune.train.precision import Precision
from slimtune.train.schedule import cosine_with_warmup, schedule_warnings
from slimtune.train.trackers import Trackers
from slimtune.train.workloads import Workload, build_workload


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    checkpoint: Path | None
    last_loss: float | None
    val_loss: float | None
    stopped_by_signal: bool
    peak_memory_bytes: int


@dataclass
class Run:
    """Everything `setup` builds; `fit` advances `step`."""

    cfg: TrainConfig
    out_dir: Path
    strategy: Strategy
    method: Method
    workload: Workload
    model: torch.nn.Module  # the raw module: weights, checkpoints, evaluation
    forward_model: torch.nn.Module  # what the training forward runs through (e.g. DDP around `model`)
    model_config: dict
    optimizer: torch.optim.Optimizer
    precision: Precision
    metrics: MetricsLog
    peak_flops: float | None
    step: int = 0
    tokens_seen: int = 0
    saved_step: int = -1
    flops_per_token: float = 0.0
    plan: RunPlan | None = None  # predicted peak memory, checked at the end of fit

    @property
    def is_main(self) -> bool:
        return self.strategy.is_main

    def say(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text)

    def decay_iters(self) -> int:
        return decay_iters(self.cfg)


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


def train(cfg: TrainConfig) -> TrainResult:
    """Train according to `cfg`; returns where it ended. Resumes from `out_dir` per `cfg.resume`."""
    threads = torch.get_num_threads()  # runtime.threads holds for this run only, not for the calling process
    try:
        run = setup(cfg)
        try:
            return fit(run)
        finally:
            run.metrics.close()
            strategy, run = run.strategy, None
            strategy.teardown()
            del strategy
            # FSDP's sharded modules and pipeline stages sit in reference cycles: free them now, so the model's
            # memory is back when train() returns rather than at some later collection.
            gc.collect()
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------------------


def setup(cfg: TrainConfig) -> Run:
    """Processes, model, method, optimizer, and the state of a resumed run; nothing trains yet."""
    out_dir = check_out_dir(Path(cfg.out_dir))
    strategy, precision, method = start_run(cfg)
    device = strategy.device

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    workload = build_workload(cfg, strategy.data_rank, strategy.data_world_size, device)
    apply_num_epochs(cfg, workload)
    plan_before_loading(cfg, workload.model_spec(), method, strategy, precision)  # refuses what cannot fit
    built = build_model(cfg, workload.model_spec(), method.load_options())
    strategy, model, backend = prepare_model(cfg, built.model, strategy, method, workload)
    say = tqdm.write if strategy.is_main else (lambda text: None)
    ckpt = find_checkpoint(cfg, out_dir, strategy, built.config, say)
    if ckpt is not None:  # into the whole model, before the strategy shards it
        method.load_weights(model, ckpt)
    plan = plan_for_run(cfg, model, method, strategy, precision)  # before the optimizer state exists
    flops_per_token = step_flops_per_token(model, workload.forward_flops_per_token(model))  # of the whole model
    model, optimizer = shard_and_build_optimizer(cfg, model, strategy, method, workload.n_train_examples,
                                                 verbose=strategy.is_main)
    plan.settle_baseline()
    torch.manual_seed(cfg.seed + strategy.rank)  # dropout masks differ per rank

    run = Run(cfg, out_dir, strategy, method, workload, model, model, built.config, optimizer, precision,
              MetricsLog(out_dir / "metrics.jsonl"), known_matmul_peak(device, precision.dtype), plan=plan)
    start_or_resume(run, ckpt)
    if run.is_main:  # after start_or_resume: archiving an earlier run moves its tracker folders away first
        hparams = {**to_dict(cfg), "max_iters": cfg.max_iters}  # the length, also when num_epochs set it
        run.metrics.trackers = Trackers.open(cfg.log.report_to, out_dir, run.step, hparams)
    _log_events(run, [{**run.plan.event(), "step": run.step}])  # a resumed run's records replace those after it
    run.forward_model = strategy.wrap(model)
    run.flops_per_token = flops_per_token
    for warning in lr_schedule_warnings(cfg):
        run.say(f"warning: {warning}")
    run.say(f"model: {built.description}; {workload.describe()} | {method.describe(model, optimizer)} | "
            f"strategy {strategy.name}: {strategy.describe()} | device {device}, "
            f"{describe_precision(cfg.runtime.precision, device, precision.dtype)}"
            f"{' | ' + backend if backend else ''} | {sequences_per_step(cfg, strategy)} sequences/step")
    return run


def start_run(cfg: TrainConfig) -> tuple[Strategy, Precision, Method]:
    """The run's thread count, its processes (the strategy, set up: this rank's device), precision and method."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    strategy = start_strategy(cfg, pick_device(cfg.runtime.device))
    precision = Precision(strategy.device, resolve_precision(cfg.runtime.precision, strategy.device))
    return strategy, precision, methods.create(cfg)


def prepare_model(cfg: TrainConfig, model: torch.nn.Module, strategy: Strategy, method: Method,
                  workload: Workload) -> tuple[Strategy, torch.nn.Module, str]:
    """The loaded `model` on this rank's device with the method's changes, the strategy settled for it (`auto`
    chooses once the model exists) and checked, the CPU backend applied and, if asked, the loss compiled. Returns
    (strategy, model, the backend's description)."""
    model = method.prepare(model.to(strategy.device))
    strategy = finish_auto_choice(strategy, cfg, method, model)
    strategy.check(method, model)
    backend = cpu_backend.apply(model, cfg.runtime, strategy.device, strategy.compute_threads)
    if cfg.runtime.compile:
        workload.compile(model)
    return strategy, model, backend


def shard_and_build_optimizer(cfg: TrainConfig, model: torch.nn.Module, strategy: Strategy, method: Method,
                              n_train_examples: int, verbose: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The part of the whole, prepared `model` that this rank trains, and its optimizer: built after sharding, from
    what the strategy returns, so that it holds this rank's parameters only."""
    model = strategy.shard(model, method)
    ctx = OptimizerContext(strategy.device, n_train_examples, sequences_per_step(cfg, strategy), cfg.seed, verbose)
    return model, strategy.build_optimizer(method, model, ctx)


def sequences_per_step(cfg: TrainConfig, strategy: Strategy) -> int:
    """Sequences in one optimizer step over all model replicas."""
    return cfg.batch_size * cfg.optim.grad_accum * strategy.data_world_size


def apply_num_epochs(cfg: TrainConfig, workload: Workload) -> None:
    """num_epochs, when given, sets max_iters from the workload's data; the schedule, the evaluations, the planner
    and the progress bar all read max_iters, so this runs as soon as the workload exists."""
    if cfg.num_epochs is not None:
        cfg.max_iters = workload.steps_for_epochs(cfg.num_epochs, cfg.optim.grad_accum)


def decay_iters(cfg: TrainConfig) -> int:
    """The length of the cosine decay: optim.lr_decay_iters, else the whole run."""
    return cfg.optim.lr_decay_iters or cfg.max_iters


def lr_schedule_warnings(cfg: TrainConfig) -> list[str]:
    """What the run's learning-rate schedule does that a short run does not expect (nothing without decay)."""
    o = cfg.optim
    return schedule_warnings(cfg.max_iters, cfg.lr, o.min_lr, o.warmup_iters, decay_iters(cfg)) if o.decay_lr else []


def dry_run(cfg: TrainConfig) -> str:
    """Resolve and check everything a run needs (config, out_dir, resume target, data files, tokenizer and model
    path) without training or writing anything; returns the report `slimtune train --dry-run` prints."""
    import yaml

    from slimtune.families import family_of

    out_dir = check_out_dir(Path(cfg.out_dir), create=False)
    family_of(cfg).resolve()  # the model's files are found (a Hugging Face model), nothing is loaded
    ckpt = ckpt_io.resolve_resume(cfg.resume, out_dir, warn=lambda text: None)
    workload = build_workload(cfg, 0, 1, torch.device("cpu"), write_cache=False)
    apply_num_epochs(cfg, workload)
    method = methods.create(cfg)
    lines = ["resolved config:", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "",
             f"data: {workload.describe()}",
             f"method: {method.name}; strategy: {cfg.strategy}",
             f"start: {'resume from ' + str(ckpt) if ckpt else 'fresh'} (out_dir {out_dir})",
             f"length: {cfg.max_iters} steps" + (f" (num_epochs={cfg.num_epochs:g})" if cfg.num_epochs else "")]
    lines += [f"warning: {w}" for w in lr_schedule_warnings(cfg)]
    return "\n".join(lines + ["dry run: everything resolved; nothing was trained or written"])


def check_out_dir(out_dir: Path, create: bool = True) -> Path:
    """out_dir must be a folder this process can write, checked before any work. With `create=False` (a dry run)
    nothing is created or written: the nearest existing folder on its path must be writable."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SlimtuneError(f"out_dir={out_dir} is a file, not a folder; choose another out_dir")
    if not create:
        existing = next(p for p in (out_dir, *out_dir.parents) if p.exists() or p == Path(p.anchor or "."))
        if existing.exists() and (not existing.is_dir() or not os.access(existing, os.W_OK)):
            raise SlimtuneError(f"out_dir={out_dir} cannot be created or written ({existing} is not a writable "
                                f"folder)")
        return out_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SlimtuneError(f"out_dir={out_dir} cannot be written ({exc.strerror}); choose another out_dir") from None
    return out_dir


def find_checkpoint(cfg: TrainConfig, out_dir: Path, strategy, model_config: dict, say) -> Path | None:
    """The checkpoint `cfg.resume` names (None: start fresh), after removing half-written ones; a checkpoint of
    another model is an error."""
    if strategy.is_main:
        for path in ckpt_io.clean_stale_temp_dirs(out_dir):
            say(f"removed {path.name}, a checkpoint left half-written by a process that no longer runs")
    strategy.barrier()
    ckpt = ckpt_io.resolve_resume(cfg.resume, out_dir, warn=say)
    if ckpt is None:
        return None
    saved = ckpt_io.read_model_config(ckpt)
    diff = {k: (saved.get(k), model_config.get(k)) for k in set(saved) | set(model_config)
            if saved.get(k) != model_config.get(k)}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise SlimtuneError(f"checkpoint {ckpt} was trained with a different model ({details}). Use the "
                            f"checkpoint's settings, or resume=never / another out_dir to start a new run.")
    return ckpt


def start_or_resume(run: Run, ckpt: Path | None) -> None:
    """Resume the optimizer, data and schedule from `ckpt` (whose weights `setup` loaded), or start fresh
    (archiving another run's results)."""
    cfg, strategy = run.cfg, run.strategy
    if ckpt is None:
        if strategy.is_main:
            archived = ckpt_io.archive_previous_run(run.out_dir)
            if archived is not None:
                run.say(f"out_dir held another run's results: moved them to {archived}")
            (run.out_dir / "config.yaml").write_text(_yaml(to_dict(cfg)))
            run.say(f"config: {run.out_dir / 'config.yaml'}")
        strategy.barrier()
        return
    state = ckpt_io.load_state(ckpt, "trainer.pt")
    run.method.load_state_dict(state.get("method", {}))  # first: it may decide what trains, which the next ones read
    try:
        strategy.load_optimizer_state_dict(run.model, run.optimizer, ckpt_io.load_state(ckpt, "optimizer.pt"))
    except (ValueError, KeyError, RuntimeError, SlimtuneError) as exc:
        raise SlimtuneError(f"{ckpt}/optimizer.pt does not fit this run's optimizer (method={run.method.name}): {exc}. "
                            f"Resume with the method the checkpoint was trained with, or start fresh with "
                            f"resume=never.") from None
    strategy.load_shards(ckpt, run.model, run.optimizer)
    run.step, run.tokens_seen = state["step"], state["tokens"]
    ranks = state["ranks"]
    # Ranks that read the same data (a pipeline's stages) resume the data position of their share.
    saved_shares = state.get("data_world_size", len(ranks))
    if saved_shares != strategy.data_world_size:
        run.say(f"warning: checkpoint written by {saved_shares} data-parallel processes, resuming with "
                f"{strategy.data_world_size}; data order will differ from an uninterrupted run")
    if strategy.rank < len(ranks):
        _set_rng_state(ranks[strategy.rank]["rng"], strategy.device)
    if strategy.data_rank < len(ranks):
        run.workload.load_state_dict(ranks[strategy.data_rank]["data"])
    run.precision.load_state_dict(state.get("precision", {}))
    saved_decay = state.get("schedule", {}).get("decay_iters")
    if saved_decay is not None and saved_decay != run.decay_iters() and cfg.optim.decay_lr:
        run.say(f"warning: the checkpoint's cosine schedule decays over {saved_decay} steps, this run's over "
                f"{run.decay_iters()} (max_iters / optim.lr_decay_iters changed): the learning rate from step "
                f"{run.step} on follows the new length. Set optim.lr_decay_iters={saved_decay} to keep the old one.")
    run.saved_step = run.step
    if strategy.is_main:
        run.metrics.truncate_after(run.step)
        (run.out_dir / "config.yaml").write_text(_yaml(to_dict(cfg)))
    run.say(f"resumed from {ckpt} at step {run.step}")


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


# ---------------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------------


def fit(run: Run) -> TrainResult:
    """Steps until max_iters (or a stop signal); evaluates and saves on schedule; saves at the end."""
    cfg, strategy, method = run.cfg, run.strategy, run.method
    progress = Progress(cfg.max_iters, run.step, enabled=cfg.log.progress and run.is_main)
    _log_events(run, method.on_start(run.step, run.optimizer))
    last_loss = val_loss = checkpoint = None
    stopped = False
    run.forward_model.train()
    with _StopRequest() as stop:
        while run.step < cfg.max_iters:
            last_loss, dt, step_tokens, grad_norm, lr = train_step(run)
            if not math.isfinite(last_loss):  # before any evaluation or save: a NaN model is never checkpointed
                raise SlimtuneError(f"loss became {last_loss} at step {run.step}; no checkpoint was written for it. "
                                    f"Lower lr or enable optim.grad_clip, then resume from the last checkpoint")
            events = method.after_step(run.step, run.optimizer)
            if run.is_main:  # FLOPs as counted for the trainable set this step ran with
                _log_step(run, progress, last_loss, dt, step_tokens, grad_norm, lr)
            if events:  # e.g. a new BAdam block: backward now runs from somewhere else
                run.flops_per_token = step_flops_per_token(run.model, run.workload.forward_flops_per_token(run.model))
                run.forward_model = strategy.on_trainable_change(run.model, run.forward_model)
            _log_events(run, events)
            _log_events(run, run.workload.epoch_events(run.step, cfg.optim.grad_accum))

            saved_now = False
            if cfg.eval.interval and (run.step % cfg.eval.interval == 0 or run.step == cfg.max_iters):
                losses = evaluate(run)
                val_loss = losses.get("val", val_loss)
                run.say(f"step {run.step}: " + ", ".join(f"{k} loss {v:.4f}" for k, v in losses.items()))
                if run.is_main:
                    run.metrics.write({"kind": "eval", "step": run.step, **{f"{k}_loss": v for k, v in losses.items()}})
                checkpoint, saved_now = save(run), True
            elif cfg.ckpt.interval and run.step % cfg.ckpt.interval == 0:
                checkpoint, saved_now = save(run), True
            if saved_now and os.environ.get("SLIMTUNE_FAULT_KILL_AT_STEP") == str(run.step):
                # Fault injection for the crash-recovery tests: die like an OOM-killed or preempted job would.
                os.kill(os.getpid(), signal.SIGKILL)
            if strategy.any(stop.requested):
                checkpoint = checkpoint if saved_now else save(run)
                stopped = True
                run.say(f"stopped by signal at step {run.step}; checkpoint saved to {checkpoint}. "
                        f"Run the same command again (resume=auto) to continue.")
                break
    progress.close()
    # Before saving (training's peak, not the checkpoint gather's); every rank's, since ranks can differ a lot.
    peaks = strategy.gather(peak_memory_bytes(strategy.device))
    _log_events(run, [{**run.plan.peak_event(peaks), "step": run.step}])
    if run.saved_step != run.step:  # decided identically on every rank: saving is collective
        checkpoint = save(run)
    peak = peak_memory_bytes(strategy.device)
    if run.is_main:
        if cfg.log.plot:
            plot_losses(run.metrics.read(), run.out_dir / "loss.png")
        run.say(f"done: step {run.step}, checkpoint {checkpoint}, peak memory {format_bytes(peak)}")
    return TrainResult(run.out_dir, run.step, checkpoint, last_loss, val_loss, stopped, peak)


def train_step(run: Run) -> tuple[float, float, int, float | None, float]:
    """One optimizer step. Returns (mean loss per target over all ranks, seconds, tokens, grad norm, lr)."""
    cfg = run.cfg
    o = cfg.optim
    lr = cosine_with_warmup(run.step, cfg.lr, o.min_lr, o.warmup_iters, run.decay_iters()) if o.decay_lr else cfg.lr
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    t0 = time.perf_counter()
    batches = [run.workload.next_batch() for _ in range(o.grad_accum)]
    loss_sum, n_targets = run.strategy.forward_backward(run.forward_model, run.workload, batches, run.precision)
    clip = (lambda: run.method.clip_grad_norm_(run.model, run.optimizer, o.grad_clip)) if o.grad_clip > 0 else None
    grad_norm = run.strategy.optimizer_step(run.optimizer, run.precision, clip)
    run.step += 1
    dt = time.perf_counter() - t0
    # Every batch is read by world_size / data_world_size ranks (a pipeline's stages): count its tokens once.
    readers = run.strategy.world_size // run.strategy.data_world_size
    total, targets, tokens = run.strategy.all_sum([loss_sum.item(), float(n_targets),
                                                   sum(run.workload.batch_tokens(b) for b in batches) / readers])
    run.tokens_seen += int(tokens)
    return total / max(targets, 1.0), dt, int(tokens), None if grad_norm is None else float(grad_norm), lr


def _log_step(run: Run, progress: Progress, loss: float, dt: float, tokens: int, grad_norm, lr: float) -> None:
    flops = run.flops_per_token * tokens / dt / run.strategy.world_size  # per device
    mfu = flops / run.peak_flops if run.peak_flops else None
    peak_uncertain = mfu is not None and mfu > 1.0
    if peak_uncertain:
        mfu = None  # a utilisation above 100 % means the measured peak is too low, not that we beat it
    peak = peak_memory_bytes(run.strategy.device)
    progress.update(loss, dt, tokens, mfu, peak, uncertain=peak_uncertain)
    cfg = run.cfg
    if cfg.log.interval and (run.step % cfg.log.interval == 0 or run.step == cfg.max_iters):
        record = {"kind": "train", "step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": run.tokens_seen, "tok_per_s": tokens / dt, "flops_per_s": flops, "mfu": mfu,
                  "peak_mem_bytes": peak, "dt_s": dt, "time": time.time(), **run.method.step_metrics(run.optimizer)}
        if peak_uncertain:
            record["peak_flops_uncertain"] = True
        run.metrics.write(record)


def _log_events(run: Run, events: list[dict]) -> None:
    for event in events:
        record = {k: v for k, v in event.items() if k != "message"}
        if run.is_main:
            run.metrics.write(record)
        if "message" in event:
            run.say(event["message"])


# ---------------------------------------------------------------------------------------------------------------
# evaluate and save
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Mean loss per target over up to eval.iters batches per split and rank (the same batches at every evaluation,
    so successive numbers are comparable). Sums and counts are added over ranks before dividing, so a rank with
    fewer (or no) batches weighs exactly what its targets weigh. Splits without data are left out."""
    model, workload = run.model, run.workload
    was_training = model.training
    model.eval()
    out = {}
    with run.strategy.evaluating():
        for split in ("train", "val"):
            total, count = 0.0, 0
            for batch in workload.eval_batches(split, run.cfg.eval.iters):
                loss, targets = run.strategy.eval_loss_sum(model, workload, batch, run.precision)
                total, count = total + loss, count + targets
            total, count = run.strategy.all_sum([total, float(count)])
            if count > 0:
                out[split] = total / count
    model.train(was_training)
    return out


def save(run: Run) -> Path | None:
    """A checkpoint of the current step (collective: every rank calls it)."""
    run.saved_step = run.step
    ranks = run.strategy.gather({"rng": _rng_state(run.strategy.device), "data": run.workload.state_dict()})
    trainer_state = {"step": run.step, "world_size": run.strategy.world_size,
                     "data_world_size": run.strategy.data_world_size, "ranks": ranks,
                     "tokens": run.tokens_seen, "strategy": run.strategy.name,
                     "precision": run.precision.state_dict(), "method": run.method.state_dict(),
                     "schedule": {"decay_iters": run.decay_iters(), "warmup_iters": run.cfg.optim.warmup_iters}}

    strategy = run.strategy
    weights = strategy.full_state_dict(run.model)
    optimizer_state = strategy.optimizer_state_dict(run.model, run.optimizer)
    # Every rank may add files (shards) to the temporary folder rank 0 creates; rank 0 then completes it atomically.
    tmp = strategy.gather(ckpt_io.new_checkpoint_dir(run.out_dir, run.step) if strategy.is_main else None)[0]
    strategy.save_shards(tmp, run.model, run.optimizer)
    strategy.barrier()

    def write_files(folder: Path) -> None:
        run.method.save_weights(run.model, folder, state_dict=weights)
        run.workload.save_files(folder, run.model)

    def write() -> Path:
        return ckpt_io.save_checkpoint(run.out_dir, run.step, write_files, optimizer_state, trainer_state,
                                       to_dict(run.cfg), run.model_config, keep_last=run.cfg.ckpt.keep_last, tmp=tmp)

    return strategy.save(write)
