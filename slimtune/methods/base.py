"""The Method interface: what is trainable and how it is stepped.

A method is one class registered by name (`@METHODS.register("lora")`, see `slimtune.registry`) with, optionally,
its own config section (`config_cls`, read with `cfg.section(name)`). The training loop calls these hooks in this
order and never asks which method is running:

    load_options()                 how the model is loaded (storage dtype, quantize while loading)
    prepare(model)                 freeze, swap layers, add adapters; returns the model to train
    build_optimizer(model, ctx)    the optimizer over what trains
    on_start(step, optimizer)      events before the first step (e.g. which block trains first)
    ... every step: clip_grad_norm_(model, optimizer, max_norm), then after the optimizer step
    after_step(step, optimizer)    events such as BAdam's block switch, as metrics records with a message
    step_metrics(optimizer)        numbers for the metrics log (e.g. optimizer-state bytes)
    save_weights / load_weights    what a checkpoint stores (full weights, or only adapters)
    state_dict / load_state_dict   method state beyond the optimizer's own, for exact resume; on resume it is
                                   loaded before the optimizer's state, so what trains is already as it was saved
    load_for_inference(source)     (model, tokenizer) of a checkpoint it wrote, for chat/generate/eval
    export_checkpoint(source, out) a folder other tools load (merged, dequantized, packed)
    describe(model, optimizer)     one line for the log: trainable parameters, optimizer state vs its formula
    estimate_memory(spec, run)     peak bytes per part on one device (slimtune.plan), for the planner

Capabilities that strategies check (class attributes, which a method may set per instance from its options):

    fixed_trainable_set    True: the set of parameters with gradients never changes during a run. False: it
                           changes (BAdam's block switch); the method changes `requires_grad` and reports the
                           change as an event of `after_step`, after which strategies that fix the set when they
                           wrap or build an engine (DDP, DeepSpeed) rebuild them; a pipeline refuses such a method.
    grads_in_param_grad    True: gradients are plain `.grad` accumulations, with no hooks that act on them (batch
                           shards on threads, a pipeline, and DDP with 16-bit weights need it).
    torch_optimizer_state  True: the optimizer's state dict is torch's own (`torch.optim.Optimizer.state_dict`:
                           per-parameter state by position in the param groups), which FSDP saves sharded with
                           torch.distributed.checkpoint. False: a format of its own (BAdam's, keyed by parameter
                           name), which FSDP gathers whole into optimizer.pt and hands back to `load_state_dict`.

Hooks for an engine that updates the weights itself (DeepSpeed holds the gradients, fp32 masters and optimizer
state). For a method whose trainable set changes, the engine steps an AdamW with the method's optimizer's param
groups over what trains, built anew at every change (so moments restart then, as BAdam's do); the strategy calls

    hand_updates_to_engine(optimizer)   once, after build_optimizer: from now on the method's optimizer only picks
                                        what trains (its param groups give the hyperparameters and the lr); it is
                                        never stepped, and keeps no gradients, masters or hooks of its own
    count_engine_step(optimizer)        after every step the engine made in its place, before after_step: count it
                                        (and change what trains, if it is time)

Both do nothing by default: enough for a method that keeps its schedule itself and changes `requires_grad` in
`after_step`. BAdam hands both to its BlockOptimizer, which schedules the blocks and counts the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.extras import require_bitsandbytes
from slimtune.families import checkpoint_family
from slimtune.plan.settings import NoEstimate

if TYPE_CHECKING:
    from slimtune.plan.estimate import ModelSpec, Plan
    from slimtune.plan.settings import RunSettings


@dataclass
class OptimizerContext:
    """What a method may need to know to build its optimizer."""

    device: torch.device
    n_train_examples: int
    """Examples (windows, conversations) in one pass over the training data."""
    sequences_per_step: int
    """Sequences in one optimizer step over all processes (batch_size x grad_accum x world size)."""
    seed: int
    verbose: bool


def decay_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """AdamW parameter groups: matrices decay; biases and norm weights (every tensor with < 2 dims) never do;
    embedding matrices decay only if `decay_embeddings`. Tied parameters appear once; frozen ones not at all."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        if p.dim() < 2 or (not decay_embeddings and id(p) in embedding_ids):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def adamw(param_groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fastest implementation this device has.

    The fused kernel (one pass over all tensors) exists on CUDA, MPS and CPU in recent torch; it updates the
    parameters with the same arithmetic as the default, so results stay reproducible run to run.
    """
    fused = device.type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)


def build_adam(groups: list[dict], cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as `optim.name` says: adamw (torch, fused), adamw8bit or paged_adamw8bit (bitsandbytes: moments in 8
    bits, 2 bytes per trainable parameter instead of 8)."""
    o = cfg.optim
    if o.name == "adamw":
        return adamw(groups, cfg.lr, (o.beta1, o.beta2), device)
    bnb = require_bitsandbytes(f"optim.name={o.name}")
    cls = bnb.optim.AdamW8bit if o.name == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, lr=cfg.lr, betas=(o.beta1, o.beta2))


def refuse_eight_bit_adam(run, method: str) -> None:
    """The planner's refusal of optim.name=adamw8bit for a method that steps with torch AdamW (BAdam, QAT, BitNet),
    the same the trainer gives."""
    if run.eight_bit:
        raise SlimtuneError(f"method={method} steps with torch AdamW; optimizer adamw8bit is not available for it "
                            "(use adamw)")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (moments, step counters)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v))


def trainable_numel(model: nn.Module) -> int:
    from slimtune.memory import param_numel

    return sum(param_numel(p) for p in model.parameters() if p.requires_grad)


class Method:
    """Base class: full training of every parameter with AdamW. Subclasses override what differs."""

    name: ClassVar[str]
    config_cls: ClassVar[type | None] = None
    fixed_trainable_set: bool = True
    grads_in_param_grad: bool = True
    torch_optimizer_state: bool = True
    also_reads: ClassVar[tuple[str, ...]] = ()
    """Config sections of other plug-ins this method reads (e.g. lora reads badam.* when lora.badam=true)."""

    def __init__(self, cfg):
        self.cfg = cfg  # a TrainConfig
        self.options = cfg.section(self.name) if self.config_cls is not None else None

    # -- model ----------------------------------------------------------------------------------------------------

    def load_options(self) -> dict[str, Any]:
        """Keyword options for the model loader (e.g. {"dtype": torch.bfloat16}); empty keeps the config's."""
        return {}

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    # -- optimization ---------------------------------------------------------------------------------------------

    def build_optimizer(self, model: nn.Module, ctx: OptimizerContext) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return build_adam(decay_groups(model, o.weight_decay, o.decay_embeddings), self.cfg, ctx.device)

    def clip_grad_norm_(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def hand_updates_to_engine(self, optimizer: torch.optim.Optimizer) -> None:
        """An engine (DeepSpeed) updates what trains from now on, with gradients, fp32 masters and optimizer state of
        its own; `optimizer` only decides what trains and is never stepped. Called once, after `build_optimizer`,
        for a method whose trainable set changes. Nothing to do by default."""

    def count_engine_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The engine made one optimizer step in place of `optimizer.step()` (see `hand_updates_to_engine`): count
        it, as `optimizer.step()` would have (a schedule that switches what trains switches here). Nothing to do by
        default: `after_step` sees every step either way."""

    def on_start(self, step: int, optimizer: torch.optim.Optimizer) -> list[dict]:
        """Events before the first step of a run (or of a resumed run), like `after_step`'s."""
        return []

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> list[dict]:
        """Events after optimizer step `step`: metrics records (with a "kind") whose "message" is printed."""
        return []

    def step_metrics(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"optimizer_state_bytes": optimizer_state_bytes(optimizer)}

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save_weights(self, model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the checkpoint's weights into `folder`: from `model`, or from `state_dict` (the whole model's, as a
        sharding strategy gathered it; keyed as `model.state_dict()`) when one is given."""
        from slimtune.train.checkpoint import save_state_dict

        save_state_dict(model if state_dict is None else state_dict, folder / "model.safetensors")

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        from slimtune.train.checkpoint import load_model_weights

        load_model_weights(model, folder)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- export and inference -------------------------------------------------------------------------------------

    def load_for_inference(self, source: Path, trust_remote_code: bool = False):
        """(model, tokenizer) of a checkpoint this method wrote, or of any model slimtune loads (`source`)."""
        from slimtune.models.hf import load_causal_lm

        return load_causal_lm(source, trust_remote_code=trust_remote_code)

    def export_checkpoint(self, source: Path, out_dir: Path, *, overwrite: bool = False, **options) -> Path:
        """Write `source` as a plain Hugging Face folder (safetensors) that transformers loads without slimtune.
        `options`: a method's own export options (the base method takes none)."""
        from slimtune.models.hf import export_model

        if options:
            raise SlimtuneError(f"method={self.name} has no export option {', '.join(options)}")
        # The checkpoint's family may load it as its own plain class (a classifier); else the method loads it.
        family = checkpoint_family(source)
        loaded = family.load_plain(source) if family is not None else None
        model, tokenizer = loaded if loaded is not None else self.load_for_inference(source)
        return export_model(model, tokenizer, out_dir, merge_in_place=True, overwrite=overwrite)

    # -- reporting ------------------------------------------------------------------------------------------------

    def describe(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
        from slimtune.memory import param_numel

        n = sum(param_numel(p) for p in model.parameters())
        return f"method {self.name}: {trainable_numel(model) / 1e6:.2f}M of {n / 1e6:.2f}M parameters train"

    def estimate_memory(self, spec: ModelSpec, run: RunSettings) -> Plan:
        """Peak bytes of this method on one device for one micro-batch, as a `slimtune.plan.estimate.Plan`: weights,
        gradients, optimizer state, activations and temporary buffers. The planner adds the framework baseline and
        lets the strategy divide the plan per rank. `spec`: the model's shape; `run`: batch, sequence length,
        dtypes, checkpointing, optimizer (`slimtune.plan.settings.RunSettings`). Every method must give one: build
        it from `slimtune.plan.estimate` (e.g. `full_adam(spec, ...) + activation_bytes(spec, ...)`)."""
        raise NoEstimate(f"method={self.name} has no memory estimate: it must implement "
                         f"estimate_memory(spec, run) (see slimtune/methods/full.py and slimtune/plan/estimate.py)")
