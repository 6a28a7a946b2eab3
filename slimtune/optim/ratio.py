"""`BlockOptimizerRatio`: the BAdam variant that trains a fixed fraction of every parameter (see `slimtune.optim`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.optim.common import (LOW_PRECISION, STATE_FORMAT, BlockSchedule, check_choice, check_positive_int,
                                   fingerprint, tensor_bytes, unique_named)

logger = logging.getLogger("slimtune.badam")

MASK_MODES = ("adjacent", "scatter")
_EMBEDDING_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")


class BlockOptimizerRatio(torch.optim.Optimizer):
    """BAdam by ratio: each block is a fraction ``update_ratio`` of the entries of *every* trainable parameter.

    The entries of each parameter are split into ``D = ceil(1 / update_ratio)`` disjoint parts; block k trains
    part k of every parameter for ``switch_every`` steps with AdamW, then the next block (random order per pass,
    from its own seeded generator) starts with fresh moments. Gradients are cut down to the block's entries in a
    post-accumulate-grad hook, so dense gradients never all exist at once, and Adam moments (and fp32 masters for
    bf16/fp16 weights) exist only for those entries.

    ``mask_mode='adjacent'``: a part is a contiguous range of whole rows (of the flattened tensor for 1-D ones), so
    gradients and updates are slices, with no index tensors. ``'scatter'``: a part is a random subset of entries,
    drawn per parameter at each switch (int64 indices are stored for it).

    Args:
        param_groups: parameters or param-group dicts, as for ``torch.optim.AdamW`` (per-group lr, betas, eps,
            weight_decay are honoured).
        named_parameters_list: ``list(model.named_parameters())``, for names in the state dict and to find the
            embedding.
        switch_every: steps per block (>= 1).
        update_ratio: fraction of each parameter trained at a time, in (0, 1].
        mask_mode: ``'adjacent'`` or ``'scatter'``.
        lr, betas, eps, weight_decay: AdamW defaults (decoupled weight decay, applied to the block's entries).
        include_embedding: train the token/position embeddings too (a tied lm_head is the same tensor, once).
        include_lm_head: train an untied ``lm_head`` too.
        preserve_threshold: parameters with fewer entries than this (norms, small biases) are trained whole.
        verbose: 0 silent, 1 logs each switch.
        seed: seed of the block-order / scatter-mask generator.
    """

    def __init__(
        self,
        param_groups,
        named_parameters_list: Iterable[tuple[str, nn.Parameter]],
        switch_every: int = 100,
        update_ratio: float = 0.1,
        verbose: int = 1,
        mask_mode: str = "adjacent",
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        include_embedding: bool = False,
        include_lm_head: bool = False,
        preserve_threshold: int = 100,
        seed: int = 0,
        log_fn: Callable[[str], None] | None = None,
    ):
        check_positive_int("switch_every", switch_every)
        check_choice("mask_mode", mask_mode, MASK_MODES)
        if not 0 < update_ratio <= 1:
            raise SlimtuneError(f"update_ratio={update_ratio} must be in (0, 1] (fraction of each parameter trained).")
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        named = unique_named(named_parameters_list)
        name_of = {id(p): n for n, p in named}
        self._names: dict[int, str] = {}
        for group in self.param_groups:
            kept = []
            for p in group["params"]:
                if id(p) not in name_of:
                    raise SlimtuneError(f"a parameter of shape {tuple(p.shape)} is not in named_parameters_list.")
                name = name_of[id(p)]
                if not include_embedding and any(m in name for m in _EMBEDDING_MARKERS):
                    continue  # the (possibly tied) embedding stays frozen unless asked for
                if not include_lm_head and "lm_head" in name:
                    continue
                kept.append(p)
                self._names[id(p)] = name
            group["params"] = kept
        trainable = {id(p) for g in self.param_groups for p in g["params"]}
        if not trainable:
            raise SlimtuneError("BlockOptimizerRatio has no trainable parameter (only embeddings?); set "
                                "include_embedding=True.")
        for _, p in named:
            p.requires_grad_(id(p) in trainable)
            if id(p) not in trainable:
                p.grad = None

        self.switch_every, self.update_ratio, self.mask_mode = switch_every, update_ratio, mask_mode
        self.preserve_threshold = preserve_threshold
        self.verbose, self._log = int(verbose), log_fn or logger.info
        self.n_blocks = math.ceil(1 / update_ratio - 1e-9)
        self._schedule = BlockSchedule(self.n_blocks, "random", None, seed)
        self.step_in_block = 0
        self.global_step = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._compact_grad)
                       for g in self.param_groups for p in g["params"]]
        self._fingerprint = fingerprint(
            [f"{self._names[id(p)]} {tuple(p.shape)}" for g in self.param_groups for p in g["params"]]
            + [f"ratio {update_ratio} {mask_mode} {preserve_threshold}"]
        )
        self._start_block()

    # -- masks ----------------------------------------------------------------------------------------------------

    def _part(self, p: torch.Tensor) -> tuple[int, int]:
        """Flat [start, end) range of part `current_block` of ``p`` for adjacent masks, cut at row boundaries."""
        if p.numel() < self.preserve_threshold:
            return 0, p.numel()
        rows = p.shape[0] if p.dim() >= 2 else p.numel()
        row_len = p.numel() // max(rows, 1)
        k, d = self._schedule.current, self.n_blocks
        return (rows * k // d) * row_len, (rows * (k + 1) // d) * row_len

    def _start_block(self, saved: dict | None = None) -> None:
        """Fresh per-parameter state for the current block (or the saved one on resume)."""
        for group in self.param_groups:
            for p in group["params"]:
                name = self._names[id(p)]
                if saved is not None:
                    st = {k: (v.to(p.device).clone() if torch.is_tensor(v) else v) for k, v in saved[name].items()}
                else:
                    if self.mask_mode == "adjacent" or p.numel() < self.preserve_threshold:
                        start, end = self._part(p)
                        st = {"range": (start, end)}
                        n = end - start
                    else:
                        n = max(1, round(p.numel() * self.update_ratio))
                        idx = torch.randperm(p.numel(), generator=self._schedule.generator)[:n]
                        st = {"index": idx.sort().values.to(p.device)}
                    st["exp_avg"] = torch.zeros(n, dtype=torch.float32, device=p.device)
                    st["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=p.device)
                    st["step"] = 0
                    if p.dtype in LOW_PRECISION:
                        st["master"] = self._gather(p.detach().view(-1), st).float()
                st["grad"] = None
                self.state[p] = st
        if self.verbose >= 1:
            self._log(f"BAdam-ratio: block {self._schedule.current + 1}/{self.n_blocks} from step {self.global_step}")

    @staticmethod
    def _gather(flat: torch.Tensor, st: dict) -> torch.Tensor:
        if "range" in st:
            start, end = st["range"]
            return flat[start:end]
        return flat[st["index"]]

    def _compact_grad(self, p: torch.Tensor) -> None:
        """Keep only the block's entries of the gradient, in fp32, and drop the dense gradient."""
        st = self.state[p]
        g = self._gather(p.grad.view(-1), st)
        if st["grad"] is None:
            st["grad"] = g.float().clone()
        else:
            st["grad"].add_(g)
        p.grad = None

    # -- step -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """AdamW on the active entries; parameters without a gradient (unused) are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                st = self.state[p]
                grad = st["grad"]
                if grad is None:
                    continue
                st["step"] += 1
                t = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                master = st.get("master")
                w = master if master is not None else self._gather(p.view(-1), st).float()
                w.mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - beta1**t))
                flat = p.view(-1)
                if "range" in st:
                    start, end = st["range"]
                    if master is not None or w.data_ptr() != flat[start:end].data_ptr():
                        flat[start:end] = w.to(p.dtype)
                else:
                    flat[st["index"]] = w.to(p.dtype)
                st["grad"] = None
        self.global_step += 1
        self.step_in_block += 1
        if self.step_in_block >= self.switch_every:
            self.step_in_block = 0
            self._schedule.advance()
            self._start_block()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
                self.state[p]["grad"] = None

    def optimizer_state_bytes(self) -> int:
        """Bytes of compact state (moments, masters, masks, gradient buffers) held now."""
        return sum(tensor_bytes(v) for st in self.state.values() for v in st.values() if torch.is_tensor(v))

    def state_dict(self) -> dict:
        """Block order, generator, steps and each parameter's compact state (mask, moments, master), by name."""
        return {
            "format": STATE_FORMAT,
            "kind": "BlockOptimizerRatio",
            "fingerprint": self._fingerprint,
            "schedule": self._schedule.state_dict(),
            "step_in_block": self.step_in_block,
            "global_step": self.global_step,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "state": {
                self._names[id(p)]: {
                    k: (v.detach().clone() if torch.is_tensor(v) else v)
                    for k, v in self.state[p].items() if k != "grad"
                }
                for g in self.param_groups
                for p in g["params"]
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("kind") != "BlockOptimizerRatio" or state_dict.get("format") != STATE_FORMAT:
            raise SlimtuneError("this is not a slimtune BlockOptimizerRatio state dict (format 1).")
        if state_dict["fingerprint"] != self._fingerprint:
            raise SlimtuneError(
                "the optimizer state was saved for a different model, update_ratio or mask_mode; build "
                "BlockOptimizerRatio over the same model with the same settings to load it."
            )
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self._schedule.load_state_dict(state_dict["schedule"])
        self.step_in_block = int(state_dict["step_in_block"])
        self.global_step = int(state_dict["global_step"])
        self._start_block(saved=state_dict["state"])

