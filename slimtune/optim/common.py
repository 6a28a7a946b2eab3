"""What BAdam's two block optimizers share: the seeded order in which blocks are visited, the bytes of state an
active parameter costs, argument checks, parameter names and the fingerprint that ties a saved state to a model."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from slimtune.errors import SlimtuneError

SWITCH_MODES = ("random", "ascending", "descending", "fixed")
LOW_PRECISION = (torch.float16, torch.bfloat16)
STATE_FORMAT = 1


def analytic_state_bytes(n_active_params: int, weight_dtype: torch.dtype = torch.float32,
                         include_grads: bool = True) -> int:
    """Bytes of optimizer state that BAdam holds for ``n_active_params`` active parameters (Adam family).

    Counted per active parameter: two fp32 Adam moments (8 bytes); an fp32 master copy (4 bytes) only when the
    weights are stored in bf16/fp16; an fp32 gradient (4 bytes) when ``include_grads`` (between backward and step).
    So 16 bytes for bf16/fp16 weights and 12 for fp32 weights, i.e. the ``16·N/D`` / ``12·N/D`` terms of the BAdam
    memory formula with ``n_active_params = N/D``. Not counted: the weights themselves, Adam's per-tensor ``step``
    scalars (4 bytes per tensor), and activations.
    """
    per_param = 8 + (4 if weight_dtype in LOW_PRECISION else 0) + (4 if include_grads else 0)
    return int(n_active_params) * per_param


def numel(p: torch.Tensor) -> int:
    """Entries of the whole parameter, also where DeepSpeed ZeRO-3 keeps only this rank's partition (an empty
    `.data`; the whole count is its `ds_numel`)."""
    return getattr(p, "ds_numel", p.numel())


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def check_choice(key: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise SlimtuneError(f"{key}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


def check_positive_int(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlimtuneError(f"{key}={value!r} must be an integer >= 1 (optimizer steps per block).")


def unique_named(named_parameters: Iterable) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs with tied parameters listed once, under their first name."""
    seen: set[int] = set()
    out = []
    for name, p in named_parameters:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def fingerprint(rows: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def is_lora_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


class BlockSchedule:
    """Order in which blocks are visited, driven by its own seeded generator (never the global RNG).

    A *pass* visits blocks in ``order``; ``pos`` is the position of the current block in it. ``random`` draws a
    fresh permutation for every pass (random reshuffling); ``ascending``/``descending`` cycle from ``start``;
    ``fixed`` stays on ``start``.
    """

    def __init__(self, n_blocks: int, mode: str, start: int | None, seed: int):
        self.n_blocks, self.mode, self.start = n_blocks, mode, start
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.order = self._new_pass(first=True)
        self.pos = 0

    def _new_pass(self, first: bool) -> list[int]:
        n = self.n_blocks
        if self.mode == "random":
            order = torch.randperm(n, generator=self.generator).tolist()
            if first and self.start is not None:
                order.remove(self.start)
                order.insert(0, self.start)
            return order
        if self.mode == "fixed":
            return [self.start or 0]
        if self.mode == "ascending":
            s = 0 if self.start is None else self.start
            return [(s + i) % n for i in range(n)]
        s = n - 1 if self.start is None else self.start
        return [(s - i) % n for i in range(n)]

    @property
    def current(self) -> int:
        return self.order[self.pos]

    def advance(self) -> int:
        self.pos += 1
        if self.pos == len(self.order):
            self.order, self.pos = self._new_pass(first=False), 0
        return self.current

    def state_dict(self) -> dict:
        return {"order": list(self.order), "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        order = [int(i) for i in state["order"]]
        if any(not 0 <= i < self.n_blocks for i in order):
            raise SlimtuneError("optimizer state has a block order that does not fit this optimizer's blocks.")
        self.order, self.pos = order, int(state["pos"])
        # The state may have been moved to an accelerator by a wrapper (accelerate); generators want a CPU tensor.
        self.generator.set_state(state["generator"].cpu())

