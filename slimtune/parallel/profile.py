"""What each unit of a model costs: the numbers the pipeline partitioner balances.

Per unit (see `slimtune.parallel.units`), for one micro-batch:

- seconds: forward + backward, timed unit by unit on the micro-batch the previous unit produced (median over
  repeats, after one untimed warm-up pass; `spread` is (max - min) / median of the repeats).
- state bytes: weights, plus for trainable parameters their gradient and two fp32 Adam moments. Frozen weights
  (a LoRA base, a frozen embedding) cost their storage only, so adapter-only units weigh less.
- activation bytes: what autograd saves for the backward of one micro-batch (tensors counted once per storage),
  which a stage holds for every micro-batch in flight.
- output bytes: what the unit hands to the next one (a stage boundary sends it forward, and its gradient back).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from slimtune.parallel.units import Units

ADAM_STATE_BYTES_PER_PARAM = 8
"""Two fp32 moments per trainable parameter (AdamW, the optimizer of every method the pipeline runs)."""


@dataclass
class UnitCosts:
    names: list[str]
    seconds: list[float]
    """Median forward + backward seconds of one micro-batch, per unit."""
    spread: list[float]
    """(max - min) / median of the timed repeats, per unit."""
    state_bytes: list[int]
    """Weights + gradients + optimizer state, per unit."""
    activation_bytes: list[int]
    """Saved for backward per micro-batch, per unit."""
    output_bytes: list[int]
    """Handed to the next unit per micro-batch."""
    params: list[int]
    """Parameters per unit (a tied weight counts in every unit that uses it)."""

    def memory(self, in_flight: int) -> list[int]:
        """Bytes per unit of a stage that holds `in_flight` micro-batches' activations."""
        return [s + in_flight * a for s, a in zip(self.state_bytes, self.activation_bytes)]


def state_bytes(module: nn.Module) -> int:
    """Weights, and for trainable parameters their gradients and Adam moments."""
    total = 0
    for p in module.parameters():
        total += p.numel() * p.element_size()
        if p.requires_grad:
            total += p.numel() * (p.element_size() + ADAM_STATE_BYTES_PER_PARAM)
    return total


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _nbytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in _as_tuple(values) if torch.is_tensor(v))


def _leaf_inputs(values: tuple) -> tuple:
    """The previous unit's outputs as fresh autograd leaves (float tensors get gradients), so each unit's backward
    stops at its own inputs."""
    return tuple(v.detach().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v for v in values)


def _backward(unit_index: int, n_units: int, out, target, units: Units) -> None:
    if unit_index == n_units - 1:
        units.loss_sum(out, target).backward()
        return
    outs = [o for o in _as_tuple(out) if torch.is_tensor(o) and o.requires_grad]
    if outs:
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def _synchronize(values: tuple) -> None:
    device = next((v.device for v in values if torch.is_tensor(v)), None)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_units(units: Units, batch: Any, *, repeats: int = 3, autocast=None) -> UnitCosts:
    """Time and weigh every unit on `batch` (one micro-batch, as the workload yields it). Gradients the profile
    leaves in `.grad` are cleared; the parameters are not changed."""
    import contextlib

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    n = len(units)
    times: list[list[float]] = [[] for _ in range(n)]
    activations, outputs = [0] * n, [0] * n
    modes = [m.training for m in units.modules]
    for m in units.modules:
        m.train()
    args, target = units.inputs(batch)
    try:
        for rep in range(repeats + 1):  # the first pass warms up (allocations, lazy initialisation) untimed
            values = _as_tuple(args)
            for i, unit in enumerate(units.modules):
                values = _leaf_inputs(values)
                weights = {p.untyped_storage().data_ptr() for p in unit.parameters()}
                saved: dict[int, int] = {}

                def pack(t: torch.Tensor):
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in weights:  # a weight saved for backward is state, not activation
                        saved[ptr] = t.untyped_storage().nbytes()
                    return t

                with autocast() if autocast is not None else contextlib.nullcontext():
                    _synchronize(values)
                    start = time.perf_counter()
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        out = unit(*values)
                    _backward(i, n, out, target, units)
                    _synchronize(values)  # an accelerator's kernels run asynchronously: wait for them
                    elapsed = time.perf_counter() - start
                if rep:
                    times[i].append(elapsed)
                activations[i], outputs[i] = sum(saved.values()), _nbytes(out)
                values = _as_tuple(out)
    finally:
        for m, mode in zip(units.modules, modes):
            m.train(mode)
            for p in m.parameters():
                p.grad = None
    medians = [statistics.median(t) for t in times]
    return UnitCosts(
        names=list(units.names), seconds=medians,
        spread=[(max(t) - min(t)) / med if med > 0 else 0.0 for t, med in zip(times, medians)],
        state_bytes=[state_bytes(m) for m in units.modules], activation_bytes=activations, output_bytes=outputs,
        params=[sum(p.numel() for p in m.parameters()) for m in units.modules])
