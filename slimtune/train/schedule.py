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


def schedule_warnings(max_iters: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> list[str]:
    """Settings under which the schedule does not do what a short run expects (e.g. a YAML's 100 warmup steps kept
    for a 5-step run, which then trains at a fraction of lr throughout), each naming the keys to change."""
    out = []
    if warmup_iters >= max_iters:
        reached = cosine_with_warmup(max_iters - 1, lr, min_lr, warmup_iters, decay_iters)
        out.append(f"optim.warmup_iters={warmup_iters} is not shorter than max_iters={max_iters}: the whole run is "
                   f"warmup: the learning rate never exceeds {reached:.3g} (lr={lr:g}); lower optim.warmup_iters")
    if decay_iters > max_iters and warmup_iters < max_iters:
        end = cosine_with_warmup(max_iters - 1, lr, min_lr, warmup_iters, decay_iters)
        out.append(f"optim.lr_decay_iters={decay_iters} is beyond max_iters={max_iters}: the cosine ends at "
                   f"{end:.3g} instead of optim.min_lr={min_lr:g}; set optim.lr_decay_iters={max_iters} (or leave it "
                   f"empty) unless you will resume to {decay_iters} steps")
    return out
