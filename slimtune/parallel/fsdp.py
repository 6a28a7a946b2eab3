"""Fully sharded data parallelism with torch's FSDP2 (`torch.distributed.fsdp.fully_shard`), launched by `torchrun`.

`torchrun --nproc_per_node=N -m slimtune train ... strategy=fsdp`: every transformer block is one FSDP unit and the
rest of the model (embedding, final norm, head) is the root unit. Each rank keeps 1/N of every weight, gradient and
optimizer moment; a unit's weights are all-gathered just before it computes and freed after, and its gradients are
reduce-scattered after its backward (NCCL on CUDA, gloo on CPUs). Data and loss normalisation are DDP's: N ranks on
batch_size B give the gradients of one process on N x B.

- Precision: with bf16/fp16 `runtime.precision`, FSDP2 gathers and computes in that dtype and reduces gradients in
  fp32 (MixedPrecisionPolicy); the sharded weights keep their storage dtype. Methods whose trainable set changes
  during the run (BAdam) compute under autocast instead: FSDP2 fixes a unit's gradient dtype at its first forward,
  from the parameters that train then.
- Gradient accumulation: only the last micro-batch of a step reduce-scatters (`set_requires_gradient_sync`).
- Checkpoints: rank 0 writes one ordinary model (the full state dict, gathered), so `slimtune export`, `chat` and a
  resume with any world size read it like any other; the optimizer state is saved sharded with
  torch.distributed.checkpoint (`optimizer/`, resharded on load for another world size). An optimizer with a state
  format of its own (a method with `torch_optimizer_state` False: BAdam's BlockOptimizer, keyed by parameter name
  and holding one block) is gathered into optimizer.pt instead, and every rank takes its shard back on resume.
- Evaluation: ranks may hold different numbers of evaluation batches, and every FSDP forward is collective, so the
  weights are gathered once for the whole evaluation (as much memory as DDP's replica) and freed after it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.parallel.ddp import DDP
from slimtune.registry import STRATEGIES

OPTIMIZER_SHARDS = "optimizer"
"""Folder of a checkpoint that holds the sharded optimizer state (torch.distributed.checkpoint format)."""


@dataclass
class FsdpConfig:
    """Fully sharded data parallelism with FSDP2 (strategy=fsdp, under torchrun)."""

    offload: bool = False
    """Keep the sharded weights, gradients and optimizer state in CPU memory and step the optimizer there
    (FSDP2 CPUOffloadPolicy); for a CUDA device."""
    reshard_after_forward: bool = True
    """Free each block's gathered weights after its forward and gather them again for backward (less memory);
    false keeps them until backward (less communication)."""


def block_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's transformer blocks: the nn.ModuleList of modules of one class holding the most parameters
    (`model.layers` of a Hugging Face Llama, `transformer.h` of slimtune's GPT); None if there is none."""
    best, best_numel = None, 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        numel = sum(p.numel() for p in module.parameters())
        if numel > best_numel:
            best, best_numel = module, numel
    return best


def _full_tensors(value):
    """`value` (a state dict: nested dicts, lists and tensors) with every DTensor gathered into a plain CPU tensor.
    Collective: every rank walks the same structure in the same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if isinstance(value, dict):
        return {k: _full_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_full_tensors(v) for v in value)
    return value


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _with_state(optimizer: torch.optim.Optimizer) -> list[int]:
    """Positions (over the param groups, in order) of the parameters that have optimizer state now."""
    return [i for i, p in enumerate(_parameters(optimizer)) if optimizer.state.get(p)]


@contextlib.contextmanager
def _requiring_grad(params: list[torch.Tensor], positions: set[int]):
    """`requires_grad` set for exactly the parameters at `positions` inside, as it was after. torch.distributed.
    checkpoint gives a state to, and loads one into, just the parameters that require grad; a method whose trainable
    set changes may have saved state for another set than trains when it resumes."""
    before = [p.requires_grad for p in params]
    for i, p in enumerate(params):
        p.requires_grad_(i in positions)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


class _Forward(nn.Module):
    """What the training forward runs through: the sharded model's own forward, whose FSDP hooks gather the root
    unit. (The loss would otherwise call the backbone and read the head's weight directly, around those hooks.)"""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@STRATEGIES.register("fsdp")
class FSDP(DDP):
    """Weights, gradients and optimizer state sharded over the processes by torch's FSDP2."""

    config_cls = FsdpConfig
    _torch_optimizer_state = True
    """The method's optimizer keeps torch's state-dict format (`Method.torch_optimizer_state`), which
    torch.distributed.checkpoint shards; set from the method in `check`."""
    _saved_with_state: list[int] | None = None
    """On resume: which parameters had optimizer state when the checkpoint was saved (None: not recorded)."""

    def check(self, method, model: nn.Module) -> None:
        self._torch_optimizer_state = method.torch_optimizer_state
        if self.cfg.optim.name != "adamw":
            raise SlimtuneError(f"optim.name={self.cfg.optim.name} cannot run under strategy=fsdp: bitsandbytes' 8-bit "
                                f"optimizers step plain tensors, not FSDP's sharded DTensors. Use optim.name=adamw "
                                f"(its state is sharded over the ranks anyway), or strategy=ddp")
        from slimtune.hardware import resolve_precision

        if resolve_precision(self.cfg.runtime.precision, self.device) == torch.float16:
            raise SlimtuneError("runtime.precision=fp16 needs loss scaling whose overflow check spans every rank's "
                                "shard, which strategy=fsdp does not add; use runtime.precision=bf16 or fp32")
        if self.options.offload and self.device.type != "cuda":
            raise SlimtuneError(f"fsdp.offload=true moves state from the accelerator to CPU memory, but this run "
                                f"already trains on {self.device.type}; remove fsdp.offload")
        quantized = [n for n, p in model.named_parameters() if getattr(p, "quant_state", None) is not None]
        if quantized:
            raise SlimtuneError(
                f"method={method.name} cannot run under strategy=fsdp: its base weights are bitsandbytes 4-bit "
                f"tensors ({quantized[0]}, ...), which FSDP2 does not shard (it flattens parameters into DTensors "
                f"and loses their quantization state). Use method=lora under strategy=fsdp (the frozen base is "
                f"sharded instead of quantized), method=qlora qlora.backend=torchao (NF4 tensors that FSDP2 "
                f"shards), or method=qlora under strategy=ddp")
        for name, p in model.named_parameters():
            parts = [getattr(p, a, None) for a in ("quantized_data", "quantized_scalers", "quantization_factor")]
            if parts[0] is not None and any(n % self.world_size for n in (p.size(0), *(t.numel() for t in parts))):
                raise SlimtuneError(
                    f"{name} cannot be sharded over {self.world_size} processes: torchao's NF4 tensor splits its "
                    f"rows, codes and each level of its scales evenly ({p.size(0)} rows; "
                    f"{', '.join(str(t.numel()) for t in parts)} values), and {self.world_size} does not divide them "
                    f"all. Use a number of processes that does, method=lora, or method=qlora under strategy=ddp")

    def shard(self, model: nn.Module, method) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        from slimtune.hardware import resolve_precision

        mesh = init_device_mesh(self._device.type, (self.world_size,))
        dtype = resolve_precision(self.cfg.runtime.precision, self._device)
        if dtype == torch.float32 or not method.fixed_trainable_set:
            policy = MixedPrecisionPolicy()  # compute in the storage dtype (under the loop's autocast, if any)
        else:
            policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy() if self.options.offload else OffloadPolicy()
        options = dict(mesh=mesh, mp_policy=policy, offload_policy=offload)
        self._blocks = list(block_list(model) or [])
        for block in self._blocks:
            fully_shard(block, reshard_after_forward=self.options.reshard_after_forward, **options)
        fully_shard(model, **options)
        self._model = model
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        self._forward = _Forward(model)
        return self._forward

    def on_trainable_change(self, model: nn.Module, forward_model: nn.Module) -> nn.Module:
        return forward_model  # FSDP2 reduces the gradients of whichever parameters require grad at each backward

    def _no_sync(self, model: nn.Module, last: bool):
        return self._gradient_sync(last)

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool):
        # Micro-batches before the last accumulate unreduced gradients locally; the last reduce-scatters the sum.
        self._model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            self._model.set_requires_gradient_sync(True)

    def optimizer_step(self, optimizer, precision, clip):
        from torch.distributed.tensor import DTensor

        grad_norm = super().optimizer_step(optimizer, precision, clip)
        return grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm

    def describe(self) -> str:
        return (f"{self.world_size} process(es), FSDP2 over {len(self._blocks)} blocks + root"
                f"{', CPU offload' if self.options.offload else ''}")

    # -- evaluation -----------------------------------------------------------------------------------------------

    def eval_loss_sum(self, model: nn.Module, workload, batch, precision) -> tuple[float, int]:
        return super().eval_loss_sum(self._forward, workload, batch, precision)

    @contextlib.contextmanager
    def evaluating(self):
        # Gather every unit once and keep it gathered, so that a forward needs no collective: a rank may have fewer
        # evaluation batches than another.
        units = [*self._blocks, self._model]
        for block in self._blocks:
            block.set_reshard_after_forward(False, recurse=False)
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for block in self._blocks:
                block.set_reshard_after_forward(self.options.reshard_after_forward, recurse=False)
            for unit in units:
                unit.reshard()

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        # Tied weights (an embedding used as the head) are one tensor under each of their names, as in the model.
        first_name: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            first = first_name.setdefault(id(param), name)
            if first != name and first in state:
                state[name] = state[first]
        return state

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        if self._torch_optimizer_state:  # sharded by save_shards; optimizer.pt says where, and for which parameters
            return {"format": "torch.distributed.checkpoint", "folder": OPTIMIZER_SHARDS,
                    "world_size": self.world_size, "with_state": _with_state(optimizer)}
        return _full_tensors(optimizer.state_dict())

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self._torch_optimizer_state:
            optimizer.load_state_dict(state)  # full tensors: the optimizer shards them like its parameters
        elif state.get("format") != "torch.distributed.checkpoint":
            raise SlimtuneError("its optimizer state was not written by strategy=fsdp (it is one process's, not "
                                "sharded); resume it with the strategy that wrote it")
        else:
            self._saved_with_state = state.get("with_state")

    def save_shards(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # No state at all (a method dropped every moment, e.g. at a switch of what trains): nothing to save, and
        # torch.distributed.checkpoint would give every parameter that requires grad a state, changing the next step.
        if self._torch_optimizer_state and optimizer.state:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=str(folder / OPTIMIZER_SHARDS))

    def load_shards(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self._torch_optimizer_state or self._saved_with_state == []:
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        params = _parameters(optimizer)
        saved = self._saved_with_state
        with_state = set(saved) if saved is not None else {i for i, p in enumerate(params) if p.requires_grad}
        with _requiring_grad(params, with_state):  # the parameters that had state when it was saved
            # The target's shapes come from this run's shards: torch.distributed.checkpoint reads what each rank
            # owns now, whatever world size wrote it.
            state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
            dcp.load(state, checkpoint_id=str(folder / OPTIMIZER_SHARDS))
            set_optimizer_state_dict(model, optimizer, state["optimizer"])

    # -- planning -------------------------------------------------------------------------------------------------

    def estimate_memory(self, plan, spec, run):
        # Weights, gradients and optimizer state 1/N each; gathered at once: the root unit (embedding, final norm,
        # untied head: gathered for the whole step) and one block.
        from slimtune.plan.estimate import cpu_offload, fsdp

        gathered = spec.embedding_params + spec.norm_params + spec.head_params + spec.layer_params
        per_rank = fsdp(plan, run.world_size, gathered, weight_dtype=run.weight_dtype)
        return cpu_offload(per_rank, params=True) if self.options.offload else per_rank
