"""DeepSpeed ZeRO stage 2 or 3 (`strategy=deepspeed`), launched by `torchrun` or the `deepspeed` launcher.

DeepSpeed is an optional extra (`pip install 'slimtune[deepspeed]'`), imported only when this strategy runs.
`torchrun --nproc_per_node=N -m slimtune train ... strategy=deepspeed deepspeed.stage=3`: every rank joins the
process group as under DDP (gloo on CPUs, with DeepSpeed's CPU accelerator; NCCL on CUDA), then
`deepspeed.initialize` wraps the model and the method's own optimizer (torch AdamW) in an engine. ZeRO-2 partitions
gradients and optimizer state over the ranks, ZeRO-3 the weights too; `deepspeed.offload_optimizer` /
`deepspeed.offload_params` move them to CPU memory.

- Configuration: the DeepSpeed JSON is built from slimtune's config (batch_size, optim.grad_accum, optim.grad_clip,
  the weights' dtype, the deepspeed.* keys). `deepspeed.config=FILE` passes a JSON of one's own through: slimtune
  fills in what it leaves out, and a value that contradicts slimtune's is an error naming both keys. The optimizer
  and the learning-rate schedule stay slimtune's (the loop sets each group's lr every step).
- Gradients: each micro-batch's loss is normalised by the target tokens of the whole step on all ranks (times N,
  because ZeRO averages over the ranks) and back-propagated with `engine.backward(..., scale_wrt_gas=False)`, so
  N ranks on batch_size B give one process's gradients on N x B. DeepSpeed counts micro-batches itself: every
  micro-batch ends with `engine.step()`, which updates only at the last one.
- A trainable set that changes (`method.fixed_trainable_set` False, e.g. BAdam): the method's optimizer only picks
  what trains (the Method hooks `hand_updates_to_engine` and `count_engine_step`); the engine is rebuilt through
  `deepspeed.initialize` with a fresh AdamW over what trains now after every change, so gradients, fp32 partitions
  (bf16 weights' masters too) and moments exist only for that set, sharded 1/N: BAdam's (2M + 16M/D)/N. No private
  DeepSpeed state is touched.
- Evaluation under ZeRO-3 runs on a plain whole copy of the model (DeepSpeed's forward is collective, and ranks may
  hold different numbers of evaluation batches).
- Checkpoints: DeepSpeed's own `save_checkpoint` / `load_checkpoint` write every rank's shards into the
  checkpoint's `deepspeed/` folder (resume needs the same world size), and rank 0 also writes the whole model
  (ZeRO-3: gathered parameter by parameter) as the ordinary model.safetensors that `slimtune export` and one
  process read.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.parallel.ddp import DDP
from slimtune.registry import STRATEGIES

SHARDS = "deepspeed"
"""Folder of a checkpoint that holds DeepSpeed's own checkpoint (each rank's ZeRO partitions)."""
TAG = "zero"
"""DeepSpeed's checkpoint tag (subfolder) inside `SHARDS`."""
LAUNCH = ("torchrun --nproc_per_node=N -m slimtune train ... strategy=deepspeed, or "
          "deepspeed --num_gpus=N --no_local_rank --module slimtune train ... strategy=deepspeed")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO data parallelism (strategy=deepspeed, under torchrun or the deepspeed launcher)."""

    stage: int = 2
    """ZeRO stage: 2 partitions gradients and optimizer state over the processes, 3 the weights too."""
    offload_optimizer: bool = False
    """Keep the optimizer state (and fp32 gradients) in CPU memory and step the optimizer there (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep the partitioned weights in CPU memory too (ZeRO-3 only)."""
    config: Optional[str] = None
    """A DeepSpeed JSON file to pass through; slimtune's settings fill in what it leaves out, and a value that
    contradicts them is an error."""

    def __post_init__(self):
        if self.stage not in (2, 3):
            raise SlimtuneError(f"deepspeed.stage must be 2 or 3, got {self.stage!r} (for stage 1's savings, use 2)")
        if self.offload_params and self.stage != 3:
            raise SlimtuneError("deepspeed.offload_params=true needs deepspeed.stage=3: only ZeRO-3 partitions the "
                                "weights (ZeRO-2 keeps a whole copy on every device); set deepspeed.stage=3, or use "
                                "deepspeed.offload_optimizer=true alone")


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise SlimtuneError("strategy=deepspeed needs DeepSpeed, which is not installed: pip install "
                            "'slimtune[deepspeed]' (or use strategy=fsdp, which needs only torch)") from None
    return deepspeed


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"zero_optimization": {"stage": 2}} → {"zero_optimization.stage": 2}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    """`base` with `extra`'s keys added where `base` has none (nested dicts merged key by key)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out.setdefault(key, value)
    return out


def _without_deepspeed_hooks(model: nn.Module) -> nn.Module:
    """`model` (a copy of a ZeRO-3 module taken while its weights were gathered) with the forward and backward hooks
    DeepSpeed registered on every submodule removed, so that its forward is an ordinary one; the model's own hooks
    stay. torch gives no public way to remove hooks without their handles, so this edits the copy's hook tables."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks,
                      module._backward_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "__module__", "").startswith("deepspeed."):
                    del hooks[key]
    return model


@STRATEGIES.register("deepspeed")
class DeepSpeed(DDP):
    """ZeRO-2/3 through DeepSpeed's engine; the method's optimizer, slimtune's loss normalisation and schedule."""

    config_cls = DeepSpeedConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.engine = None
        self._method = self._method_optimizer = None
        self._set_changes = False  # the method changes what trains: its optimizer only picks it (BAdam)
        self._ds_config: dict = {}
        self._eval_model = None  # ZeRO-3: a plain whole copy while evaluating
        self._user_config = self._read_user_config()

    # -- set-up ---------------------------------------------------------------------------------------------------

    def setup(self, device: torch.device) -> torch.device:
        deepspeed = import_deepspeed()
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise SlimtuneError(f"strategy=deepspeed needs a launcher that starts one process per device: {LAUNCH}")
        device = super().setup(device)
        if device.type == "cpu" and deepspeed.get_accelerator().device_name() != "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

            deepspeed.accelerator.set_accelerator(CPU_Accelerator())
        return device

    def _read_user_config(self) -> dict:
        path = self.options.config
        if path is None:
            return {}
        try:
            user = json.loads(Path(path).read_text())
        except OSError as exc:
            raise SlimtuneError(f"deepspeed.config={path} cannot be read ({exc.strerror}); give the path of a "
                                f"DeepSpeed JSON file") from None
        except json.JSONDecodeError as exc:
            raise SlimtuneError(f"deepspeed.config={path} is not valid JSON ({exc}); fix the file") from None
        for key, owner in (("optimizer", "optim.*"), ("scheduler", "lr and optim.*")):
            if key in user:
                raise SlimtuneError(f"deepspeed.config {path} sets {key}, but slimtune builds the {key} from {owner}: "
                                    f"remove {key} from the file")
        return user

    def check(self, method, model: nn.Module) -> None:
        from slimtune.hardware import resolve_precision

        quantized = [n for n, p in model.named_parameters() if not p.is_floating_point()
                     or getattr(p, "quant_state", None) is not None]
        if quantized:
            raise SlimtuneError(
                f"method={method.name} cannot run under strategy=deepspeed: its base weights are quantized "
                f"({quantized[0]}, ...), which ZeRO cannot partition or gather. Use method=qlora under strategy=fsdp "
                f"(qlora.backend=torchao) or strategy=ddp, or method=lora under strategy=deepspeed")
        dtypes = {p.dtype for p in model.parameters()}
        if torch.float16 in dtypes:
            raise SlimtuneError("strategy=deepspeed trains fp32 or bf16 weights; set hf.weights_dtype=bf16 or fp32")
        if resolve_precision(self.cfg.runtime.precision, self.device) == torch.float16:
            raise SlimtuneError("runtime.precision=fp16 needs loss scaling, which strategy=deepspeed does not add to "
                                "slimtune's; use runtime.precision=bf16 or fp32")
        self._method, self._set_changes = method, not method.fixed_trainable_set
        self._ds_config = self._config(bf16=dtypes == {torch.bfloat16})

    def _config(self, bf16: bool) -> dict:
        """DeepSpeed's config: slimtune's settings, and the user's JSON where slimtune has no say."""
        cfg, o = self.cfg, self.options

        def offload(on: bool) -> dict:
            return {"device": "cpu" if on else "none"}

        zero = {"stage": o.stage, "offload_optimizer": offload(o.offload_optimizer)}
        if o.stage == 3:
            zero["offload_param"] = offload(o.offload_params)
        ours = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.optim.grad_accum,
            "train_batch_size": cfg.batch_size * cfg.optim.grad_accum * self.world_size,
            "gradient_clipping": cfg.optim.grad_clip,
            "bf16": {"enabled": bf16},
            "fp16": {"enabled": False},
            "zero_optimization": zero,
            # slimtune's optimizer is torch's AdamW, also when offloaded (DeepSpeedCPUAdam needs compiled ops).
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,  # slimtune logs the steps
        }
        source = {
            "train_micro_batch_size_per_gpu": "batch_size",
            "gradient_accumulation_steps": "optim.grad_accum",
            "train_batch_size": "batch_size x optim.grad_accum x processes",
            "gradient_clipping": "optim.grad_clip",
            "bf16.enabled": "hf.weights_dtype",
            "fp16.enabled": "hf.weights_dtype",
            "zero_optimization.stage": "deepspeed.stage",
            "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
            "zero_optimization.offload_param.device": "deepspeed.offload_params",
        }
        theirs = _flatten(self._user_config)
        for key, value in _flatten(ours).items():
            if key in theirs and theirs[key] != value and key in source:
                raise SlimtuneError(f"deepspeed.config {o.config} sets {key}={theirs[key]!r} but {source[key]} "
                                    f"gives {value!r}; make them agree (or remove {key} from the file)")
        return _merge(self._user_config, ours)  # the file's own keys, and slimtune's defaults it may override

    def build_optimizer(self, method, model: nn.Module, ctx) -> torch.optim.Optimizer:
        self._model = model
        self._method_optimizer = optimizer = method.build_optimizer(model, ctx)
        if self._set_changes:
            method.hand_updates_to_engine(optimizer)  # fp32 masters of bf16 weights: DeepSpeed's, for what trains
        self._initialize()
        return optimizer

    def _initialize(self) -> None:
        """(Re)build the engine over the parameters that train now. For a fixed trainable set it is the method's
        optimizer; for one that changes, a fresh AdamW over what trains now, with its groups' hyperparameters."""
        deepspeed = import_deepspeed()
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        self._engine_trainable = self._trainable_names()
        if self._set_changes:
            groups = [{**{k: v for k, v in g.items() if k != "params"},
                       "params": [p for p in g["params"] if p.requires_grad]}
                      for g in self._method_optimizer.param_groups]
            client = torch.optim.AdamW([g for g in groups if g["params"]], fused=self._device.type != "mps")
        else:
            client = self._method_optimizer
        self.engine, *_ = deepspeed.initialize(model=self._model, optimizer=client, config=self._ds_config)
        self._client = client

    def _trainable_names(self) -> list[str]:
        return self._trainable(self._model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model  # the forward runs through self.engine, which a block switch replaces

    def describe(self) -> str:
        o = self.options
        offload = [name for name, on in (("optimizer", o.offload_optimizer), ("params", o.offload_params)) if on]
        return (f"{self.world_size} process(es), DeepSpeed ZeRO-{o.stage}"
                f"{', offload ' + ' and '.join(offload) + ' to CPU' if offload else ''}")

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        super().teardown()

    # -- one optimizer step ---------------------------------------------------------------------------------------

    def forward_backward(self, model: nn.Module, workload, batches, precision) -> tuple[torch.Tensor, int]:
        counts = [workload.count_targets(b) for b in batches]
        scale = self._loss_scale(sum(counts))
        total = torch.zeros((), device=precision.device)
        for i, batch in enumerate(batches):
            with precision.autocast():
                loss_sum = workload.loss_sum(self.engine, batch)
            self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
            if i < len(batches) - 1:
                self.engine.step()  # counts the micro-batch; DeepSpeed updates at the last one (optimizer_step)
            total += loss_sum.detach().float()
        return total, sum(counts)

    def optimizer_step(self, optimizer, precision, clip) -> torch.Tensor | None:
        # Clipping is DeepSpeed's (gradient_clipping = optim.grad_clip), on the partitioned gradients.
        if self._client is not optimizer:  # the loop set this step's lr on the method's optimizer
            lrs = [g["lr"] for g in optimizer.param_groups if any(p.requires_grad for p in g["params"])]
            for group, lr in zip(self._client.param_groups, lrs):
                group["lr"] = lr
        self.engine.step()
        if self._set_changes:
            self._method.count_engine_step(optimizer)  # may change what trains: `on_trainable_change` then rebuilds
        return self.engine.get_global_grad_norm()

    def on_trainable_change(self, model: nn.Module, forward_model: nn.Module) -> nn.Module:
        if self._trainable_names() != self._engine_trainable:
            self._initialize()
        return forward_model

    # -- evaluation -----------------------------------------------------------------------------------------------

    def eval_loss_sum(self, model: nn.Module, workload, batch, precision) -> tuple[float, int]:
        forward = self.engine if self._eval_model is None else self._eval_model
        return super().eval_loss_sum(forward, workload, batch, precision)

    @contextlib.contextmanager
    def evaluating(self):
        # A ZeRO-3 forward is collective (it gathers each layer, and checks its trace of the layers with the other
        # ranks), but ranks may hold different numbers of evaluation batches. So evaluation runs on a plain whole
        # copy of the model without DeepSpeed's hooks: a full replica's memory for its duration, as under FSDP.
        if self.options.stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self._model.parameters())):
            self._eval_model = _without_deepspeed_hooks(copy.deepcopy(self._model))
        try:
            yield
        finally:
            self._eval_model = None

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        import deepspeed

        # Copies, also under ZeRO-2, whose whole weights are views into one flat buffer (safetensors refuses to
        # save a tied pair of those). ZeRO-3 gathers one parameter at a time, so no rank ever holds more than one
        # gathered tensor besides rank 0's copy.
        state, copies = {}, {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) not in copies:
                gathered = contextlib.nullcontext()
                if hasattr(tensor, "ds_id"):
                    gathered = deepspeed.zero.GatheredParameters([tensor])
                with gathered:
                    copies[id(tensor)] = tensor.detach().to("cpu", copy=True) if self.is_main else None
            state[name] = copies[id(tensor)]  # a tied weight: the same tensor under both names
        return state if self.is_main else None

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        # Adam's state is in DeepSpeed's checkpoint (save_shards); a method whose trainable set changes keeps its
        # optimizer's here (BAdam's block schedule).
        return optimizer.state_dict() if self._set_changes else {"format": "deepspeed", "folder": SHARDS}

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self._set_changes:
            optimizer.load_state_dict(state)  # what trained when it was saved trains again: rebuild the engine
            self.on_trainable_change(model, model)
        elif state.get("format") != "deepspeed":
            raise SlimtuneError("its optimizer state was not written by strategy=deepspeed; resume it with the "
                                "strategy that wrote it")

    def save_shards(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.engine.save_checkpoint(str(folder / SHARDS), tag=TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load_shards(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        shards = folder / SHARDS / TAG
        written = len(list(shards.glob("*optim_states.pt")))
        if written != self.world_size:
            raise SlimtuneError(
                f"{folder} holds DeepSpeed ZeRO partitions of {written} process(es) but this run has "
                f"{self.world_size}: DeepSpeed reloads them only into as many processes; resume with {written}")
        self.engine.load_checkpoint(str(folder / SHARDS), tag=TAG, load_module_strict=False,
                                    load_lr_scheduler_states=False)

    # -- planning -------------------------------------------------------------------------------------------------

    def estimate_memory(self, plan, spec, run):
        # ZeRO-2: gradients and optimizer state 1/N; ZeRO-3: the weights too, plus the gathered largest unit.
        # BAdam's plan holds only its active block's state, so ZeRO-3 gives its (2M + 16M/D)/N.
        from slimtune.plan.estimate import cpu_offload, zero2, zero3

        o = self.options
        if o.stage == 3:
            per_rank = zero3(plan, run.world_size, spec.largest_unit_params, weight_dtype=run.weight_dtype)
        else:
            per_rank = zero2(plan, run.world_size, weight_dtype=run.weight_dtype)
        if o.offload_optimizer or o.offload_params:
            per_rank = cpu_offload(per_rank, params=o.offload_params)
        return per_rank
