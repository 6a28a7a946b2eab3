"""The memory planner's front door: every function a method's ``estimate_memory`` or ``slimtune estimate`` needs.

A step's peak is a sum of plans, one per concern::

    spec = ModelSpec.preset("llama-3-8b")
    plan = (badam_state(spec, "bf16")                        # all weights + the active block's Adam state
            + activation_bytes(spec, batch=2, seq=1024, checkpointing=True,
                               trainable_layers=(0,))          # BAdam with layer 0 active: the worst case
            + baseline_plan("cuda"))                           # CUDA context
    plan.peak_bytes, plan.fits("24GiB"), plan.to_json()

- shapes: `ModelSpec` (spec.py)
- weights and method states: `weights_bytes`, `full_adam`, `badam_state`, `lora_state`, `qlora_state`,
  `qat_state`, `bitnet_state` (methods.py)
- activations: `activation_bytes`, `activation_items`, `layer_saved_tensors` (activations.py)
- strategies: `ddp`, `zero2`, `zero3` / `fsdp`, `badam_zero3`, `cpu_offload`, `pipeline_stage` (strategies.py)
- units: `parse_budget`, `format_bytes`, `dtype_bytes` (parts.py); the framework baseline (here)
"""

from __future__ import annotations

from slimtune.errors import SlimtuneError
from slimtune.plan.activations import (ActivationOptions, LoraAdapters, SavedTensor, activation_bytes,
                                       activation_items, layer_backward_workspace, layer_saved_tensors)
from slimtune.plan.methods import (QUANT_FORMATS, adam_bytes_per_param, badam_state, bitnet_state, full_adam,
                                   linear_weight_bytes, lora_state, qat_state, qlora_state, weights_bytes)
from slimtune.plan.parts import PARTS, MiB, Plan, dtype_bytes, format_bytes, parse_budget
from slimtune.plan.spec import ModelSpec
from slimtune.plan.strategies import badam_zero3, cpu_offload, ddp, fsdp, pipeline_stage, zero2, zero3

__all__ = [
    "FRAMEWORK_BASELINE", "PARTS", "QUANT_FORMATS", "ActivationOptions", "LoraAdapters", "ModelSpec", "Plan",
    "SavedTensor", "activation_bytes", "activation_items", "adam_bytes_per_param", "badam_state", "badam_zero3",
    "baseline_plan", "bitnet_state", "cpu_offload", "ddp", "dtype_bytes", "format_bytes", "framework_baseline",
    "fsdp", "full_adam", "layer_backward_workspace", "layer_saved_tensors", "linear_weight_bytes", "lora_state",
    "parse_budget", "pipeline_stage", "qat_state", "qlora_state", "weights_bytes", "zero2", "zero3",
]


# ----------------------------------------------------------------------------------------------------------------
# Framework baseline
# ----------------------------------------------------------------------------------------------------------------

FRAMEWORK_BASELINE = {
    "cuda": 512 * MiB,
    "cpu": 400 * MiB,
    "mps": 400 * MiB,
}
"""Device kind → bytes the framework holds before the model: calibrated constants, not derived.

- cuda: the CUDA context with cuBLAS/cuDNN kernels loaded (what nvidia-smi shows for a process that ran one
  matmul and allocated nothing): typically 0.3-0.6 GiB with CUDA 12 lazy module loading; 512 MiB. Not yet
  re-measured on a GPU here: a device run should check it against ``torch.cuda.mem_get_info`` before and after
  initialisation.
- cpu: resident memory of the Python process with torch, transformers and slimtune imported: ~350 MB measured on
  Linux (tests/plan/test_estimate.py re-measures it); 400 MiB leaves room for the allocator's and threads' pages.
- mps: the same process baseline as cpu (unified memory).

Not counted by ``torch.cuda.max_memory_allocated``, so compare that kind of figure with
``plan.peak_bytes - plan.parts["baseline"]``.
"""


def framework_baseline(device: str = "cuda") -> int:
    """Bytes the framework itself takes on ``device`` (``cuda``, ``cuda:1``, ``cpu``, ``mps``, or a torch.device)."""
    kind = str(device).split(":")[0]
    if kind not in FRAMEWORK_BASELINE:
        raise SlimtuneError(f"no framework baseline for device {device!r}; known: {', '.join(FRAMEWORK_BASELINE)}")
    return FRAMEWORK_BASELINE[kind]


def baseline_plan(device: str = "cuda") -> Plan:
    """`framework_baseline` as a `Plan` part."""
    return Plan(parts={"baseline": framework_baseline(device)},
                notes=[f"framework baseline on {device}: {format_bytes(framework_baseline(device))}"])
