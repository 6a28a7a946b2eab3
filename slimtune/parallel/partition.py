"""Exact pipeline partitioning: split a model's units (layers, blocks) into contiguous stages.

A pipeline runs at the pace of its slowest stage, so the split that matters minimises the *largest* stage cost,
not the sum. For contiguous splits a dynamic programme over prefixes solves this exactly:

    best[s][j] = min over i < j of  max(best[s-1][i], cost(i, j))          best[0][0] = 0

`best[s][j]` is the smallest bottleneck reachable when units 0..j-1 form s stages, and `cost(i, j)` is the cost of
one stage holding units i..j-1, an O(1) difference of prefix sums. A stage over `memory_cap` is not allowed.
Filling the table takes O(stages * n^2) steps.

Ties. Many splits often share the optimal bottleneck, and among them we want the best by a second measure (the
peak stage memory for balance="time"). Carrying (primary, secondary) pairs through the recurrence and comparing
them lexicographically is *not* exact: `max` does not respect that order, so a prefix that loses on the primary
can win overall once a later stage sets the primary anyway (tests/parallel/test_partition.py keeps a
counterexample). Instead we solve one objective at a time. Once the optimum P of the primary is known, the optimal
splits are exactly those in which every stage costs <= P, so the secondary is the same DP over stages restricted
that way, and so on for each further objective. The last tie-break is deterministic: the earliest cuts, i.e. the
lexicographically smallest list of stage end points, so earlier stages are as short as the optimum allows (under
1F1B the first stages hold activations for the most micro-batches in flight).

Costs are summed in floating point; costs that differ only by rounding are compared as computed.
"""

from __future__ import annotations

import math
import numbers
from itertools import accumulate
from typing import Callable, Iterable, Sequence

from slimtune.errors import SlimtuneError

StageCost = Callable[[int, int], float]  # (first unit, one past the last unit) -> cost of that stage


def partition(times: Iterable[float], stages: int, *, memory: Iterable[float] | None = None,
              memory_cap: float | None = None, balance: str = "time") -> list[range]:
    """Split units 0..n-1 into `stages` contiguous, non-empty ranges, exactly optimal for `balance`.

    times: seconds per unit (>= 0), in model order. memory: bytes per unit (>= 0), same length, optional.
    memory_cap: the most bytes one stage may hold (needs `memory`). Objectives, each a max over stages, compared in
    order (later ones only break ties of earlier ones; the earliest cuts break the rest):

    - "time": slowest stage's seconds, then peak stage bytes (when `memory` is given).
    - "memory": peak stage bytes, then slowest stage's seconds (needs `memory`).
    - "both": max over stages of max(stage seconds / total seconds, stage bytes / total bytes), then seconds, then
      bytes (needs `memory`). A share whose total is 0 counts as 0. With k stages the ideal value is 1/k.

    Raises SlimtuneError for bad input, and when no split fits `memory_cap` (naming the smallest cap that does).
    """
    times = _costs("times", times)
    n = len(times)
    _check_stages(stages, n)
    stages = int(stages)
    if memory is not None:
        memory = _costs("memory", memory)
        if len(memory) != n:
            raise SlimtuneError(f"memory has {len(memory)} entries but times has {n}; give one value per unit")
    if memory_cap is not None:
        if memory is None:
            raise SlimtuneError("memory_cap needs memory (bytes per unit) to check stages against")
        if isinstance(memory_cap, bool) or not isinstance(memory_cap, numbers.Real) or math.isnan(memory_cap):
            raise SlimtuneError(f"memory_cap must be a number of bytes, got {memory_cap!r}")
    if balance not in _BALANCES:
        raise SlimtuneError(f"unknown balance {balance!r}; choose one of: {', '.join(_BALANCES)}")
    if balance != "time" and memory is None:
        raise SlimtuneError(f"balance={balance!r} needs memory (bytes per unit)")

    objectives = _BALANCES[balance](times, memory)
    memory_of = _stage_sum(memory) if memory is not None else None

    def fits(i: int, j: int) -> bool:
        return memory_cap is None or memory_of(i, j) <= memory_cap

    bounds: list[tuple[StageCost, float]] = []  # (objective, its optimum): the optimal splits keep every stage within
    for cost in objectives:
        optimum = _min_bottleneck(n, stages, cost, _within(fits, bounds))
        if optimum == math.inf:  # only the cap can make the first objective infeasible
            smallest = _min_bottleneck(n, stages, memory_of, lambda i, j: True)
            raise SlimtuneError(
                f"no split of {n} units into {stages} stages fits memory_cap={_bytes(memory_cap)} bytes; the smallest "
                f"cap that fits is {_bytes(smallest)} bytes. Raise memory_cap or use more stages.")
        bounds.append((cost, optimum))
    return _earliest_cuts(n, stages, _within(fits, bounds))


def stage_costs(values: Sequence[float], parts: Iterable[range]) -> list[float]:
    """Total of `values` (seconds, bytes, ...) in each stage of `parts`."""
    return [math.fsum(values[i] for i in part) for part in parts]


def equal_layer_split(n_units: int, stages: int) -> list[range]:
    """The naive split by unit count: sizes differ by at most one, the first `n_units % stages` stages get the extra."""
    if isinstance(n_units, bool) or not isinstance(n_units, numbers.Integral) or n_units < 0:
        raise SlimtuneError(f"n_units must be a whole number >= 0, got {n_units!r}")
    _check_stages(stages, n_units)
    size, extra = divmod(n_units, stages)
    ends = list(accumulate(size + (s < extra) for s in range(stages)))
    return [range(a, b) for a, b in zip([0, *ends], ends)]


def bubble_fraction(schedule: str, stages: int, microbatches: int, *, virtual_stages: int = 1) -> float:
    """Share of a pipeline's step time that each rank sits idle (the "bubble"), for a balanced pipeline.

    With p = `stages` ranks and m = `microbatches` per step:

    - "gpipe": (p - 1) / (m + p - 1), the bubble overhead of the GPipe paper (Huang et al., 2019, "GPipe: Efficient
      Training of Giant Neural Networks using Pipeline Parallelism").
    - "1f1b": the same; one-forward-one-backward reorders the work to hold fewer activations, not to idle less.
    - "interleaved1f1b": (p - 1) / (v * m + p - 1) with v = `virtual_stages` model chunks per rank, from the
      interleaved schedule of the Megatron-LM paper (Narayanan et al., 2021, "Efficient Large-Scale Language Model
      Training on GPU Clusters Using Megatron-LM"). That paper states bubble time over ideal compute time,
      (p - 1) / (v * m); over the whole step (bubble + ideal) that is the value here.
    """
    for name, value in (("stages", stages), ("microbatches", microbatches), ("virtual_stages", virtual_stages)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise SlimtuneError(f"{name} must be a whole number >= 1, got {value!r}")
    formula = _BUBBLES.get(schedule)
    if formula is None:
        raise SlimtuneError(f"unknown schedule {schedule!r}; choose one of: {', '.join(_BUBBLES)}")
    if virtual_stages != 1 and schedule != "interleaved1f1b":
        raise SlimtuneError(f"virtual_stages={virtual_stages} applies only to schedule='interleaved1f1b'")
    return formula(stages, microbatches, virtual_stages)


_BUBBLES: dict[str, Callable[[int, int, int], float]] = {
    "gpipe": lambda p, m, v: (p - 1) / (m + p - 1),
    "1f1b": lambda p, m, v: (p - 1) / (m + p - 1),
    "interleaved1f1b": lambda p, m, v: (p - 1) / (v * m + p - 1),
}


def _shares(times: list[float], memory: list[float]) -> list[StageCost]:
    time_of, memory_of = _stage_sum(times), _stage_sum(memory)
    total_time, total_memory = time_of(0, len(times)), memory_of(0, len(memory))

    def share(i: int, j: int) -> float:
        return max(time_of(i, j) / total_time if total_time else 0.0,
                   memory_of(i, j) / total_memory if total_memory else 0.0)
    return [share, time_of, memory_of]


# balance name -> the per-stage costs it minimises (a split scores the max over its stages), most important first.
_BALANCES: dict[str, Callable[[list[float], list[float] | None], list[StageCost]]] = {
    "time": lambda times, memory: [_stage_sum(times)] + ([] if memory is None else [_stage_sum(memory)]),
    "memory": lambda times, memory: [_stage_sum(memory), _stage_sum(times)],
    "both": _shares,
}


def _min_bottleneck(n: int, stages: int, cost: StageCost, allowed: Callable[[int, int], bool]) -> float:
    """min over splits of units 0..n-1 into `stages` allowed stages of the max stage cost (inf if none)."""
    best = [0.0] + [math.inf] * n  # best[j]: zero stages cover only the empty prefix
    for s in range(1, stages + 1):
        new = [math.inf] * (n + 1)
        for j in range(s, n - (stages - s) + 1):  # leave at least one unit for each later stage
            for i in range(s - 1, j):
                if best[i] < new[j] and allowed(i, j):
                    new[j] = min(new[j], max(best[i], cost(i, j)))
        best = new
    return best[n]


def _earliest_cuts(n: int, stages: int, allowed: Callable[[int, int], bool]) -> list[range]:
    """The split into allowed stages with the lexicographically smallest end points (one exists)."""
    # completes[s][i]: units i..n-1 can form s allowed stages
    completes = [[False] * (n + 1) for _ in range(stages + 1)]
    completes[0][n] = True
    for s in range(1, stages + 1):
        for i in range(n - s + 1):
            completes[s][i] = any(allowed(i, j) and completes[s - 1][j] for j in range(i + 1, n - s + 2))
    parts, start = [], 0
    for s in range(stages, 0, -1):
        end = next(j for j in range(start + 1, n - s + 2) if allowed(start, j) and completes[s - 1][j])
        parts.append(range(start, end))
        start = end
    return parts


def _within(fits: Callable[[int, int], bool], bounds: list[tuple[StageCost, float]]) -> Callable[[int, int], bool]:
    bounds = list(bounds)
    return lambda i, j: fits(i, j) and all(cost(i, j) <= limit for cost, limit in bounds)


def _stage_sum(values: list[float]) -> StageCost:
    prefix = [0.0, *accumulate(values)]

    def total(i: int, j: int) -> float:
        return prefix[j] - prefix[i]
    return total


def _costs(name: str, values: Iterable[float]) -> list[float]:
    out = []
    for index, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SlimtuneError(f"{name}[{index}] must be a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0:
            raise SlimtuneError(f"{name}[{index}] is {value!r}; costs must be finite numbers >= 0")
        out.append(number)
    return out


def _check_stages(stages: int, n_units: int) -> None:
    if isinstance(stages, bool) or not isinstance(stages, numbers.Integral) or stages < 1:
        raise SlimtuneError(f"stages must be a whole number >= 1, got {stages!r}")
    if stages > n_units:
        raise SlimtuneError(f"cannot make {stages} non-empty stages from {n_units} units; use at most {n_units} stages")


def _bytes(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
