"""`BlockOptimizer`: BAdam's optimizer that trains one block of parameters at a time (see `slimtune.optim`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.blocks import GRANULARITIES, auto_block_prefixes, block_display_name, match_prefixes
from slimtune.optim.common import (LOW_PRECISION, STATE_FORMAT, SWITCH_MODES, BlockSchedule, analytic_state_bytes,
                                   check_choice, check_positive_int, fingerprint, is_lora_name, numel, tensor_bytes,
                                   unique_named)

logger = logging.getLogger("slimtune.badam")


class BlockOptimizer(torch.optim.Optimizer):
    """Run ``base_optimizer`` on one block of parameters at a time (BAdam).

    Args:
        base_optimizer: any ``torch.optim.Optimizer`` over the model's trainable parameters. Its param groups are
            kept as they are (weight decay, lr, betas, names...); only their ``params`` lists are narrowed to the
            active block, so a parameter always stays in the group the user put it in. The parameters in these
            groups are the ones BAdam may train; other named parameters stay frozen.
        named_parameters_list: ``list(model.named_parameters())``; names are used for blocks and for the state
            dict. BlockOptimizer owns ``requires_grad`` of these parameters from now on.
        block_prefix_list: blocks as lists of name prefixes (``[['model.layers.0.'], ...]``; a plain string is a
            one-prefix block). None discovers blocks automatically (see `granularity`).
        switch_block_every: optimizer steps per block (>= 1). Every block, the first included, gets exactly this many.
        switch_mode: ``'random'`` (new random order every pass over the blocks), ``'ascending'`` (input to output),
            ``'descending'`` or ``'fixed'`` (always ``start_block``).
        start_block: index of the first block (default: random → drawn, ascending → 0, descending → last, fixed → 0).
        active_modules: prefixes of parameters trained at every step (e.g. a fresh classification head).
        include_embedding: with automatic blocks, add the parameters before the first layer as a block.
        include_lm_head: with automatic blocks, add the parameters after the last layer (final norm, lm_head,
            heads) as a block. A head tied to the embedding is the same parameter and is handled once.
        verbose: 0 logs nothing; 1 logs each switch with the active block's name; 2 also lists its parameters.
        seed: seed of the generator that orders the blocks (the global torch RNG is never touched).
        granularity: automatic blocks per ``'layer'``, per attention/MLP half (``'attn_mlp'``) or per weight
            matrix (``'matrix'``).
        update_in_backward: step each parameter as soon as its gradient is ready (in a post-accumulate-grad hook),
            so the active block's gradients never all exist at once. Only valid with one backward per step and no
            gradient clipping.
        lora_only: train only LoRA adapter parameters inside blocks; None (default) turns this on when any
            parameter name has a ``lora_`` component (peft).
        log_fn: where messages go (default: ``logging.getLogger('slimtune.badam').info``).
        ds_zero3_enabled: accepted for badam compatibility; True is refused. BAdam runs under DeepSpeed ZeRO-2/3
            through slimtune's trainer (``strategy=deepspeed method=badam``), which builds the engine itself.

    Mixed precision: a bf16/fp16 parameter of the active block gets an fp32 master copy; its gradient of every
    micro-batch is added into an fp32 buffer (the master's ``.grad``) by a post-accumulate-grad hook, so gradient
    accumulation happens in fp32; the base optimizer steps the master and its moments are fp32; the result is
    copied back into the low-precision weight. fp32 parameters are stepped in place (no copy). Because of this,
    bf16 gradients are not in ``p.grad`` at step time: clip them with `clip_grad_norm_`, not with
    ``torch.nn.utils.clip_grad_norm_(model.parameters())``.

    Gradient checkpointing with ``use_reentrant=True`` needs an input that requires grad; frozen embeddings give
    none, so call ``model.enable_input_require_grads()`` (or use ``use_reentrant=False``, which needs nothing and
    lets backward stop below the active block).
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        named_parameters_list: Iterable[tuple[str, nn.Parameter]],
        block_prefix_list: Sequence[Sequence[str] | str] | None = None,
        switch_block_every: int = 50,
        switch_mode: str = "random",
        start_block: int | None = None,
        active_modules: Sequence[str] | None = None,
        include_embedding: bool = False,
        include_lm_head: bool = False,
        verbose: int = 1,
        seed: int = 0,
        granularity: str = "layer",
        update_in_backward: bool = False,
        lora_only: bool | None = None,
        log_fn: Callable[[str], None] | None = None,
        ds_zero3_enabled: bool = False,
    ):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise SlimtuneError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}.")
        if ds_zero3_enabled:
            raise SlimtuneError("ds_zero3_enabled=True is not supported by slimtune.BlockOptimizer yet: to train BAdam "
                                "under DeepSpeed ZeRO-2/3, use slimtune's trainer, which runs the engine itself: "
                                "torchrun --nproc_per_node=N -m slimtune train ... method=badam strategy=deepspeed "
                                "(deepspeed.stage=3 for ZeRO-3).")
        check_positive_int("switch_block_every", switch_block_every)
        check_choice("switch_mode", switch_mode, SWITCH_MODES)
        check_choice("granularity", granularity, GRANULARITIES)
        if any(base_optimizer.state.values()):
            raise SlimtuneError("wrap the base optimizer in BlockOptimizer before its first step (it already has "
                                "state).")

        # Optimizer.__init__ sets up the hook dictionaries that LR schedulers, profilers and accelerate rely on;
        # the real param groups and state are the base optimizer's own objects, shared, not copies.
        super().__init__([{"params": []}], base_optimizer.defaults)
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.switch_block_every = switch_block_every
        self.switch_mode = switch_mode
        self.verbose = int(verbose)
        self.update_in_backward = update_in_backward
        self._log = log_fn or logger.info

        named = unique_named(named_parameters_list)
        self._params: dict[str, nn.Parameter] = dict(named)
        self._name_by_id = name_of = {id(p): n for n, p in named}
        # Parameters the user gave the base optimizer, per group, by name: the only ones BAdam may train.
        self._group_names: list[list[str]] = []
        for gi, group in enumerate(self.param_groups):
            names = []
            for p in group["params"]:
                if id(p) not in name_of:
                    raise SlimtuneError(
                        f"a parameter of shape {tuple(p.shape)} in base_optimizer group {gi} is not in "
                        "named_parameters_list; pass list(model.named_parameters()) of the same model."
                    )
                names.append(name_of[id(p)])
            self._group_names.append(names)
        self._group_of = {n: gi for gi, names in enumerate(self._group_names) for n in names}
        trainable = [n for n, _ in named if n in self._group_of]
        if not trainable:
            raise SlimtuneError("base_optimizer has no parameters; build it over model.parameters().")

        all_names = [n for n, _ in named]
        self._always_active = self._resolve_active_modules(active_modules or [], all_names, trainable)
        if lora_only is None:
            lora_only = any(is_lora_name(n) for n in trainable)
        self.lora_only = bool(lora_only)
        self._block_prefixes, self._blocks = self._resolve_blocks(
            block_prefix_list, all_names, trainable, granularity, include_embedding, include_lm_head
        )
        if not self._blocks and not self._always_active:
            raise SlimtuneError("the block list leaves no trainable parameter; check block_prefix_list.")
        if not self._blocks:  # only active_modules train: one empty block keeps the bookkeeping uniform
            self._blocks, self._block_prefixes = [[]], [["<active_modules only>"]]
        if start_block is not None and not (0 <= start_block < len(self._blocks)):
            raise SlimtuneError(f"start_block={start_block} is out of range: there are {len(self._blocks)} blocks.")
        self._fingerprint = fingerprint(
            [f"block {i}: {n} {tuple(self._params[n].shape)}" for i, b in enumerate(self._blocks) for n in b]
            + [f"active: {n} {tuple(self._params[n].shape)}" for n in self._always_active]
        )

        self._schedule = BlockSchedule(len(self._blocks), switch_mode, start_block, seed)
        self.step_in_block = 0  # steps done on the current block
        self.global_step = 0  # steps done in total
        self._masters: dict[str, torch.Tensor] = {}  # fp32 master copies of active low-precision parameters
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._stepped_in_backward: set[str] = set()
        self._warned_no_grad = False
        self._engine_updates = False  # see `hand_updates_to_engine`

        for name, p in named:  # everything starts frozen; activation unfreezes what trains
            p.requires_grad_(False)
            p.grad = None
        for name in self._always_active:
            self._activate_param(name)
        self._activate_block(self._schedule.current)
        self._announce()

    # -- set-up ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_active_modules(prefixes: Sequence[str], all_names: list[str], trainable: list[str]) -> list[str]:
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        for prefix in prefixes:
            if not match_prefixes(all_names, [prefix]):
                raise SlimtuneError(f"active_modules prefix {prefix!r} matches no parameter name; {_hint(all_names)}")
        allowed = set(trainable)
        return [n for n in match_prefixes(all_names, prefixes) if n in allowed]

    def _resolve_blocks(self, block_prefix_list, all_names, trainable, granularity, include_embedding, include_lm_head):
        """Blocks as prefix lists and as lists of trainable parameter names (same order)."""
        allowed = set(trainable) - set(self._always_active)
        if self.lora_only:
            allowed = {n for n in allowed if is_lora_name(n)}
        explicit = block_prefix_list is not None
        if explicit:
            prefix_lists = [[b] if isinstance(b, str) else list(b) for b in block_prefix_list]
            if not prefix_lists:
                raise SlimtuneError("block_prefix_list is empty; pass None for automatic blocks.")
        else:
            prefix_lists = auto_block_prefixes(all_names, granularity, include_embedding, include_lm_head)

        owner: dict[str, list[str]] = {}
        kept_prefixes, blocks = [], []
        for prefixes in prefix_lists:
            names = []
            for prefix in prefixes:
                matched = match_prefixes(all_names, [prefix])
                if not matched:
                    raise SlimtuneError(f"block prefix {prefix!r} matches no parameter name; {_hint(all_names)}")
                names.extend(n for n in matched if n in allowed and n not in names)
            if not names:
                if explicit:
                    raise SlimtuneError(
                        f"block {prefixes} has no trainable parameter (all of its parameters are frozen, in "
                        "active_modules, or not adapters of a LoRA model); remove it from block_prefix_list."
                    )
                continue  # an automatic block with nothing to train (e.g. norms of a LoRA model): skip it
            for n in names:
                if n in owner:
                    raise SlimtuneError(f"parameter {n!r} is in blocks {owner[n]} and {prefixes}; blocks must not "
                                        "overlap.")
                owner[n] = prefixes
            kept_prefixes.append(prefixes)
            blocks.append(names)
        return kept_prefixes, blocks

    # -- properties -----------------------------------------------------------------------------------------------

    @property
    def n_blocks(self) -> int:
        return len(self._blocks)

    @property
    def current_block(self) -> int:
        """Index of the active block in `block_names`."""
        return self._schedule.current

    @property
    def block_names(self) -> list[str]:
        """Readable names of all blocks, in block-index order."""
        return [block_display_name(p) for p in self._block_prefixes]

    @property
    def active_block_name(self) -> str:
        """Readable name of the active block, e.g. ``'transformer.h.3.'``."""
        return block_display_name(self._block_prefixes[self.current_block])

    @property
    def active_parameter_names(self) -> list[str]:
        """Names of the parameters trained at this step (active block + active_modules)."""
        return self._blocks[self.current_block] + self._always_active

    def active_numel(self) -> int:
        """Number of parameter entries trained at this step."""
        return sum(numel(self._params[n]) for n in self.active_parameter_names)

    # -- activation -----------------------------------------------------------------------------------------------

    def _opt_tensor(self, name: str) -> torch.Tensor:
        """The tensor the base optimizer steps for a parameter: its fp32 master, or the parameter itself."""
        return self._masters.get(name, self._params[name])

    def _activate_param(self, name: str, master: torch.Tensor | None = None) -> None:
        p = self._params[name]
        p.requires_grad_(True)
        if self._engine_updates:
            return
        if p.dtype in LOW_PRECISION:
            self._masters[name] = master if master is not None else p.detach().float()
            self._hooks[name] = p.register_post_accumulate_grad_hook(self._accumulate_fp32)
        elif self.update_in_backward:
            self._hooks[name] = p.register_post_accumulate_grad_hook(self._step_in_backward)

    def _deactivate_param(self, name: str) -> None:
        p = self._params[name]
        handle = self._hooks.pop(name, None)
        if handle is not None:
            handle.remove()
        self.state.pop(self._opt_tensor(name), None)
        self._masters.pop(name, None)
        p.requires_grad_(False)
        p.grad = None

    def _activate_block(self, index: int, masters: dict[str, torch.Tensor] | None = None) -> None:
        for name in self._blocks[index]:
            self._activate_param(name, (masters or {}).get(name))
        active = set(self.active_parameter_names)
        for group, names in zip(self.param_groups, self._group_names):
            group["params"] = [self._opt_tensor(n) for n in names if n in active]

    def _deactivate_block(self, index: int) -> None:
        for name in self._blocks[index]:
            self._deactivate_param(name)

    def _announce(self) -> None:
        if self.verbose >= 1:
            self._log(
                f"BAdam: training block {self.current_block + 1}/{self.n_blocks} {self.active_block_name} "
                f"({self.active_numel():,} parameters) from step {self.global_step}"
            )
        if self.verbose >= 2:
            self._log("BAdam: trainable parameters: " + ", ".join(self.active_parameter_names))

    # -- gradients ------------------------------------------------------------------------------------------------

    def _accumulate_fp32(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of a low-precision parameter: move its gradient into the fp32 master's grad.

        Runs once per backward, so each micro-batch's gradient is rounded to bf16 once (by autograd) and then
        summed in fp32, instead of the running sum being rounded at every micro-batch.
        """
        name = self._name_of_param(p)
        master = self._masters[name]
        if master.grad is None:
            master.grad = p.grad.float()
        else:
            master.grad.add_(p.grad)
        p.grad = None
        if self.update_in_backward:
            self._step_in_backward(p)

    def _name_of_param(self, p: torch.Tensor) -> str:
        return self._name_by_id[id(p)]  # hooks receive the tensor, state is keyed by name

    def _step_in_backward(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: step one parameter now and free its gradient (``update_in_backward``)."""
        name = self._name_of_param(p)
        if name in self._stepped_in_backward:
            raise SlimtuneError(
                f"parameter {name!r} received a second gradient before optimizer.step(): update_in_backward=True "
                "needs exactly one backward per step; turn it off to accumulate gradients."
            )
        self._stepped_in_backward.add(name)
        target = self._opt_tensor(name)
        gi = self._group_of[name]
        saved = [g["params"] for g in self.param_groups]
        try:  # let the base optimizer see just this one tensor, in its own group (its hyperparameters)
            for g in self.param_groups:
                g["params"] = []
            self.param_groups[gi]["params"] = [target]
            self.base_optimizer.step()
        finally:
            for g, params in zip(self.param_groups, saved):
                g["params"] = params
        target.grad = None
        if target is not p:
            with torch.no_grad():
                p.copy_(target)

    def _has_any_grad(self) -> bool:
        if self.update_in_backward:
            return bool(self._stepped_in_backward)
        return any(self._opt_tensor(n).grad is not None for n in self.active_parameter_names)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of the trainable parameters (fp32 buffers included); returns the total norm before.

        Use this instead of ``torch.nn.utils.clip_grad_norm_(model.parameters())`` with bf16/fp16 weights, whose
        gradients live in the fp32 masters' ``.grad``.
        """
        with_grad = [t for t in map(self._opt_tensor, self.active_parameter_names) if t.grad is not None]
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm, norm_type) if with_grad else torch.zeros(())

    # -- step -----------------------------------------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None):
        """One optimizer step on the active block; switches block after ``switch_block_every`` steps.

        Parameters of the block that got no gradient (an unrouted MoE expert) are skipped, as torch optimizers do.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._has_any_grad() and not self._warned_no_grad and self.verbose >= 1:
            self._warned_no_grad = True
            logger.warning(
                "BAdam: no parameter of block %s received a gradient at step %d. With gradient checkpointing "
                "(use_reentrant=True) call model.enable_input_require_grads() or use use_reentrant=False.",
                self.active_block_name,
                self.global_step,
            )
        if self.update_in_backward:
            self._stepped_in_backward.clear()
        else:
            self.base_optimizer.step()
            with torch.no_grad():
                for name, master in self._masters.items():
                    if master.grad is not None:
                        self._params[name].copy_(master)
                        # The fp32 buffer is ours: free it now, because model.zero_grad() (HF Trainer) cannot.
                        master.grad = None
        self.count_step()
        return loss

    def count_step(self) -> None:
        """Count one optimizer step of the active block and switch block when it is time. `step` calls it after
        its update; an engine that updates the block itself (DeepSpeed, which holds the block's gradients and
        optimizer state) calls it instead of `step`, then trains the parameters that now require grad."""
        self.global_step += 1
        self.step_in_block += 1
        if self.step_in_block >= self.switch_block_every:
            self._switch()

    def hand_updates_to_engine(self) -> None:
        """From now on an engine updates the active block (DeepSpeed, with its own fp32 master copies, gradient
        buffers and optimizer state): this optimizer only schedules blocks, through `count_step` and
        ``requires_grad``, and keeps no fp32 masters or gradient hooks of its own."""
        self._engine_updates = True
        for name in self.active_parameter_names:
            handle = self._hooks.pop(name, None)
            if handle is not None:
                handle.remove()
            self._masters.pop(name, None)
        self._activate_block(self.current_block)  # the groups now hold the parameters themselves

    def _switch(self) -> None:
        self.step_in_block = 0
        old = self.current_block
        new = self._schedule.advance()
        if new == old:  # the next pass starts where the last ended: keep the block and its moments
            return
        self._deactivate_block(old)
        self._activate_block(new)
        self._announce()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the trainable parameters and the fp32 gradient buffers."""
        for name in self.active_parameter_names:
            for t in {id(x): x for x in (self._params[name], self._opt_tensor(name))}.values():
                if t.grad is None:
                    continue
                if set_to_none:
                    t.grad = None
                else:
                    t.grad.detach_().zero_()

    def add_param_group(self, param_group: dict) -> None:
        if "base_optimizer" not in self.__dict__:  # Optimizer.__init__ adding its placeholder group
            return super().add_param_group(param_group)
        raise SlimtuneError("add parameter groups to the base optimizer before wrapping it in BlockOptimizer.")

    # -- memory ---------------------------------------------------------------------------------------------------

    def optimizer_state_bytes(self) -> int:
        """Bytes held now for training the active parameters: fp32 masters, optimizer state (moments, step
        counters) and gradient buffers (masters' fp32 grads, or ``p.grad`` of fp32 parameters)."""
        total = 0
        for name in self.active_parameter_names:
            t = self._opt_tensor(name)
            if t is not self._params[name]:
                total += tensor_bytes(t)
            total += tensor_bytes(t.grad)
            for value in self.state.get(t, {}).values():
                if torch.is_tensor(value):
                    total += tensor_bytes(value)
        return total

    def analytic_state_bytes(self, include_grads: bool = True) -> int:
        """`analytic_state_bytes` for the current active parameters, each with its own storage dtype."""
        return sum(
            analytic_state_bytes(numel(self._params[n]), self._params[n].dtype, include_grads)
            for n in self.active_parameter_names
        )

    # -- state ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume exactly, keyed by parameter name (tensors are copies).

        Keys: ``fingerprint`` (block layout), ``schedule`` (block order of this pass, position, generator state),
        ``current_block``, ``step_in_block``, ``global_step``, ``param_groups`` (hyperparameters and parameter
        names of each group), ``masters`` (fp32 master weights of active bf16/fp16 parameters) and ``state`` (the
        base optimizer's per-parameter state, e.g. Adam moments, of the active parameters).
        """
        active = self.active_parameter_names
        return {
            "format": STATE_FORMAT,
            "kind": "BlockOptimizer",
            "fingerprint": self._fingerprint,
            "block_names": self.block_names,
            "schedule": self._schedule.state_dict(),
            "current_block": self.current_block,
            "step_in_block": self.step_in_block,
            "global_step": self.global_step,
            "param_groups": [
                {**{k: v for k, v in g.items() if k != "params"}, "param_names": list(names)}
                for g, names in zip(self.param_groups, self._group_names)
            ],
            "masters": {n: self._masters[n].detach().clone() for n in active if n in self._masters},
            "state": {
                n: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in self.state[t].items()}
                for n in active
                if (t := self._opt_tensor(n)) in self.state
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict` from an optimizer built over the same model and blocks."""
        if state_dict.get("kind") != "BlockOptimizer" or state_dict.get("format") != STATE_FORMAT:
            raise SlimtuneError("this is not a slimtune BlockOptimizer state dict (format 1); was it saved by another "
                                "optimizer?")
        if state_dict["fingerprint"] != self._fingerprint:
            saved = state_dict.get("block_names", [])
            raise SlimtuneError(
                f"the optimizer state was saved for a different model or block layout ({len(saved)} blocks, first "
                f"{saved[:1]}) than this optimizer ({self.n_blocks} blocks, first {self.block_names[:1]}); load it "
                "into a BlockOptimizer built over the same model with the same block_prefix_list/granularity."
            )
        groups = state_dict["param_groups"]
        if [g["param_names"] for g in groups] != self._group_names:
            raise SlimtuneError("the saved param groups hold different parameters than base_optimizer's groups; build "
                                "the base optimizer the same way as when saving.")

        # Free the current block, then rebuild the saved one from the saved fp32 masters (not from the rounded
        # low-precision weights: that is what makes a bf16 resume exact).
        self._deactivate_block(self.current_block)
        for name in self._always_active:
            self._deactivate_param(name)
        self._schedule.load_state_dict(state_dict["schedule"])
        if self._schedule.current != state_dict["current_block"]:
            raise SlimtuneError("inconsistent optimizer state: current_block does not match the saved block order.")
        self.step_in_block = int(state_dict["step_in_block"])
        self.global_step = int(state_dict["global_step"])
        masters = {n: _place_like(m, self._params[n], torch.float32) for n, m in state_dict["masters"].items()}
        for name in self._always_active:
            self._activate_param(name, masters.get(name))
        self._activate_block(self.current_block, masters)
        for group, saved in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        active = set(self.active_parameter_names)
        for name, param_state in state_dict["state"].items():
            if name not in active:
                raise SlimtuneError(f"optimizer state holds parameter {name!r}, which is not active in the saved "
                                    "block.")
            target = self._opt_tensor(name)
            self.state[target] = {k: _restore(k, v, target) for k, v in param_state.items()}
        self._announce()


def _restore(key: str, value, target: torch.Tensor):
    """A saved optimizer-state value placed like torch does: ``step`` as saved, other float tensors on the
    parameter's device and dtype."""
    if not torch.is_tensor(value):
        return value
    if key == "step" or not value.is_floating_point():
        return value.clone()
    return _place_like(value, target, target.dtype)


def _place_like(value: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A saved whole tensor as a new tensor of `dtype` placed like `target`: on its device, and for a parameter that
    a sharding strategy split over ranks (a DTensor, FSDP2), as this rank's shard of it. Every rank holds the whole
    saved tensor, so no rank needs to send anything."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor) and not isinstance(value, DTensor):
        whole = value.to(device=target.device_mesh.device_type, dtype=dtype)
        return distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None)
    return value.to(device=target.device, dtype=dtype).clone()


def _hint(names: Sequence[str]) -> str:
    try:
        layers = auto_block_prefixes(names)
        example = ", ".join(p[0] for p in layers[:2])
        return f"prefixes look like {example!r} (end them with '.')."
    except SlimtuneError:
        return f"parameter names look like {', '.join(names[:3])!r}."

