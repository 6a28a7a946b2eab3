"""Next-token cross-entropy without the (B, T, vocab) logits tensor.

For a 49k-token vocabulary and 4 x 128 tokens, the logits alone are 100 MB in fp32, and a plain
`cross_entropy(logits)` keeps them (and their softmax) alive for backward. `linear_cross_entropy` runs the output
head and the loss over chunks of positions and, because the loss is a scalar, computes its gradients with respect
to the hidden states (and the head weight, when it trains) right there, chunk by chunk. At most one chunk of logits
exists at any time; backward only scales the stored gradients by the incoming scalar.

Precision follows autocast: the two matmuls per chunk (head and gradients) run in the autocast dtype when autocast
is on, else in the inputs' dtype (bf16 weights → bf16 matmuls), while softmax, log-sum-exp, the loss sum and the
head-weight gradient accumulate in fp32, as autocast itself would run `cross_entropy`. Gradients come back in the
dtypes of `hidden` and `weight`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """mean (or sum) over valid targets of cross_entropy(hidden @ weight.T, targets); targets == -100 are ignored."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, grad_enabled, compute_dtype, reduction):
        # hidden (N, C), weight (V, C), targets (N,); compute_dtype: the dtype of the matmuls.
        # Autocast would recast inside this function on its own terms; every cast here is explicit instead.
        device_type = hidden.device.type
        no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                       else contextlib.nullcontext())
        with no_autocast:
            return _LinearCrossEntropy._forward(ctx, hidden, weight, targets, chunk, grad_enabled, compute_dtype,
                                                reduction)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk, grad_enabled, compute_dtype, reduction):
        valid = targets != IGNORE_INDEX
        scale = valid.float()  # (N,) weight of each position in the reduction
        if reduction == "mean":
            scale /= valid.sum().clamp(min=1)
        # Grad mode is always off inside forward; the caller's mode decides whether gradients are wanted at all.
        want_h = ctx.needs_input_grad[0] and grad_enabled
        want_w = ctx.needs_input_grad[1] and grad_enabled
        low_precision = compute_dtype != torch.float32
        w_c = weight.to(compute_dtype)  # (V, C); a copy only when autocast (or mixed inputs) casts the head
        grad_h = torch.zeros_like(hidden) if want_h else None
        # The head-weight gradient sums over every chunk: summed in bf16 it would lose the small chunks' digits.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = valid.nonzero().squeeze(1)  # only positions with a target need logits at all
        # Logits buffers reused by every chunk: fresh large allocations cost page faults on CPU. Softmax runs on
        # the fp32 one; a bf16 matmul writes into (and the bf16 gradient matmuls read from) the low-precision one.
        n_max = min(chunk, max(len(rows), 1))
        buf = torch.empty(n_max, weight.shape[0], dtype=torch.float32, device=hidden.device)  # (n, V)
        buf_lp = torch.empty_like(buf, dtype=compute_dtype) if low_precision else None
        grad_w_chunk = torch.empty_like(w_c) if low_precision and want_w else None  # (V, C)
        for start in range(0, len(rows), chunk):
            idx = rows[start:start + chunk]
            h, t, w = hidden[idx].to(compute_dtype), targets[idx], scale[idx]
            n = len(idx)
            if low_precision:
                logits = buf[:n].copy_(torch.mm(h, w_c.t(), out=buf_lp[:n]))  # (n, V) fp32
            else:
                logits = torch.mm(h, w_c.t(), out=buf[:n])
            target_logit = logits.gather(1, t[:, None])
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()  # the buffer now holds exp(logit - max)
            norm = probs.sum(dim=1, keepdim=True)
            total += ((top + norm.log() - target_logit).squeeze(1) * w).sum()  # logsumexp - target
            if grad_h is None and grad_w is None:
                continue
            # d loss / d logits = (softmax - one_hot) * weight of the position
            probs.div_(norm)
            probs[torch.arange(n, device=t.device), t] -= 1.0
            probs.mul_(w[:, None])
            d_logits = buf_lp[:n].copy_(probs) if low_precision else probs  # (n, V) in compute_dtype
            if grad_h is not None:
                grad_h[idx] = torch.mm(d_logits, w_c).to(grad_h.dtype)
            if grad_w is not None:
                if low_precision:
                    grad_w += torch.mm(d_logits.t(), h, out=grad_w_chunk)
                else:
                    grad_w.addmm_(d_logits.t(), h)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_out.to(grad_w.dtype), None, None, None, None, None)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a plain `hidden @ weight.T` would run in here: autocast's, else the inputs' common dtype."""
    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 256, reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) over targets != -100, without materialising the logits.

    hidden: (N, C); weight: (V, C), the output head (tied or not); targets: (N,) int64. `reduction`: "mean" over
    the valid targets (0 when there are none) or "sum". Returns an fp32 scalar. `chunk` positions' logits exist at
    a time (chunk x V x 4 bytes, plus chunk x V x 2 under bf16). Works under autocast and with bf16 inputs; the
    gradients have the dtypes of `hidden` and `weight` (a bf16 head's gradient is summed in an fp32 V x C buffer
    first).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, torch.is_grad_enabled(),
                                     _compute_dtype(hidden, weight), reduction)


def _supports_fused_head(model) -> bool:
    """True for decoder LMs whose logits are exactly `lm_head(last_hidden_state)` (no bias, scaling, soft-capping)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or head is None or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    return hasattr(model, "model") and getattr(config, "model_type", "") in FUSED_LOSS_MODEL_TYPES


def fused_head_backbone(model) -> torch.nn.Module | None:
    """The module `causal_lm_loss` really runs for `model` (the decoder below the output head, whose head and loss
    it computes itself), or None when it runs the model's own forward."""
    return model.model if _supports_fused_head(model) else None


# Families whose forward is `logits = lm_head(model(...).last_hidden_state)`, checked in transformers' sources.
FUSED_LOSS_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3"}


def count_causal_targets(batch: dict) -> int:
    """Number of next-token targets in a batch: labels other than -100 after the shift (labels[:, 1:])."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(model, batch: dict, chunk: int = 256, reduction: str = "mean") -> torch.Tensor:
    """The model's next-token loss on a batch of input_ids/labels/attention_mask(/position_ids).

    reduction: "mean" over the batch's targets (as `model(**batch).loss`), or "sum" of the per-token losses, for a
    caller that divides by the targets of several batches (`count_causal_targets`), e.g. a whole optimizer step.
    Uses the chunked head + loss for the families in FUSED_LOSS_MODEL_TYPES (same value as the model's own loss,
    less memory), and the model's own loss otherwise.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    # A wrapped model (DDP, torch.compile) must run its own forward: its hooks live there.
    if not _supports_fused_head(model):
        out = model(**batch)
        if reduction == "mean":
            return out.loss
        count = count_causal_targets(batch)
        if count == 0:  # the model's mean over no targets is nan; their sum is 0 (with zero gradients)
            return out.logits.sum() * 0.0
        return out.loss * count
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs).last_hidden_state  # (B, T, C)
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # HF convention: labels shift inside
    return linear_cross_entropy(hidden.flatten(0, 1), model.get_output_embeddings().weight, targets.flatten(), chunk,
                                reduction)
