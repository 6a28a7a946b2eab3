"""Full fine-tuning / pre-training: AdamW on every parameter (the Method base class is exactly that)."""

from __future__ import annotations

from slimtune.methods.base import Method, adamw  # noqa: F401  (adamw: kept importable from here)
from slimtune.registry import METHODS


@METHODS.register("full")
class Full(Method):
    """AdamW on every parameter: 16 bytes per fp32 parameter (weights, gradients, two moments)."""

    def estimate_memory(self, n_params: int, weight_bytes_per_param: float) -> dict[str, int]:
        # Weights train in their storage dtype; gradients and AdamW's two moments take the same dtype
        # (fp32: 4 + 4 + 8 = 16 bytes per parameter).
        w = int(n_params * weight_bytes_per_param)
        return {"weights": w, "gradients": w, "optimizer": 2 * w}
