"""BAdam, block-coordinate Adam (Luo et al., NeurIPS 2024), with exact resume and correct mixed precision: optimizers
for any torch training loop, which slimtune's method=badam (`slimtune.methods.badam`) builds on.

`BlockOptimizer` wraps any ``torch.optim.Optimizer`` and lets it update one *block* of parameters at a time (one
transformer layer by default) for ``switch_block_every`` steps, then moves to the next block. Only the active block
has gradients, optimizer state and (for bf16/fp16 weights) an fp32 master copy, so training all parameters costs
about ``W + 16·N/D`` bytes for bf16 weights (``W`` = 2·N weight bytes) and ``W + 12·N/D`` for fp32 weights, instead of
Adam's 18·N / 16·N (N parameters, D blocks). Everything below the lowest active parameter has
``requires_grad=False``, so backward stops there and keeps no activations for it.

It accepts the keyword arguments of ``badam.BlockOptimizer`` (badam 1.4), so switching is a one-line import change::

    base = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    optimizer = slimtune.BlockOptimizer(base, list(model.named_parameters()), switch_block_every=50)

`BlockOptimizerRatio` is the other BAdam variant: every step trains a fixed fraction of *every* parameter, with
Adam state stored only for those entries.

Both save everything needed to resume a run exactly (`state_dict` / `load_state_dict`), keyed by parameter name.
"""

from __future__ import annotations

from slimtune.optim.block import BlockOptimizer
from slimtune.optim.common import analytic_state_bytes
from slimtune.optim.ratio import BlockOptimizerRatio

__all__ = ["BlockOptimizer", "BlockOptimizerRatio", "analytic_state_bytes"]
