"""A memory plan (bytes by part) and the units it is written in.

Every planner function returns a `Plan`; plans add up (`state + activations + baseline`), so a method's
`estimate_memory` and the ``slimtune estimate`` verb compose the same pieces. Bytes are plain ints throughout.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from slimtune.errors import SlimtuneError

PARTS = ("weights", "gradients", "optimizer", "activations", "temporary", "baseline")
"""The parts of a plan, in the order they are reported:

- ``weights``: parameters as stored on the device (frozen or trainable, quantized or not), adapters included.
- ``gradients``: gradient buffers of the trainable parameters (fp32 unless said otherwise).
- ``optimizer``: optimizer state: Adam moments, fp32 master weights.
- ``activations``: tensors the forward pass keeps for backward (at their peak, the end of the forward pass),
  including the logits and the loss's saved softmax.
- ``temporary``: the largest short-lived workspace alive at that same moment (loss gradient, one layer's backward,
  a dequantized weight, gradient buckets, gathered shards).
- ``baseline``: what the framework holds before any tensor is made (CUDA context, the Python process).
"""

DTYPE_BYTES = {"fp32": 4, "float32": 4, "float": 4, "tf32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "half": 2}
"""Bytes per element of the floating-point dtypes the planner accepts (names as in torch, short or long)."""

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40


def dtype_bytes(dtype) -> int:
    """Bytes per element of ``dtype``: a name in `DTYPE_BYTES` (``"bf16"``, ``"float32"``) or a ``torch.dtype``."""
    name = str(dtype).lower().removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise SlimtuneError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


@dataclass
class Plan:
    """Peak device memory, in bytes, broken down by part (see `PARTS`).

    The peak is the sum of the parts: weights, gradients and optimizer state live through the whole step, and the
    activations peak at the end of the forward pass, when the loss's backward workspace (``temporary``) joins them.
    For full fine-tuning this counts the gradients as if all were allocated at that moment (true from the second
    micro-batch of gradient accumulation on; on the first, they fill in as activations are freed), so it errs on
    the side of more memory.
    """

    parts: dict[str, int] = field(default_factory=dict)
    """Bytes per part; parts left out are 0."""
    notes: list[str] = field(default_factory=list)
    """What was assumed, in words (one line each)."""
    host_bytes: int = 0
    """Bytes moved to host (CPU) memory by offloading; not part of `peak_bytes`."""
    trainable_params: int = 0
    """Parameters that receive gradients (elements)."""

    def __post_init__(self):
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown plan part(s) {', '.join(unknown)}; parts are {', '.join(PARTS)}")
        self.parts = {key: int(self.parts.get(key, 0)) for key in PARTS}

    @classmethod
    def of(cls, *notes: str, **parts: int) -> Plan:
        """``Plan.of("why", weights=..., activations=...)``: a plan from keyword parts and note lines."""
        return cls(parts=parts, notes=list(notes))

    @property
    def peak_bytes(self) -> int:
        """Peak device memory in bytes: the sum of the parts."""
        return sum(self.parts.values())

    def __add__(self, other: Plan) -> Plan:
        if not isinstance(other, Plan):
            return NotImplemented
        return Plan(parts={key: self.parts[key] + other.parts[key] for key in PARTS},
                    notes=self.notes + other.notes, host_bytes=self.host_bytes + other.host_bytes,
                    trainable_params=self.trainable_params + other.trainable_params)

    def fits(self, budget: int | str) -> bool:
        """Whether the peak fits in ``budget`` (bytes, or a string `parse_budget` reads)."""
        return self.peak_bytes <= parse_budget(budget)

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "parts": dict(self.parts), "host_bytes": self.host_bytes,
                "trainable_params": self.trainable_params, "notes": list(self.notes)}

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as JSON: peak_bytes, parts (bytes), host_bytes, trainable_params, notes."""
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """A small table in GiB, one line per non-zero part, then the peak."""
        rows = [f"  {key:<12}{format_bytes(value):>12}" for key, value in self.parts.items() if value]
        if self.host_bytes:
            rows.append(f"  {'(host)':<12}{format_bytes(self.host_bytes):>12}")
        return "\n".join(rows + [f"  {'peak':<12}{format_bytes(self.peak_bytes):>12}"])


def format_bytes(n: int) -> str:
    """``21.30 GiB``-style text (binary units: what memory sizes are sold and reported in)."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


_BUDGET_UNITS = {
    "": 1, "b": 1,
    "k": KB, "kb": KB, "m": MB, "mb": MB, "g": GB, "gb": GB, "t": TB, "tb": TB,
    "ki": KiB, "kib": KiB, "mi": MiB, "mib": MiB, "gi": GiB, "gib": GiB, "ti": TiB, "tib": TiB,
}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([a-z]*)\s*$", re.IGNORECASE)
_BUDGET_EXAMPLES = "e.g. 24GiB, 24GB, 500MB, 1.5T or a number of bytes"


def parse_budget(budget: int | str) -> int:
    """A memory budget in bytes from ``"24GiB"``, ``"24GB"``, ``"500MB"``, ``"1.5T"`` or an int of bytes.

    Units are case-insensitive. K/M/G/T (with or without B) are decimal (10**9 for G), as disk and cloud sizes are
    written; Ki/Mi/Gi/Ti (with or without B) are binary (2**30 for Gi), as GPU memory really is: a "24 GB" RTX 3090
    has 24 GiB. A bare number is bytes.
    """
    if isinstance(budget, bool):
        raise SlimtuneError(f"memory budget {budget!r} is not a size ({_BUDGET_EXAMPLES})")
    if isinstance(budget, int):
        if budget <= 0:
            raise SlimtuneError(f"memory budget must be positive, got {budget} bytes ({_BUDGET_EXAMPLES})")
        return budget
    if not isinstance(budget, str):
        raise SlimtuneError(f"memory budget {budget!r} is not a size ({_BUDGET_EXAMPLES})")
    match = _BUDGET_RE.match(budget)
    unit = match.group(3).lower() if match else None
    if match is None or unit not in _BUDGET_UNITS:
        raise SlimtuneError(f"cannot read memory budget {budget!r} ({_BUDGET_EXAMPLES})")
    try:
        value = float(match.group(1)) * 10.0 ** int(match.group(2) or 0) * _BUDGET_UNITS[unit]
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value < 1:
        raise SlimtuneError(f"memory budget {budget!r} is not a positive size ({_BUDGET_EXAMPLES})")
    return int(value)
