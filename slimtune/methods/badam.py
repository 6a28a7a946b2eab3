"""BAdam: block-coordinate Adam (Luo et al., NeurIPS 2024) with exact resume and correct mixed precision.

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

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.blocks import (
    GRANULARITIES,
    auto_block_prefixes,
    block_display_name,
    default_switch_every,
    match_prefixes,
)

__all__ = [
    "BlockOptimizer",
    "BlockOptimizerRatio",
    "analytic_state_bytes",
    "auto_block_prefixes",
    "default_switch_every",
]

logger = logging.getLogger("slimtune.badam")

SWITCH_MODES = ("random", "ascending", "descending", "fixed")
MASK_MODES = ("adjacent", "scatter")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STATE_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------------
# Small shared pieces
# ----------------------------------------------------------------------------------------------------------------


def analytic_state_bytes(n_active_params: int, weight_dtype: torch.dtype = torch.float32, include_grads: bool = True) -> int:
    """Bytes of optimizer state that BAdam holds for ``n_active_params`` active parameters (Adam family).

    Counted per active parameter: two fp32 Adam moments (8 bytes); an fp32 master copy (4 bytes) only when the
    weights are stored in bf16/fp16; an fp32 gradient (4 bytes) when ``include_grads`` (between backward and step).
    So 16 bytes for bf16/fp16 weights and 12 for fp32 weights, i.e. the ``16·N/D`` / ``12·N/D`` terms of the BAdam
    memory formula with ``n_active_params = N/D``. Not counted: the weights themselves, Adam's per-tensor ``step``
    scalars (4 bytes per tensor), and activations.
    """
    per_param = 8 + (4 if weight_dtype in _LOW_PRECISION else 0) + (4 if include_grads else 0)
    return int(n_active_params) * per_param


def _numel(p: torch.Tensor) -> int:
    """Entries of the whole parameter, also where DeepSpeed ZeRO-3 keeps only this rank's partition (an empty
    `.data`; the whole count is its `ds_numel`)."""
    return getattr(p, "ds_numel", p.numel())


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _check_choice(key: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise SlimtuneError(f"{key}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


def _check_positive_int(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlimtuneError(f"{key}={value!r} must be an integer >= 1 (optimizer steps per block).")


def _unique_named(named_parameters: Iterable) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs with tied parameters listed once, under their first name."""
    seen: set[int] = set()
    out = []
    for name, p in named_parameters:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _fingerprint(rows: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def _is_lora_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


class _BlockSchedule:
    """Order in which blocks are visited, driven by its own seeded generator (never the global RNG).

    A *pass* visits blocks in ``order``; ``pos`` is the position of the current block in it. ``random`` draws a
    fresh permutation for every pass (random reshuffling); ``ascending``/``descending`` cycle from ``start``;
    ``fixed`` stays on ``start``.
    """

    def __init__(self, n_blocks: int, mode: str, start: int | None, seed: int):
        self.n_blocks, self.mode, self.start = n_blocks, mode, start
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.order = self._new_pass(first=True)
        self.pos = 0

    def _new_pass(self, first: bool) -> list[int]:
        n = self.n_blocks
        if self.mode == "random":
            order = torch.randperm(n, generator=self.generator).tolist()
            if first and self.start is not None:
                order.remove(self.start)
                order.insert(0, self.start)
            return order
        if self.mode == "fixed":
            return [self.start or 0]
        if self.mode == "ascending":
            s = 0 if self.start is None else self.start
            return [(s + i) % n for i in range(n)]
        s = n - 1 if self.start is None else self.start
        return [(s - i) % n for i in range(n)]

    @property
    def current(self) -> int:
        return self.order[self.pos]

    def advance(self) -> int:
        self.pos += 1
        if self.pos == len(self.order):
            self.order, self.pos = self._new_pass(first=False), 0
        return self.current

    def state_dict(self) -> dict:
        return {"order": list(self.order), "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        order = [int(i) for i in state["order"]]
        if any(not 0 <= i < self.n_blocks for i in order):
            raise SlimtuneError("optimizer state has a block order that does not fit this optimizer's blocks.")
        self.order, self.pos = order, int(state["pos"])
        # The state may have been moved to an accelerator by a wrapper (accelerate); generators want a CPU tensor.
        self.generator.set_state(state["generator"].cpu())


# ----------------------------------------------------------------------------------------------------------------
# BlockOptimizer
# ----------------------------------------------------------------------------------------------------------------


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
        ds_zero3_enabled: accepted for badam compatibility; DeepSpeed ZeRO-3 is not supported here.

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
            raise SlimtuneError("ds_zero3_enabled=True is not supported by slimtune.BlockOptimizer yet: train BAdam in "
                                "one process (strategy=single).")
        _check_positive_int("switch_block_every", switch_block_every)
        _check_choice("switch_mode", switch_mode, SWITCH_MODES)
        _check_choice("granularity", granularity, GRANULARITIES)
        if any(base_optimizer.state.values()):
            raise SlimtuneError("wrap the base optimizer in BlockOptimizer before its first step (it already has state).")

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

        named = _unique_named(named_parameters_list)
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
            lora_only = any(_is_lora_name(n) for n in trainable)
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
        self._fingerprint = _fingerprint(
            [f"block {i}: {n} {tuple(self._params[n].shape)}" for i, b in enumerate(self._blocks) for n in b]
            + [f"active: {n} {tuple(self._params[n].shape)}" for n in self._always_active]
        )

        self._schedule = _BlockSchedule(len(self._blocks), switch_mode, start_block, seed)
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
            allowed = {n for n in allowed if _is_lora_name(n)}
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
                    raise SlimtuneError(f"parameter {n!r} is in blocks {owner[n]} and {prefixes}; blocks must not overlap.")
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
        return sum(_numel(self._params[n]) for n in self.active_parameter_names)

    # -- activation -----------------------------------------------------------------------------------------------

    def _opt_tensor(self, name: str) -> torch.Tensor:
        """The tensor the base optimizer steps for a parameter: its fp32 master, or the parameter itself."""
        return self._masters.get(name, self._params[name])

    def _activate_param(self, name: str, master: torch.Tensor | None = None) -> None:
        p = self._params[name]
        p.requires_grad_(True)
        if self._engine_updates:
            return
        if p.dtype in _LOW_PRECISION:
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
                total += _tensor_bytes(t)
            total += _tensor_bytes(t.grad)
            for value in self.state.get(t, {}).values():
                if torch.is_tensor(value):
                    total += _tensor_bytes(value)
        return total

    def analytic_state_bytes(self, include_grads: bool = True) -> int:
        """`analytic_state_bytes` for the current active parameters, each with its own storage dtype."""
        return sum(
            analytic_state_bytes(_numel(self._params[n]), self._params[n].dtype, include_grads)
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
            "format": _STATE_FORMAT,
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
        if state_dict.get("kind") != "BlockOptimizer" or state_dict.get("format") != _STATE_FORMAT:
            raise SlimtuneError("this is not a slimtune BlockOptimizer state dict (format 1); was it saved by another optimizer?")
        if state_dict["fingerprint"] != self._fingerprint:
            saved = state_dict.get("block_names", [])
            raise SlimtuneError(
                f"the optimizer state was saved for a different model or block layout ({len(saved)} blocks, first "
                f"{saved[:1]}) than this optimizer ({self.n_blocks} blocks, first {self.block_names[:1]}); load it "
                "into a BlockOptimizer built over the same model with the same block_prefix_list/granularity."
            )
        groups = state_dict["param_groups"]
        if [g["param_names"] for g in groups] != self._group_names:
            raise SlimtuneError("the saved param groups hold different parameters than base_optimizer's groups; build the base optimizer the same way as when saving.")

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
                raise SlimtuneError(f"optimizer state holds parameter {name!r}, which is not active in the saved block.")
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


# ----------------------------------------------------------------------------------------------------------------
# BlockOptimizerRatio
# ----------------------------------------------------------------------------------------------------------------

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
        _check_positive_int("switch_every", switch_every)
        _check_choice("mask_mode", mask_mode, MASK_MODES)
        if not 0 < update_ratio <= 1:
            raise SlimtuneError(f"update_ratio={update_ratio} must be in (0, 1] (fraction of each parameter trained).")
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        named = _unique_named(named_parameters_list)
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
            raise SlimtuneError("BlockOptimizerRatio has no trainable parameter (only embeddings?); set include_embedding=True.")
        for _, p in named:
            p.requires_grad_(id(p) in trainable)
            if id(p) not in trainable:
                p.grad = None

        self.switch_every, self.update_ratio, self.mask_mode = switch_every, update_ratio, mask_mode
        self.preserve_threshold = preserve_threshold
        self.verbose, self._log = int(verbose), log_fn or logger.info
        self.n_blocks = math.ceil(1 / update_ratio - 1e-9)
        self._schedule = _BlockSchedule(self.n_blocks, "random", None, seed)
        self.step_in_block = 0
        self.global_step = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._compact_grad) for g in self.param_groups for p in g["params"]]
        self._fingerprint = _fingerprint(
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
                    if p.dtype in _LOW_PRECISION:
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
        return sum(_tensor_bytes(v) for st in self.state.values() for v in st.values() if torch.is_tensor(v))

    def state_dict(self) -> dict:
        """Block order, generator, steps and each parameter's compact state (mask, moments, master), by name."""
        return {
            "format": _STATE_FORMAT,
            "kind": "BlockOptimizerRatio",
            "fingerprint": self._fingerprint,
            "schedule": self._schedule.state_dict(),
            "step_in_block": self.step_in_block,
            "global_step": self.global_step,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "state": {
                self._names[id(p)]: {
                    k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in self.state[p].items() if k != "grad"
                }
                for g in self.param_groups
                for p in g["params"]
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("kind") != "BlockOptimizerRatio" or state_dict.get("format") != _STATE_FORMAT:
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


# ----------------------------------------------------------------------------------------------------------------
# method=badam: the plug-in the training loop uses
# ----------------------------------------------------------------------------------------------------------------

from dataclasses import dataclass, field  # noqa: E402
from typing import Optional  # noqa: E402

from slimtune.config import check_choice as _check_key_choice  # noqa: E402
from slimtune.methods.base import (Method, OptimizerContext, build_adam, decay_groups,  # noqa: E402
                                   refuse_eight_bit_adam)
from slimtune.registry import METHODS  # noqa: E402


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
        _check_key_choice("badam.switch_mode", self.switch_mode, SWITCH_MODES)
        _check_key_choice("badam.granularity", self.granularity, GRANULARITIES)
        if self.switch_every is not None and self.switch_every < 1:
            raise SlimtuneError(f"badam.switch_every must be >= 1, got {self.switch_every}")


@METHODS.register("badam")
class BAdam(Method):
    """One block of parameters trains at a time; the rest is frozen and has no gradients or optimizer state."""

    config_cls = BadamConfig
    fixed_trainable_set = False  # the active block changes at every switch
    grads_in_param_grad = False  # low-precision weights accumulate into fp32 buffers through hooks

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
