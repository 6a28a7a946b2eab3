"""The plan of a training run: what `slimtune.train` predicts before step 1 and checks against its measured peak.

`setup` calls, without naming a method or strategy:

    plan_before_loading(cfg, workload.model_spec(), method, strategy, precision)   # may refuse
    ... build the model, prepare it, choose the strategy, build the optimizer ...
    run.plan = plan_for_run(cfg, model, method, strategy, precision)
    → a {"kind": "plan", "predicted_peak_bytes", "parts"} record; at the end of `fit`, run.plan.peak_event(per-rank peaks)
      gives {"kind": "peak", "measured_peak_bytes", "predicted_peak_bytes", "ratio"}.

The plan is the method's `estimate_memory(spec, run)` (weights, gradients, optimizer, activations), divided per rank
by the strategy's `estimate_memory(plan, spec, run)`, plus the framework baseline. What each measurement counts:

- CUDA: ``torch.cuda.max_memory_allocated`` (tensors only), so the peak record compares it with the prediction
  less the CUDA-context baseline.
- CPU: the process's peak resident memory (VmHWM), which includes the interpreter, the libraries and the data. The
  baseline of a run is therefore measured, not assumed: the resident memory before the first step less the
  model's own tensors, plus a calibrated allowance for what the first step adds (`CPU_FIRST_STEP_BYTES`).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field

import torch

from slimtune.errors import SlimtuneError
from slimtune.families import family_of
from slimtune.plan.estimate import ModelSpec, Plan, baseline_plan, format_bytes
from slimtune.plan.parts import MiB
from slimtune.plan.settings import NoEstimate, RunSettings

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------------------------------------------
# The model's shape
# ----------------------------------------------------------------------------------------------------------------


def spec_from_model(model: torch.nn.Module) -> ModelSpec:
    """The `ModelSpec` of a live model: slimtune's GPT, or a Hugging Face causal LM whose ``model_type`` the planner
    reads (`slimtune.plan.spec.HF_ARCHITECTURES`). Raises `NoEstimate` for anything else."""
    from slimtune.models.gpt import GPT

    if isinstance(model, GPT):
        return ModelSpec.from_gpt(**asdict(model.config))
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise NoEstimate(f"the planner cannot read the shape of a {type(model).__name__}")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise NoEstimate(f"the planner covers causal language models; {type(model).__name__} has another head")
    try:
        return ModelSpec.from_hf_config(config.to_dict())
    except SlimtuneError as exc:
        raise NoEstimate(str(exc)) from None


def spec_before_loading(cfg, data_spec: dict) -> ModelSpec:
    """The `ModelSpec` a run will build, from its config and the workload's `model_spec()` (no weights loaded):
    the run's model family says it, or raises `NoEstimate` with the reason."""
    return family_of(cfg).spec_before_loading(data_spec)


# ----------------------------------------------------------------------------------------------------------------
# The run's settings
# ----------------------------------------------------------------------------------------------------------------


def _loss_chunk_default() -> int:
    from slimtune.train.loss import causal_lm_loss

    return inspect.signature(causal_lm_loss).parameters["chunk"].default


def run_settings(cfg, precision, world_size: int, weight_dtype: torch.dtype, *, model=None) -> RunSettings:
    """`RunSettings` of a training run: its batch, longest sequence, dtypes, checkpointing and loss.

    The sequence is the longest one (gpt.block_size, or dataset.max_seq_len that batches are padded up to at
    most): the peak is reached on the longest batch. The model family fills in what depends on the kind of model
    (sequence, logits dtype, checkpointing, attention, loss chunk).
    """
    weights = DTYPE_NAMES[weight_dtype]
    acts = weights if precision.dtype == torch.float32 else DTYPE_NAMES[precision.dtype]
    common = dict(batch=cfg.batch_size, weight_dtype=weights, act_dtype=acts, device=precision.device.type,
                  world_size=world_size, grad_accum=cfg.optim.grad_accum, cpu_allocator=cfg.runtime.cpu_allocator)
    return family_of(cfg).run_settings(common, model=model)


def _weight_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most parameter elements are stored in."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return dtype if dtype in DTYPE_NAMES else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Device memory and baseline
# ----------------------------------------------------------------------------------------------------------------


def device_memory_bytes(device: torch.device) -> int | None:
    """Memory a run on ``device`` may use, in bytes: the GPU's total, or on CPU what this process holds plus what
    the system reports available (MemAvailable). None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu":
        from slimtune.memory import cpu_rss_bytes

        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024 + cpu_rss_bytes()
        except OSError:
            return None
    return None


CPU_FIRST_STEP_BYTES = 24 * MiB
"""Resident memory a CPU process gains in its first training step beyond the tensors the plan counts: autograd's
engine and thread pools, kernels' scratch buffers, lazily loaded code. Calibrated constant: ~23-25 MiB measured
with slimtune's GPT of several sizes (tests/plan/test_run.py measures it against real runs)."""


def _baseline_now(model_bytes: int) -> int:
    """On CPU, the run's baseline: this process's resident memory now, less the model's own tensors (the rest is
    the interpreter, the libraries and the data), plus `CPU_FIRST_STEP_BYTES`."""
    from slimtune.memory import cpu_rss_bytes

    return max(cpu_rss_bytes() - model_bytes, 0) + CPU_FIRST_STEP_BYTES


def _resident_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's CPU tensors, each made resident."""
    storages = {}
    with torch.no_grad():
        for t in _plain_tensors((*model.parameters(), *model.buffers())):
            if t.device.type == "cpu" and t.numel():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                # Weights loaded from safetensors are file mappings, resident only once read: read one element per
                # page now (the first forward reads them all anyway), so that what is subtracted below is resident.
                t.detach().reshape(-1)[::max(1, 4096 // t.element_size())].sum()
    return sum(storages.values())


def _plain_tensors(tensors):
    """The tensors that hold memory: a tensor subclass that wraps others (e.g. torchao's NF4 tensor: codes and
    scales) is replaced by what it wraps."""
    for t in tensors:
        if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
            yield t
        else:
            names, _ = t.__tensor_flatten__()
            yield from _plain_tensors(getattr(t, name) for name in names)


def _baseline(device: torch.device, measured: int | None) -> Plan:
    if measured is None:
        return baseline_plan(device.type)
    return Plan(parts={"baseline": measured},
                notes=[f"baseline: this process's resident memory without the model's tensors, plus the first "
                       f"step's runtime, {format_bytes(measured)}"])


CPU_ALLOCATOR_SLACK = 0.15
"""Share of the activations that a CPU run's resident peak exceeds the live tensors by when freed blocks are returned
(``runtime.cpu_allocator=release`` or ``system``): blocks one step frees are not all reused by the next (holes
that later small allocations split): measured 5-40 % of the activations with slimtune's GPT and SmolLM2-135M
(benchmarks/memory_plan.py); the calibrated middle."""

CPU_KEEP_RETENTION = 0.35
"""Under ``runtime.cpu_allocator=keep`` (the default: glibc keeps every freed block, so steps stop page-faulting),
the resident peak keeps rising for the first few steps and settles above the live tensors. The planner allows this
share of the weights' bytes for it (180 MiB for SmolLM2's 513 MiB), or `CPU_ALLOCATOR_SLACK` of the activations where
that is more. A fit, not a derivation: the settled excess is glibc heap fragmentation, which follows neither the
weights nor the activations and depends on the kernels' allocations, so on the CPU class. Fitted on SmolLM2-135M,
8-12-step runs on AMD Zen 3 (benchmarks/memory_plan.py, 2026-12-08): the excess over the live tensors was 104-412 MiB
at batch 4 x 256 (full, BAdam, LoRA, QLoRA, with and without checkpointing), 60 and -63 MiB at 4 x 128 (BAdam, LoRA);
0.35 puts all eight within 12 % (0.75, fitted on the 4 x 256 runs alone, left the 4 x 128 ones at 0.81-0.83).
docs/BENCHMARKS.md §11 has the rows, and what is known of other classes (Zen 4: less excess still)."""


def allocator_plan(device_kind: str, plan: Plan, cpu_allocator: str = "keep") -> Plan:
    """The device allocator's overhead over the live tensors of ``plan``, counted as ``temporary``: on CPU
    `CPU_ALLOCATOR_SLACK` of the activations, and with ``cpu_allocator=keep`` at least `CPU_KEEP_RETENTION` of the
    weights; nothing elsewhere (CUDA's peak is measured in allocated tensors)."""
    if device_kind != "cpu":
        return Plan()
    slack = int(CPU_ALLOCATOR_SLACK * plan.parts["activations"])
    what = "blocks freed by one step not all reused by the next"
    if cpu_allocator == "keep" and CPU_KEEP_RETENTION * plan.parts["weights"] > slack:
        slack = int(CPU_KEEP_RETENTION * plan.parts["weights"])
        what = "freed blocks kept by the process (runtime.cpu_allocator=keep) once the peak has settled"
    return Plan(parts={"temporary": slack}, notes=[f"CPU allocator: {what}, {format_bytes(slack)}"])


def _estimate(spec: ModelSpec, method, strategy, run: RunSettings, baseline: Plan) -> Plan:
    plan = strategy.estimate_memory(method.estimate_memory(spec, run), spec, run)
    return plan + allocator_plan(run.device, plan, run.cpu_allocator) + baseline


# ----------------------------------------------------------------------------------------------------------------
# The two calls of setup
# ----------------------------------------------------------------------------------------------------------------


def plan_before_loading(cfg, data_spec: dict, method, strategy, precision) -> None:
    """Refuse a run predicted not to fit its device, before any weight is loaded (``runtime.check_fit=false``
    skips the check). On CPU the baseline is what the process holds now."""
    device = precision.device
    if not cfg.runtime.check_fit:
        return
    try:
        spec = spec_before_loading(cfg, data_spec)
        dtype = method.load_options().get("dtype")
        if dtype is None:
            dtype = family_of(cfg).storage_dtype()
        run = run_settings(cfg, precision, strategy.world_size, dtype)
        plan = _estimate(spec, method, strategy, run, _baseline(device, _resident_now(device)))
    except NoEstimate:
        return  # plan_for_run says why there is no plan
    available = device_memory_bytes(device)
    if available is not None and plan.peak_bytes > available:
        raise SlimtuneError(
            f"this run is predicted to need {format_bytes(plan.peak_bytes)} on {device}, which has "
            f"{format_bytes(available)}:\n{plan.summary()}\nLower batch_size or the sequence length, turn on "
            f"gradient checkpointing, or pick a lighter method (`slimtune estimate --budget "
            f"{available / 2**30:.0f}GiB` lists what fits). runtime.check_fit=false starts it anyway.")


def _resident_now(device: torch.device) -> int | None:
    if device.type != "cpu":
        return None
    from slimtune.memory import cpu_rss_bytes

    return cpu_rss_bytes() + CPU_FIRST_STEP_BYTES


@dataclass
class RunPlan:
    """A run's plan (None when the planner cannot estimate this method or model, with the reason)."""

    plan: Plan | None
    device: torch.device
    reason: str = ""
    settings: dict = field(default_factory=dict)
    model_bytes: int = 0
    """The whole model's resident bytes when the plan was made (CPU)."""

    def settle_baseline(self) -> None:
        """Once the optimizer exists, measure the CPU baseline again: building it imports code the process keeps
        (~70 MB for torch's optimizers, measured on the Zen 3 host), which is baseline, not model. The larger of the
        two measurements stands (a strategy may have freed part of the model since)."""
        if self.plan is None or self.device.type != "cpu":
            return
        now = _baseline_now(self.model_bytes)
        if now > self.plan.parts["baseline"]:
            self.plan.parts["baseline"] = now

    def event(self) -> dict:
        """The ``plan`` metrics record, with a one-line message for the terminal."""
        if self.plan is None:
            return {"kind": "plan", "predicted_peak_bytes": None, "parts": {}, "reason": self.reason,
                    "message": f"memory plan: none ({self.reason})"}
        parts = ", ".join(f"{key} {format_bytes(value)}" for key, value in self.plan.parts.items() if value)
        return {"kind": "plan", "predicted_peak_bytes": self.plan.peak_bytes, "parts": dict(self.plan.parts),
                "settings": self.settings,
                "message": f"memory plan: peak {format_bytes(self.plan.peak_bytes)} per device ({parts})"}

    def comparable_prediction(self) -> int | None:
        """The prediction in the terms of the measured peak: on CUDA the allocator's peak excludes the context."""
        if self.plan is None:
            return None
        if self.device.type == "cuda":
            return self.plan.peak_bytes - self.plan.parts["baseline"]
        return self.plan.peak_bytes

    def peak_event(self, per_rank: list[int]) -> dict:
        """The ``peak`` metrics record: every rank's measured peak, the largest beside the (per-device) prediction,
        and their ratio (measured / predicted)."""
        measured = max(per_rank)
        predicted = self.comparable_prediction()
        ratio = measured / predicted if predicted else None
        text = f"peak memory {format_bytes(measured)}"
        if len(per_rank) > 1:
            text += (f" (largest of {len(per_rank)} ranks: rank {per_rank.index(measured)}; smallest "
                     f"{format_bytes(min(per_rank))}, rank {per_rank.index(min(per_rank))})")
        if ratio:
            text += f", predicted {format_bytes(predicted)} (measured/predicted {ratio:.2f})"
        return {"kind": "peak", "measured_peak_bytes": measured, "per_rank_peak_bytes": list(per_rank),
                "predicted_peak_bytes": predicted, "ratio": ratio, "message": text}


def plan_for_run(cfg, model: torch.nn.Module, method, strategy, precision) -> RunPlan:
    """The plan of this run on one device, from the whole, prepared model (before a strategy shards it), the method
    and the chosen strategy; `RunPlan.settle_baseline` completes it once the optimizer exists."""
    device = precision.device
    model_bytes = _resident_model_bytes(model) if device.type == "cpu" else 0
    baseline = _baseline_now(model_bytes) if device.type == "cpu" else None
    try:
        spec = spec_from_model(model)
        run = run_settings(cfg, precision, strategy.world_size, _weight_dtype(model), model=model)
        plan = _estimate(spec, method, strategy, run, _baseline(device, baseline))
    except NoEstimate as exc:
        return RunPlan(None, device, reason=str(exc))
    return RunPlan(plan, device, settings={"model": spec.name, "params": spec.n_params, **asdict(run)},
                   model_bytes=model_bytes)
