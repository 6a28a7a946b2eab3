"""Next-token cross-entropy without the (B, T, vocab) logits tensor.

For a 49k-token vocabulary and 4 x 128 tokens, the logits alone are 100 MB in fp32, and a plain
`cross_entropy(logits)` keeps them (and their softmax) alive for backward. `linear_cross_entropy` runs the output
head and the loss over chunks of positions and, because the loss is a scalar, computes its gradients with respect
to the hidden states (and the head weight, when it trains) right there, chunk by chunk. At most one chunk of logits
exists at any time; backward only scales the stored gradients by the incoming scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over valid targets of cross_entropy(hidden @ weight.T, targets); targets == -100 are ignored."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, grad_enabled):  # hidden (N, C), weight (V, C), targets (N,)
        valid = targets != IGNORE_INDEX
        scale = valid / valid.sum().clamp(min=1)  # (N,) weight of each position in the mean
        # Grad mode is always off inside forward; the caller's mode decides whether gradients are wanted at all.
        want_h = ctx.needs_input_grad[0] and grad_enabled
        want_w = ctx.needs_input_grad[1] and grad_enabled
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = valid.nonzero().squeeze(1)  # only positions with a target need logits at all
        # One logits buffer reused by every chunk: fresh large allocations cost page faults on CPU.
        buf = torch.empty(min(chunk, max(len(rows), 1)), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        for start in range(0, len(rows), chunk):
            idx = rows[start:start + chunk]
            h, t, w = hidden[idx], targets[idx], scale[idx]
            logits = torch.mm(h, weight.t(), out=buf[: len(idx)])  # (n, V)
            target_logit = logits.gather(1, t[:, None])
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()  # the buffer now holds exp(logit - max)
            norm = probs.sum(dim=1, keepdim=True)
            total += ((top + norm.log() - target_logit).squeeze(1).float() * w).sum()  # logsumexp - target
            if grad_h is None and grad_w is None:
                continue
            # d loss / d logits = (softmax - one_hot) * weight of the position
            probs.div_(norm)
            probs[torch.arange(len(idx), device=t.device), t] -= 1.0
            probs.mul_(w[:, None].to(probs.dtype))
            if grad_h is not None:
                grad_h[idx] = torch.mm(probs, weight)
            if grad_w is not None:
                grad_w.addmm_(probs.t(), h)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out, None if grad_w is None else grad_w * grad_out,
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 256) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) averaged over targets != -100, without materialising the logits.

    hidden: (N, C); weight: (V, C), the output head (tied or not); targets: (N,) int64. `chunk` positions' logits
    exist at a time (chunk x V x element size bytes).
    """
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, torch.is_grad_enabled())


def _supports_fused_head(model) -> bool:
    """True for decoder LMs whose logits are exactly `lm_head(last_hidden_state)` (no bias, scaling, soft-capping)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or head is None or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    return hasattr(model, "model") and getattr(config, "model_type", "") in FUSED_LOSS_MODEL_TYPES


# Families whose forward is `logits = lm_head(model(...).last_hidden_state)`, checked in transformers' sources.
FUSED_LOSS_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3"}


def causal_lm_loss(model, batch: dict, chunk: int = 256) -> torch.Tensor:
    """The model's next-token loss on a batch of input_ids/labels/attention_mask(/position_ids).

    Uses the chunked head + loss for the families in FUSED_LOSS_MODEL_TYPES (same value as `model(**batch).loss`,
    less memory), and the model's own loss otherwise.
    """
    # A wrapped model (DDP, torch.compile) must run its own forward: its hooks live there.
    if not _supports_fused_head(model):
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs).last_hidden_state  # (B, T, C)
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # HF convention: labels shift inside
    return linear_cross_entropy(hidden.flatten(0, 1), model.get_output_embeddings().weight, targets.flatten(), chunk)
