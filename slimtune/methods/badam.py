"""method=badam: the plug-in the training loop uses to train one block of parameters at a time.

The optimizer itself, `BlockOptimizer`, is in `slimtune.optim` (usable without slimtune's trainer); this module gives
it its config section (`badam.*`), builds it around the AdamW of `optim.*`, reports block switches and predicts the
memory of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.base import Method, OptimizerContext, build_adam, decay_groups, refuse_eight_bit_adam
from slimtune.methods.blocks import GRANULARITIES, auto_block_prefixes, default_switch_every
from slimtune.optim import BlockOptimizer, BlockOptimizerRatio, analytic_state_bytes
from slimtune.optim.common import SWITCH_MODES
from slimtune.registry import METHODS
from slimtune.typed_config import check_choice

# The optimizers were defined here until they moved to slimtune.optim: this module still exports them.
__all__ = ["BAdam", "BadamConfig", "BlockOptimizer", "BlockOptimizerRatio", "analytic_state_bytes",
           "auto_block_prefixes", "default_switch_every"]


@dataclass
class BadamConfig:
    """Block coordinate descent with Adam (method=badam)."""

    switch_every: Optional[int] = None
    """Optimizer steps on one block before switching to the next. Empty: the paper's rule
    min(max(n / (B * D), 50), 100) for n training examples, effective batch B and D blocks."""
    switch_mode: str = "random"
    """Block order: random (reshuffled every pass), ascending, descending or fixed."""
    granularity: str = "layer"
    """What one block is: layer (a transformer block), attn_mlp (attention and MLP separately) or matrix."""
    include_embedding: bool = False
    """Make the token embedding its own block."""
    include_lm_head: bool = False
    """Make the output head its own block (ignored when it is tied to the embedding)."""
    active_modules: list = field(default_factory=list)
    """Parameter-name prefixes that are trained at every step (e.g. a new classification head)."""

    def __post_init__(self):
        check_choice("badam.switch_mode", self.switch_mode, SWITCH_MODES)
        check_choice("badam.granularity", self.granularity, GRANULARITIES)
        if self.switch_every is not None and self.switch_every < 1:
            raise SlimtuneError(f"badam.switch_every must be >= 1, got {self.switch_every}")


@METHODS.register("badam")
class BAdam(Method):
    """One block of parameters trains at a time; the rest is frozen and has no gradients or optimizer state."""

    config_cls = BadamConfig
    fixed_trainable_set = False  # the active block changes at every switch
    grads_in_param_grad = False  # low-precision weights accumulate into fp32 buffers through hooks
    torch_optimizer_state = False  # BlockOptimizer's state dict: keyed by parameter name, the active block's only

    def build_optimizer(self, model: nn.Module, ctx: OptimizerContext) -> BlockOptimizer:
        o, b = self.cfg.optim, self.options
        base = build_adam(decay_groups(model, o.weight_decay, o.decay_embeddings), self.cfg, ctx.device)
        named = list(model.named_parameters())
        prefixes = auto_block_prefixes(named, granularity=b.granularity, include_embedding=b.include_embedding,
                                       include_lm_head=b.include_lm_head)
        switch_every = b.switch_every
        if switch_every is None:
            # The paper's rule balances the data seen by each block within an epoch.
            switch_every = default_switch_every(ctx.n_train_examples, ctx.sequences_per_step, len(prefixes))
        self._announced = None
        return BlockOptimizer(base_optimizer=base, named_parameters_list=named, block_prefix_list=prefixes,
                              switch_block_every=switch_every, switch_mode=b.switch_mode,
                              active_modules=list(b.active_modules), seed=self.cfg.seed, verbose=0)

    def clip_grad_norm_(self, model, optimizer: BlockOptimizer, max_norm: float) -> torch.Tensor:
        return optimizer.clip_grad_norm_(max_norm)  # bf16 weights keep their gradients in fp32 buffers

    def hand_updates_to_engine(self, optimizer: BlockOptimizer) -> None:
        optimizer.hand_updates_to_engine()  # fp32 masters of 16-bit weights: the engine's, for the active block

    def count_engine_step(self, optimizer: BlockOptimizer) -> None:
        optimizer.count_step()  # may switch block; after_step then reports it

    def on_start(self, step: int, optimizer: BlockOptimizer) -> list[dict]:
        return self.after_step(step, optimizer)

    def after_step(self, step: int, optimizer: BlockOptimizer) -> list[dict]:
        block = optimizer.active_block_name
        if block == self._announced:
            return []
        self._announced = block
        expected = optimizer.analytic_state_bytes()  # moments + fp32 grads (+ masters for low-precision weights)
        from slimtune.memory import format_bytes

        return [{"kind": "switch", "step": step, "block": block, "analytic_state_bytes": expected,
                 "message": f"step {step}: BAdam trains block {block} ({optimizer.active_numel() / 1e6:.2f}M "
                            f"parameters, optimizer state {format_bytes(expected)})"}]

    def step_metrics(self, optimizer: BlockOptimizer) -> dict:
        return {"optimizer_state_bytes": optimizer.optimizer_state_bytes(), "block": optimizer.active_block_name}

    def describe(self, model, optimizer: BlockOptimizer) -> str:
        return (f"method badam: {optimizer.n_blocks} blocks, switching every {optimizer.switch_block_every} steps "
                f"({optimizer.switch_mode})")

    def estimate_memory(self, spec, run):
        # All weights at their storage size; the active block's fp32 gradient, moments and (for 16-bit weights)
        # master copy: the paper's 2M + 16M/D, with the largest real block as M/D. Activations for the worst
        # block, the first layer: backward then runs through every layer.
        from slimtune.plan.estimate import activation_bytes, badam_state

        refuse_eight_bit_adam(run, "badam")
        b = self.options
        states = badam_state(spec, run.weight_dtype, granularity=b.granularity,
                             include_embedding=b.include_embedding,
                             include_head=b.include_lm_head and not spec.tied_embeddings)
        return states + activation_bytes(spec, run.batch, run.seq, **run.activation_options(trainable_layers=(0,)))
