"""How a parallel strategy divides a step's memory between N ranks (bytes per rank).

Each helper takes a method's `Plan` (``full_adam``, ``badam_state``, ``lora_state``, ...) and returns what one
rank holds. Activations are per rank already (each rank runs its own micro-batch), so they pass through unchanged,
except in a pipeline, where a stage holds several micro-batches of its own layers.

Formulas for mixed-precision Adam (P parameters, bf16 weights, 18 bytes per parameter on one device):

- DDP: everything replicated, plus the gradient buckets the all-reduce copies gradients into: 18P + 4P.
- ZeRO-2: weights replicated, gradients and optimizer state partitioned: 2P + 18P/N.
- ZeRO-3 / FSDP: everything partitioned, plus the gathered weights and gradients of the largest unit:
  18P/N + 4·(largest unit), as DeepSpeed's ``estimate_zero3_model_states_mem_needs`` counts.
- BAdam under ZeRO-3: (2M + 16M/D)/N, as the BAdam README states, plus the same gather buffer.
- CPU offload: optimizer state (and fp32 gradients, and with ``params`` the weights) live in host memory.
"""

from __future__ import annotations

from slimtune.errors import SlimtuneError
from slimtune.plan.activations import _estimate, activation_options
from slimtune.plan.methods import badam_state
from slimtune.plan.parts import PARTS, Plan, dtype_bytes, format_bytes
from slimtune.plan.spec import ModelSpec

PIPELINE_SCHEDULES = ("1f1b", "gpipe")


def _check_world(world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise SlimtuneError(f"world_size must be a positive number of ranks, got {world_size!r}")


def _divide(plan: Plan, world_size: int, parts: tuple[str, ...]) -> dict[str, int]:
    return {key: -(-value // world_size) if key in parts else value for key, value in plan.parts.items()}


def ddp(plan: Plan, world_size: int, *, bucket_view: bool = False) -> Plan:
    """DistributedDataParallel: each rank holds the whole ``plan``, plus gradient buckets.

    DDP all-reduces gradients through flat buckets that, unless ``gradient_as_bucket_view=True``, are a second
    copy of every gradient: ``gradients`` bytes more, counted as ``temporary``.
    """
    _check_world(world_size)
    buckets = 0 if bucket_view else plan.parts["gradients"]
    note = "DDP: replicated on each of {} ranks{}".format(
        world_size, "" if bucket_view else f", + gradient buckets {format_bytes(buckets)}")
    return plan + Plan(parts={"temporary": buckets}, notes=[note])


def zero2(plan: Plan, world_size: int, *, weight_dtype: str = "bf16") -> Plan:
    """ZeRO stage 2 (DeepSpeed): weights replicated; gradients and optimizer state partitioned over N ranks.

    Per rank: weights + (gradients + low-precision gradients)/N + optimizer/N. ZeRO keeps each rank's partition
    of the 16-bit gradients next to its fp32 copy, so with 16-bit weights the gradient share grows by w bytes
    per trained parameter: full Adam in bf16 gives 2P + (4 + 2 + 12)P/N = 2P + 18P/N. (DeepSpeed's
    ``estimate_zero2_model_states_mem_needs`` says 4P + 16P/N: it counts every 16-bit gradient alive at once
    before partitioning.)
    """
    _check_world(world_size)
    w = dtype_bytes(weight_dtype)
    low_precision_grads = plan.trainable_params * w if w < 4 else 0
    parts = _divide(plan, world_size, ("optimizer",))
    parts["gradients"] = -(-(plan.parts["gradients"] + low_precision_grads) // world_size)
    return Plan(parts=parts, notes=plan.notes + [f"ZeRO-2 over {world_size} ranks: gradients and optimizer "
                                                  "partitioned, weights replicated"],
                host_bytes=plan.host_bytes, trainable_params=plan.trainable_params)


def zero3(plan: Plan, world_size: int, gather_params: int, *, weight_dtype: str = "bf16") -> Plan:
    """ZeRO stage 3 (DeepSpeed) / full sharding: weights, gradients and optimizer state partitioned over N ranks.

    Per rank: (weights + gradients + optimizer)/N, plus, while a unit computes, its gathered weights and its
    unsharded gradients: 2·w bytes per parameter of the largest unit (``gather_params``; a block, or the embedding
    or head if larger: `ModelSpec.largest_unit_params`). Full Adam in bf16: 18P/N + 4·largest.
    Applied to `badam_state` it gives BAdam's (2M + 16M/D)/N (plus the same gather buffer).
    """
    _check_world(world_size)
    gathered = 2 * dtype_bytes(weight_dtype) * gather_params
    parts = _divide(plan, world_size, ("weights", "gradients", "optimizer"))
    parts["temporary"] += gathered
    return Plan(parts=parts, notes=plan.notes + [f"ZeRO-3 over {world_size} ranks; gathered unit of "
                                                  f"{gather_params / 1e6:.0f}M parameters: {format_bytes(gathered)}"],
                host_bytes=plan.host_bytes, trainable_params=plan.trainable_params)


def fsdp(plan: Plan, world_size: int, gather_params: int, *, weight_dtype: str = "bf16") -> Plan:
    """FSDP / FSDP2 full sharding: the same accounting as `zero3` (sharded states, one gathered unit)."""
    return zero3(plan, world_size, gather_params, weight_dtype=weight_dtype)


def badam_zero3(spec: ModelSpec, world_size: int, weight_dtype: str = "bf16", **badam_options) -> Plan:
    """BAdam under ZeRO-3: ``zero3(badam_state(spec, ...))``, i.e. (2M + 16A)/N + the gathered largest unit."""
    return zero3(badam_state(spec, weight_dtype, **badam_options), world_size, spec.largest_unit_params,
                 weight_dtype=weight_dtype)


def cpu_offload(plan: Plan, *, params: bool = False) -> Plan:
    """Optimizer offload (DeepSpeed ZeRO-Offload, FSDP CPUOffload): the optimizer state and the fp32 gradients live
    in host memory and the optimizer steps there; with ``params`` the weights do as well (ZeRO-3 offload_param),
    leaving only gathered units and activations on the device. Moved bytes go to ``host_bytes``."""
    moved = ("optimizer", "gradients") + (("weights",) if params else ())
    parts = dict(plan.parts)
    host = sum(parts[key] for key in moved)
    for key in moved:
        parts[key] = 0
    return Plan(parts=parts, notes=plan.notes + [f"offloaded to host: {', '.join(moved)} ({format_bytes(host)})"],
                host_bytes=plan.host_bytes + host, trainable_params=plan.trainable_params)


def _stage_layers(n_layers: int, n_stages: int, layers_per_stage) -> list[range]:
    if layers_per_stage is None:
        base, extra = divmod(n_layers, n_stages)
        layers_per_stage = [base + (1 if s < extra else 0) for s in range(n_stages)]
    layers_per_stage = list(layers_per_stage)
    if len(layers_per_stage) != n_stages or sum(layers_per_stage) != n_layers or min(layers_per_stage) < 0:
        raise SlimtuneError(f"layers_per_stage {layers_per_stage} must be {n_stages} counts adding up to {n_layers}")
    ranges, start = [], 0
    for count in layers_per_stage:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def pipeline_stage(states: Plan, spec: ModelSpec, *, stage: int, n_stages: int, micro_batch: int, seq: int,
                   n_microbatches: int, schedule: str = "1f1b", layers_per_stage=None, **options) -> Plan:
    """Memory of one pipeline stage: its share of the model's states and its in-flight micro-batches' activations.

    ``states``: the method's plan for the whole model on one device (weights, gradients, optimizer); the stage
    keeps the fraction of it that its parameters are of the model's (its layers, plus the embedding on the first
    stage and the final norm and head on the last, with its own copy of a tied embedding matrix). Exact for
    methods that spend the same bytes on every parameter (full Adam), proportional otherwise.
    Activations: the stage's layers for one (micro_batch, seq) micro-batch (``options`` as for
    `activation_bytes`), times the micro-batches in flight: all ``n_microbatches`` with GPipe;
    ``min(n_stages - stage, n_microbatches)`` with 1F1B, whose first stage holds the most. Temporary: one
    micro-batch's backward workspace plus the send/receive buffers (an activation and a gradient, a·h bytes per
    token each).
    """
    if schedule not in PIPELINE_SCHEDULES:
        raise SlimtuneError(f"pipeline schedule {schedule!r} is not one of {', '.join(PIPELINE_SCHEDULES)}")
    if not isinstance(n_stages, int) or not 1 <= n_stages <= spec.n_layers:
        raise SlimtuneError(f"n_stages must be between 1 and the {spec.n_layers} layers of {spec.name}, got {n_stages}")
    if not isinstance(stage, int) or not 0 <= stage < n_stages:
        raise SlimtuneError(f"stage must be in 0..{n_stages - 1}, got {stage!r}")
    if not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise SlimtuneError(f"n_microbatches must be a positive integer, got {n_microbatches!r}")
    layers = _stage_layers(spec.n_layers, n_stages, layers_per_stage)[stage]
    first, last = stage == 0, stage == n_stages - 1
    stage_params = len(layers) * spec.layer_params
    if first:
        stage_params += spec.embedding_params
    if last:
        stage_params += spec.norm_params + spec.head_params
        if spec.tied_embeddings and not first:
            stage_params += spec.vocab * spec.hidden
    share = stage_params / spec.n_params
    parts = {key: round(states.parts[key] * share) if key in ("weights", "gradients", "optimizer") else 0
             for key in PARTS}

    opts = activation_options(**options)
    est = _estimate(spec, micro_batch, seq, opts, layers=layers, first=first, last=last)
    in_flight = n_microbatches if schedule == "gpipe" else min(n_stages - stage, n_microbatches)
    per_microbatch = sum(t.nbytes for t in est.items)
    p2p = 2 * dtype_bytes(opts.act_dtype) * spec.hidden * micro_batch * seq
    parts["activations"] = in_flight * per_microbatch
    parts["temporary"] = est.temporary + p2p
    return Plan(parts=parts,
                notes=[f"pipeline stage {stage}/{n_stages} ({schedule}): layers {layers.start}..{layers.stop - 1}, "
                       f"{share:.1%} of the parameters, {in_flight} micro-batches in flight x "
                       f"{format_bytes(per_microbatch)}"] + est.notes,
                trainable_params=round(states.trainable_params * share))


# ----------------------------------------------------------------------------------------------------------------
# Strategy names the planner knows besides the registered strategies
# ----------------------------------------------------------------------------------------------------------------


def _zero(stage: int):
    def per_device(plan: Plan, spec: ModelSpec, run) -> list[Plan]:
        if stage == 2:
            return [zero2(plan, run.world_size, weight_dtype=run.weight_dtype)] * run.world_size
        return [zero3(plan, run.world_size, spec.largest_unit_params, weight_dtype=run.weight_dtype)] * run.world_size
    return per_device


PLANNED_STRATEGIES = {
    "zero2": _zero(2),
    "zero3": _zero(3),
}
"""Names that ``slimtune estimate`` plans besides the registered strategies (name → per-device plans from a
method's single-device plan): DeepSpeed's ZeRO stages, which a run selects as strategy=deepspeed with
deepspeed.stage=2 or 3."""
