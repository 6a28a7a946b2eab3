"""strategy=pipeline: the model cut into stages, one per process, trained with torch.distributed.pipelining.

`torchrun --nproc_per_node=N -m slimtune train ... strategy=pipeline pipeline.force=true` cuts the model into units
(`slimtune.parallel.units`: embedding, blocks, head; or fx node groups), measures what every unit costs
(`slimtune.parallel.profile`, on rank 0, with a batch shaped like the run's), lets the exact partitioner
(`slimtune.parallel.partition`) choose the contiguous stages that minimise the slowest one under the memory cap, and
builds torch's own `PipelineStage`s and schedule (GPipe, 1F1B, interleaved 1F1B, zero bubble) from them. slimtune
adds no pipeline engine of its own.

What stays exact: every rank reads the same batches (a pipeline is one model replica), the micro-batches of a step
are back-propagated with their *summed* token losses times 1 / (target tokens of the step), as in one process, and
a weight two stages share (a tied embedding and output head) gets the sum of both stages' gradients on both, so the
copies stay equal. Per-micro-batch losses equal the unsplit model's, and so do the parameters after a step (to float
rounding of the gradient sums). Checkpoints hold one ordinary model and a name-keyed optimizer state: they resume
with any stage count, or in one process.

Refused: methods whose trainable set changes during the run or that act on gradients through hooks (BAdam), fp16
loss scaling (the schedule runs backward itself), compiled models, and, unless `pipeline.force=true`, a model
predicted to fit one device.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.families import family_of
from slimtune.parallel.ddp import DDP
from slimtune.parallel.partition import partition
from slimtune.parallel.units import Chain, Units, cut_units
from slimtune.registry import STRATEGIES

SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "zb")
KEPT_SCHEDULES = 8
"""Schedules (one per input shape) a runner keeps; each holds receive buffers of its shape."""
BALANCES = ("time", "memory", "both")


@dataclass
class PipelineConfig:
    """Pipeline parallelism: the model cut into balanced stages, one per process."""

    microbatches: int = 0
    """Micro-batches each batch is cut into (batch_size must divide by it); 0 = one per stage."""
    schedule: str = "1f1b"
    """gpipe, 1f1b, interleaved1f1b (two stages per process) or zb (zero bubble, two stages per process)."""
    balance: str = "time"
    """What the partitioner balances: time (measured seconds per unit), memory (bytes per unit) or both."""
    split_points: str = ""
    """Comma-separated names where units start: units of the language models (transformer.h.6, layers.12) or
    top-level modules of other models (those fx cannot trace then run their top-level modules in order). Give
    stages - 1 of them to fix the split by hand."""
    memory_cap: int = 0
    """Most bytes one stage may hold (weights, gradients, optimizer state, activations in flight); 0 = no cap."""
    force: bool = False
    """Split even a model predicted to fit one device (which otherwise trains better with strategy=ddp)."""
    profile_repeats: int = 3
    """Timed forward+backward passes per unit when balancing by time (the median counts)."""

    def __post_init__(self):
        from slimtune.typed_config import check_choice

        check_choice("pipeline.schedule", self.schedule, SCHEDULES)
        check_choice("pipeline.balance", self.balance, BALANCES)
        if self.microbatches < 0:
            raise SlimtuneError(f"pipeline.microbatches must be >= 0 (0 = one per stage), got {self.microbatches}")
        if self.memory_cap < 0:
            raise SlimtuneError(f"pipeline.memory_cap must be a number of bytes >= 0 (0 = none), got "
                                f"{self.memory_cap}")
        if self.profile_repeats < 1:
            raise SlimtuneError(f"pipeline.profile_repeats must be >= 1, got {self.profile_repeats}")

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.schedule in ("interleaved1f1b", "zb") else 1

    def split_point_list(self) -> list[str]:
        return [name.strip() for name in self.split_points.split(",") if name.strip()]


# ---------------------------------------------------------------------------------------------------------------
# The engine: this rank's stages and the schedule that runs them (usable without the training loop)
# ---------------------------------------------------------------------------------------------------------------


def stage_ranks(n_stages: int, world_size: int) -> list[int]:
    """The rank that runs each stage: round robin (stage s on rank s mod world_size), as the interleaved schedules
    expect."""
    return [s % world_size for s in range(n_stages)]


class PipelineRunner:
    """This rank's stages of `units` split into `parts`, and a torch schedule per input shape.

    Collective: every rank constructs it with the same arguments, and calls `step` / `eval_loss` with the same
    batch (only the first stage reads the inputs and only the last the targets, but all derive the shapes)."""

    def __init__(self, units: Units, parts: Sequence[range], schedule: str, microbatches: int, device: torch.device,
                 rank: int | None = None, world_size: int | None = None):
        self.parts, self.names = list(parts), list(units.names)
        self.inputs, self.loss_sum = units.inputs, units.loss_sum  # no reference to other ranks' units is kept
        self.schedule_name, self.microbatches, self.device = schedule, microbatches, device
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.ranks = stage_ranks(len(self.parts), self.world_size)
        self.my_stages = [s for s, r in enumerate(self.ranks) if r == self.rank]
        self.modules = [Chain([units.modules[i] for i in self.parts[s]]) for s in self.my_stages]
        self.tied = self._tie_groups(units)
        self._schedules: OrderedDict[tuple, Any] = OrderedDict()
        self._scale = 1.0
        self.losses: list[torch.Tensor] = []  # last stage: the summed loss of each micro-batch of the last call

    @property
    def is_last(self) -> bool:
        return self.ranks[-1] == self.rank

    def parameters(self):
        seen = set()
        for module in self.modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def _tie_groups(self, units: Units) -> list[tuple[Any, list[nn.Parameter]]]:
        """(process group, this rank's parameters) for every set of ranks whose stages share parameters."""
        holders: dict[int, list[int]] = {}
        params: dict[int, nn.Parameter] = {}
        for stage, part in enumerate(self.parts):
            for i in part:
                for p in units.modules[i].parameters():
                    ranks = holders.setdefault(id(p), [])
                    if self.ranks[stage] not in ranks:
                        ranks.append(self.ranks[stage])
                    params[id(p)] = p
        by_ranks: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for key, ranks in holders.items():
            if len(ranks) > 1:
                by_ranks.setdefault(tuple(sorted(ranks)), []).append(params[key])
        groups = []
        for ranks, shared in sorted(by_ranks.items(), key=lambda item: item[0]):  # same order on every rank
            # A new group is collective (every rank creates every one); sharing among all ranks needs none.
            group = dist.group.WORLD if len(ranks) == self.world_size else dist.new_group(list(ranks))
            if self.rank in ranks:
                groups.append((group, shared))
        return groups

    def _loss_fn(self, output, target):
        loss = self.loss_sum(output, target)
        self.losses.append(loss.detach().float())
        return loss * self._scale

    def _schedule(self, args: tuple[torch.Tensor, ...], n_micro: int, kind: str):
        # torch's stages fix the shapes they send and receive (and allocate their buffers) when they first run: one
        # schedule per input shape, the most recently used few kept (fine-tuning batches come padded to a multiple
        # of units.PAD_TO tokens, so there are few shapes).
        key = (tuple((tuple(a.shape), a.dtype) for a in args), n_micro, kind)
        if key in self._schedules:
            self._schedules.move_to_end(key)
        else:
            self._schedules[key] = self._build_schedule(n_micro, kind)
            if len(self._schedules) > KEPT_SCHEDULES:
                self._schedules.popitem(last=False)
        return self._schedules[key]

    def _build_schedule(self, n_micro: int, kind: str):
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
                                                  ScheduleLoopedBFS)

        stages = [PipelineStage(module, s, len(self.parts), self.device)
                  for module, s in zip(self.modules, self.my_stages)]
        if kind == "forward":  # evaluation: all forwards in order, any number of micro-batches
            kind = "gpipe" if len(stages) == 1 else "looped"
        kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved1f1b": ScheduleInterleaved1F1B,
                 "zb": ScheduleInterleavedZeroBubble, "looped": ScheduleLoopedBFS}
        cls = kinds[kind]
        if kind in ("gpipe", "1f1b"):
            return cls(stages[0], n_micro, loss_fn=self._loss_fn, scale_grads=False)
        return cls(stages, n_micro, loss_fn=self._loss_fn, scale_grads=False)

    def _run(self, schedule, args, target, n_micro: int, *, train: bool):
        self.losses = []
        first, last = self.ranks[0] == self.rank, self.is_last
        call = schedule.step if train else schedule.eval
        call(*(args if first else ()), **({"target": target} if last else {}))
        # The first call of a new schedule also runs the loss once to infer shapes: keep only the real micro-batches.
        self.losses = self.losses[-n_micro:] if last else []

    def step(self, batch, scale: float, autocast=None) -> torch.Tensor:
        """Forward and backward of `batch` in `self.microbatches` micro-batches; gradients of (sum of token losses)
        * `scale` accumulate in `.grad`. Returns the summed loss (on the last stage; 0 elsewhere)."""
        import contextlib

        args, target = self.inputs(batch)
        rows = args[0].shape[0]
        if rows % self.microbatches:
            raise SlimtuneError(f"a batch of {rows} rows does not divide into pipeline.microbatches="
                                f"{self.microbatches}; choose batch_size as a multiple of it")
        self._scale = scale
        with autocast() if autocast is not None else contextlib.nullcontext():
            self._run(self._schedule(args, self.microbatches, self.schedule_name), args, target, self.microbatches,
                      train=True)
        return self._total()

    def eval_loss(self, batch, autocast=None) -> torch.Tensor:
        """The summed loss of `batch` (forward only, one micro-batch), on the last stage; 0 elsewhere."""
        import contextlib

        args, target = self.inputs(batch)
        with autocast() if autocast is not None else contextlib.nullcontext():
            self._run(self._schedule(args, 1, "forward"), args, target, 1, train=False)
        return self._total()

    def _total(self) -> torch.Tensor:
        return torch.stack(self.losses).sum() if self.losses else torch.zeros((), device=self.device)

    def sum_tied_grads(self) -> None:
        """Each shared weight gets the sum of its stages' gradients, so its copies take identical steps."""
        for group, params in self.tied:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=group)

    def grad_norm_squared(self) -> torch.Tensor:
        """This rank's share of the squared gradient norm: a shared weight counts on the lowest rank holding it."""
        skip = {id(p) for group, params in self.tied for p in params
                if min(dist.get_process_group_ranks(group)) != self.rank}
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.parameters():
            if p.grad is not None and id(p) not in skip:
                total += p.grad.detach().double().pow(2).sum()
        return total


# ---------------------------------------------------------------------------------------------------------------
# The strategy
# ---------------------------------------------------------------------------------------------------------------


class PipelineShard(nn.Module):
    """The stages one rank runs. Their parameters are the model's own; `config` is the whole model's (the checkpoint's
    config files are written from it)."""

    def __init__(self, runner: PipelineRunner, config):
        super().__init__()
        self.stages = nn.ModuleList(runner.modules)
        self.config = config
        self.runner = runner


@STRATEGIES.register("pipeline")
class Pipeline(DDP):
    """Stages of one model replica on N processes (torchrun), run by a torch.distributed.pipelining schedule."""

    config_cls = PipelineConfig
    data_rank, data_world_size = 0, 1  # one replica: every rank reads the whole batch
    _whole_model_peak: int | None = None  # bytes the whole model would need on one device (from estimate_memory)
    follows_trainable_changes = False  # each stage's optimizer holds a fixed set of parameters

    def setup(self, device: torch.device) -> torch.device:
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise SlimtuneError("strategy=pipeline needs 2 or more processes: torchrun --nproc_per_node=N -m slimtune "
                                "train ... strategy=pipeline (one stage per process)")
        if self.cfg.runtime.compile:
            raise SlimtuneError("strategy=pipeline runs the model's modules one unit at a time, past a compiled "
                                "forward: set runtime.compile=false")
        if self.cfg.runtime.precision == "fp16":
            raise SlimtuneError("strategy=pipeline cannot scale fp16 losses (the schedule runs backward itself); use "
                                "runtime.precision=bf16 or fp32")
        device = super().setup(device)
        self.n_stages = self.world_size * self.options.stages_per_rank
        self.microbatches = self.options.microbatches or self.n_stages
        check_microbatches(self.options.schedule, self.microbatches, self.n_stages, self.world_size)
        if self.cfg.batch_size % self.microbatches:
            raise SlimtuneError(f"batch_size={self.cfg.batch_size} does not divide into pipeline.microbatches="
                                f"{self.microbatches} micro-batches; make batch_size a multiple of it (or change "
                                f"pipeline.microbatches)")
        return device

    def describe(self) -> str:
        names = self.runner.names
        parts = ", ".join(names[p.start] if len(p) == 1 else f"{names[p.start]}..{names[p.stop - 1]}"
                          for p in self.runner.parts)
        return (f"{self.world_size} processes, {self.n_stages} stages [{parts}], {self.options.schedule}, "
                f"{self.microbatches} micro-batches")

    def check(self, method, model: nn.Module) -> None:
        if not (method.fixed_trainable_set or self.follows_trainable_changes) or not method.grads_in_param_grad:
            raise SlimtuneError(
                f"method={method.name} cannot run under strategy=pipeline: each stage's optimizer holds a fixed set of "
                f"parameters and the stages add shared weights' gradients in .grad, while {method.name} changes what "
                f"trains and acts on gradients through hooks. Use strategy=ddp or strategy=fsdp")

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def on_trainable_change(self, model: nn.Module, forward_model: nn.Module) -> nn.Module:
        return forward_model  # nothing is wrapped (and the trainable set cannot change: see `check`)

    # -- splitting ------------------------------------------------------------------------------------------------

    def shard(self, model: nn.Module, method) -> nn.Module:
        self._check_fits()
        units = cut_units(model, self.options.split_point_list())
        if self.n_stages > len(units):
            raise SlimtuneError(f"{type(model).__name__} has {len(units)} units ({', '.join(units.names)}), too few "
                                f"for {self.n_stages} stages; run fewer processes (or for pipeline.schedule="
                                f"{self.options.schedule}, a schedule with one stage per process)")
        parts = self.gather(self._plan_parts(units) if self.is_main else None)[0]  # rank 0 measures and decides
        self._names = _tensor_names(model)
        self._tied_names = [names for names in self._names.values() if len(names) > 1]
        state = model.state_dict()
        self._state_keys = list(state)
        # Tensors no unit holds (e.g. an unused module's) are saved as they were.
        held = {id(t) for unit in units.modules for t in [*unit.parameters(), *unit.buffers()]}
        self._unheld = {name: state[name].detach().cpu() for ids, names in self._names.items() if ids not in held
                        for name in names} if self.is_main else {}
        self._whole = model  # until build_optimizer has seen the whole model's parameter groups
        self.runner = PipelineRunner(units, parts, self.options.schedule, self.microbatches, self.device,
                                     self.rank, self.world_size)
        shard = PipelineShard(self.runner, getattr(model, "config", None))
        # Names of this rank's tensors only: the ids of the others' are free for reuse once they are dropped.
        mine = {id(t) for t in [*shard.parameters(), *shard.buffers()]}
        self._names = {key: names for key, names in self._names.items() if key in mine}
        return shard

    def _check_fits(self) -> None:
        from slimtune.memory import format_bytes
        from slimtune.plan.run import device_memory_bytes

        if self.options.force or self._whole_model_peak is None:
            return
        available = device_memory_bytes(self.device)
        if available is not None and self._whole_model_peak <= available:
            raise SlimtuneError(
                f"the model fits one device ({format_bytes(self._whole_model_peak)} predicted, "
                f"{format_bytes(available)} available on {self.device}), so it is not split: train it with "
                f"strategy=ddp (faster), or set pipeline.force=true to pipeline it anyway")

    def _plan_parts(self, units: Units) -> list[range]:
        """The exact partition of the units for this run (measured on this rank)."""
        from slimtune.parallel.profile import profile_units

        rows = self.cfg.batch_size // self.microbatches
        seq = family_of(self.cfg).seq_len()
        costs = profile_units(units, units.example(rows, seq), repeats=self.options.profile_repeats)
        return plan_partition(costs, self.n_stages, self.options.schedule, self.microbatches,
                              balance=self.options.balance, memory_cap=self.options.memory_cap or None)

    def build_optimizer(self, method, model: nn.Module, ctx) -> torch.optim.Optimizer:
        # The whole model's optimizer, restricted to this rank's parameters: the same groups (weight decay, a tied
        # embedding recognised as one) and hyperparameters as in one process, and the whole model's parameter
        # order, which checkpoints use so that they load with any stage count.
        whole = method.build_optimizer(self._whole, ctx)
        names = {id(p): n for n, p in self._whole.named_parameters()}
        mine = {id(p) for p in model.parameters()}
        self._order = [[names[id(p)] for p in group["params"]] for group in whole.param_groups]
        self._group_options = [{k: v for k, v in g.items() if k != "params"} for g in whole.param_groups]
        for group in whole.param_groups:  # no state exists yet: dropping other ranks' parameters is all it takes
            group["params"] = [p for p in group["params"] if id(p) in mine]
        whole.param_groups = [g for g in whole.param_groups if g["params"]]
        del self._whole
        return whole

    # -- one step -------------------------------------------------------------------------------------------------

    def forward_backward(self, model, workload, batches, precision):
        counts = [workload.count_targets(b) for b in batches]
        scale = 1.0 / max(sum(counts), 1)  # every rank holds the whole batch: no sum over ranks
        total = torch.zeros((), device=precision.device)
        for batch in batches:
            total += self.runner.step(batch, scale, precision.autocast)
        self.runner.sum_tied_grads()
        return total, sum(counts) if self.runner.is_last else 0

    def optimizer_step(self, optimizer, precision, clip):
        grad_norm = None
        if clip is not None:  # the norm over all stages, not this rank's share
            (squared,) = self.all_sum([float(self.runner.grad_norm_squared())])
            grad_norm = torch.tensor(squared ** 0.5)
            max_norm = self.cfg.optim.grad_clip
            if grad_norm > max_norm:
                for p in self.runner.parameters():
                    if p.grad is not None:
                        p.grad.mul_(max_norm / (float(grad_norm) + 1e-6))
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def eval_loss_sum(self, model, workload, batch, precision) -> tuple[float, int]:
        loss = float(self.runner.eval_loss(batch, precision.autocast))
        return loss, workload.count_targets(batch) if self.runner.is_last else 0

    # -- checkpoints: one ordinary model, optimizer state in the whole model's parameter order -----------------------

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        mine: dict[str, torch.Tensor] = {}
        for t in list(model.parameters()) + list(model.buffers()):
            for name in self._names.get(id(t), ()):
                mine[name] = t.detach().cpu()
        parts = self.gather(mine)
        if not self.is_main:
            return None
        whole: dict[str, torch.Tensor] = dict(self._unheld)
        for part in parts:
            for name, tensor in part.items():
                whole.setdefault(name, tensor)
        # Names of one tied tensor share one copy, as in the model's own state dict (the file stores it once).
        for names in self._tied_names:
            for name in names[1:]:
                whole[name] = whole[names[0]]
        return {name: whole[name] for name in self._state_keys}

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        # The state dict the whole model's optimizer would have in one process: states by position in the whole
        # model's parameter order, that optimizer's groups (the loop sets every group's lr before each step).
        mine = {self._canonical(p): {k: v.cpu() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                for g in optimizer.param_groups for p in g["params"] if p in optimizer.state}
        merged: dict[str, dict] = {}
        for part in self.gather(mine):
            for name, st in part.items():
                merged.setdefault(name, st)  # a tied weight's state is the same on every rank holding it
        flat = [name for group in self._order for name in group]
        groups, start = [], 0
        for options, names in zip(self._group_options, self._order):
            groups.append({**options, "lr": optimizer.param_groups[0]["lr"],
                           "params": list(range(start, start + len(names)))})
            start += len(names)
        return {"state": {i: merged[n] for i, n in enumerate(flat) if n in merged}, "param_groups": groups}

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        flat = [name for group in self._order for name in group]
        if len(flat) != sum(len(g["params"]) for g in state["param_groups"]):
            raise SlimtuneError(f"the checkpoint's optimizer has {sum(len(g['params']) for g in state['param_groups'])}"
                                f" parameters, this model {len(flat)}")
        saved = {flat[i]: st for i, st in state["state"].items()}
        local = optimizer.state_dict()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        local["state"] = {i: saved[self._canonical(p)] for i, p in enumerate(params) if self._canonical(p) in saved}
        optimizer.load_state_dict(local)

    def _canonical(self, p: nn.Parameter) -> str:
        """The parameter's name in the whole model (the first, for a tied one)."""
        return self._names[id(p)][0]

    def estimate_memory(self, plan, spec, run):
        # What one device would need for the whole model decides whether to split at all (see `shard`).
        self._whole_model_peak = plan.peak_bytes
        return max(self._stage_plans(plan, spec, run), key=lambda p: p.peak_bytes)

    def estimate_per_device(self, plan, spec, run) -> list:
        stages = self._stage_plans(plan, spec, run)
        if len(stages) == run.world_size:
            return stages
        return [max(stages, key=lambda p: p.peak_bytes)] * run.world_size  # several stages per rank: the largest

    def _stage_plans(self, plan, spec, run) -> list:
        from slimtune.plan.estimate import pipeline_stage

        n_stages = min(run.world_size * self.options.stages_per_rank, spec.n_layers)
        micro = self.options.microbatches or n_stages
        schedule = "gpipe" if self.options.schedule == "gpipe" else "1f1b"
        return [pipeline_stage(plan, spec, stage=s, n_stages=n_stages, micro_batch=max(1, run.batch // micro),
                               seq=run.seq, n_microbatches=micro, schedule=schedule) for s in range(n_stages)]


def check_microbatches(schedule: str, microbatches: int, stages: int, world_size: int) -> None:
    """What torch's schedules need of the micro-batch count, as an error naming the key to change."""
    if schedule == "1f1b" and microbatches < stages:
        raise SlimtuneError(f"pipeline.microbatches={microbatches} is fewer than the {stages} stages, which "
                            f"pipeline.schedule=1f1b needs at least; raise it or use pipeline.schedule=gpipe")
    rounds = max(1, microbatches // world_size)
    if schedule in ("interleaved1f1b", "zb") and (microbatches < world_size or microbatches % rounds):
        raise SlimtuneError(f"pipeline.schedule={schedule} needs pipeline.microbatches to be a multiple of the "
                            f"{world_size} processes; got {microbatches}")


def plan_partition(costs, stages: int, schedule: str, microbatches: int, *, balance: str = "time",
                   memory_cap: float | None = None) -> list[range]:
    """The exact partition of profiled units (`slimtune.parallel.profile.UnitCosts`) into `stages`, counting the
    activations of the micro-batches the schedule keeps in flight on the first stage (the most any stage holds)."""
    in_flight = microbatches if schedule == "gpipe" else min(stages, microbatches)
    try:
        return partition(costs.seconds, stages, memory=costs.memory(in_flight), memory_cap=memory_cap,
                         balance=balance)
    except SlimtuneError as exc:  # partition() names its own argument; a run sets the cap with a config key
        message = str(exc).replace("memory_cap", "pipeline.memory_cap").replace("more stages", "more processes")
        raise SlimtuneError(message) from None


def _tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """id of each parameter and persistent buffer -> its names in `model.state_dict()` (several if tied)."""
    keys = set(model.state_dict())
    names: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        if name in keys:
            names.setdefault(id(t), []).append(name)
    return names
