"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Learning rate at optimizer step `step` (0-based).

    Rises linearly from lr/(warmup_iters+1) to lr over the first `warmup_iters` steps (never exactly 0, which would
    waste a step), follows a half cosine from lr down to min_lr until `decay_iters`, then stays at min_lr.
    """
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
