"""Full fine-tuning / pre-training: AdamW on every parameter (the Method base class is exactly that)."""

from __future__ import annotations

from slimtune.methods.base import Method, adamw  # noqa: F401  (adamw: kept importable from here)
from slimtune.registry import METHODS


@METHODS.register("full")
class Full(Method):
    """AdamW on every parameter: 16 bytes per fp32 parameter (weights, gradients, two moments)."""

    def estimate_memory(self, spec, run):
        # AdamW steps the stored weights themselves: gradients and both moments take the weights' dtype (fp32:
        # 4 + 4 + 8 = 16 bytes per parameter); every layer keeps its activations for backward.
        from slimtune.plan.estimate import activation_bytes, full_adam

        return (full_adam(spec, run.weight_dtype, master_weights=run.master_weights, eight_bit=run.eight_bit)
                + activation_bytes(spec, run.batch, run.seq, **run.activation_options()))
