"""BitNet b1.58 (method=bitnet): every attention and MLP projection becomes a `slimtune.quant.bitnet.BitLinear`
(ternary weights times one absmean scale, 8-bit per-token activations, straight-through gradients into latent
floating-point weights); embeddings and the output head stay in high precision.

Two uses:

* from scratch (``model=gpt method=bitnet gpt.bias=false``), optionally with the published two-stage schedule
  (``bitnet.two_stage``): from the middle of the run on, the learning rate is scaled by ``bitnet.stage2_lr_scale``
  and weight decay is switched off;
* converting a pretrained model (``model=PATH method=bitnet bitnet.warmup_steps=N``): the quantization strength
  ``lam`` of every layer rises linearly from 0 (the pretrained model exactly) to 1 (full BitNet) over N steps.

`slimtune export` writes a bitnet checkpoint in the packed format transformers' BitNet integration loads
(`slimtune.quant.pack`): a Hugging Face model in its own class, slimtune's GPT as transformers'
GPTBigCode (`slimtune.quant.gpt_export`, which says why that class and how the layers map).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.families import GPTFamily
from slimtune.methods.base import Method, refuse_eight_bit_adam
from slimtune.registry import METHODS


@dataclass
class BitnetConfig:
    """BitNet b1.58 ternary training (method=bitnet)."""

    warmup_steps: int = 0
    """Steps over which the quantization strength rises linearly from 0 to 1 (converting a pretrained model);
    0 quantizes fully from the first step (training from scratch)."""
    input_norm: bool = False
    """An RMSNorm inside every BitNet layer, before its input is quantized (the published recipe's SubLN; exported
    as transformers' use_rms_norm). Adds parameters, so it changes a pretrained model's function: use it from
    scratch."""
    two_stage: bool = False
    """The b1.58 recipe's two-stage schedule: from step max_iters // 2 on, the learning rate is multiplied by
    stage2_lr_scale and weight decay is 0."""
    stage2_lr_scale: float = 0.5
    """Learning-rate multiplier of the second stage (two_stage only)."""
    skip: list = field(default_factory=lambda: ["lm_head"])
    """Linear layers kept in high precision: names, or last name parts (an output head tied to the embedding is
    always kept)."""

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise SlimtuneError(f"bitnet.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.stage2_lr_scale <= 1.0:
            raise SlimtuneError(f"bitnet.stage2_lr_scale must be in (0, 1], got {self.stage2_lr_scale}")


def bitnet_model(model: nn.Module, options: BitnetConfig, lam: float = 1.0) -> list[str]:
    """Swap every linear layer of ``model`` (but ``options.skip``) for a `BitLinear` sharing its weight; returns the
    names swapped. Refuses layers with a bias, naming them all, before changing anything."""
    from slimtune.quant.bitnet import BitLinear
    from slimtune.quant.layers import linear_names, replace_linears

    biased = [n for n in linear_names(model, options.skip) if model.get_submodule(n).bias is not None]
    if biased:
        fix = ("set gpt.bias=false (BitNet GPTs are trained without biases)" if _is_slimtune_gpt(model) else
               f"add them to bitnet.skip to keep them in high precision (e.g. bitnet.skip=[lm_head,"
               f"{biased[0].rsplit('.', 1)[-1]}]), or use a model without linear biases")
        raise SlimtuneError(f"method=bitnet: {len(biased)} linear layers have a bias, which BitNet b1.58 layers "
                            f"cannot hold ({', '.join(biased[:4])}{', ...' if len(biased) > 4 else ''}); {fix}")
    swapped = replace_linears(model, lambda name, linear: BitLinear.from_linear(
        linear, lam=lam, use_rms_norm=options.input_norm, name=name), options.skip)
    if not swapped:
        raise SlimtuneError(f"method=bitnet found no linear layer to convert in {type(model).__name__} (skipped: "
                            f"{', '.join(options.skip) or 'none'})")
    return swapped


def _is_slimtune_gpt(model: nn.Module) -> bool:
    from slimtune.models.gpt import GPT

    return isinstance(model, GPT)


def _bitlinears(model: nn.Module):
    from slimtune.quant.bitnet import BitLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]


@METHODS.register("bitnet")
class Bitnet(Method):
    """AdamW on latent weights; attention and MLP projections compute with ternary weights and int8 inputs."""

    config_cls = BitnetConfig
    exports_gpt = True
    """`slimtune export` hands checkpoints of slimtune's GPT to this method (see `slimtune.finetune.export`)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lam = self._lam_at(0)
        self._layers: list[nn.Module] = []

    # -- model ----------------------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module) -> nn.Module:
        bitnet_model(model, self.options, self.lam)
        self._layers = [m for _, m in _bitlinears(model)]
        return model

    def _lam_at(self, step: int) -> float:
        w = self.options.warmup_steps
        return 1.0 if w == 0 else min(1.0, step / w)

    def _set_lam(self, lam: float) -> None:
        self.lam = lam
        for layer in self._layers:
            layer.lam = lam

    # -- schedule -------------------------------------------------------------------------------------------------

    def _stage2_from(self) -> int:
        return self.cfg.max_iters // 2

    def _apply_stage(self, step: int, optimizer) -> bool:
        """Put the optimizer in the stage of `step` (two_stage only); True when that changed anything."""
        if not self.options.two_stage or step < self._stage2_from():
            return False
        changed = False
        for group in optimizer.param_groups:
            if group.get("lr_scale", 1.0) != self.options.stage2_lr_scale or group.get("weight_decay", 0.0) != 0.0:
                group["lr_scale"] = self.options.stage2_lr_scale  # the loop sets lr * lr_scale every step
                group["weight_decay"] = 0.0
                changed = True
        return changed

    def on_start(self, step: int, optimizer) -> list[dict]:
        self._set_lam(self._lam_at(step))
        self._apply_stage(step, optimizer)
        from slimtune.quant.pack import VALUES_PER_BYTE

        unpackable = [m.layer_name for m in self._layers if m.out_features % VALUES_PER_BYTE]
        if not unpackable:
            return []
        # Said before training rather than at export, hours later.
        return [{"kind": "warning", "step": step, "layers": unpackable,
                 "message": f"warning: {len(unpackable)} BitNet layers ({', '.join(unpackable[:3])}"
                            f"{', ...' if len(unpackable) > 3 else ''}) have an output size that is not a multiple "
                            f"of {VALUES_PER_BYTE}: this model trains, but `slimtune export` cannot pack them in "
                            f"transformers' BitNet format. Change the model's sizes or list them in bitnet.skip"}]

    def after_step(self, step: int, optimizer) -> list[dict]:
        events = []
        before = self.lam
        self._set_lam(self._lam_at(step))
        if before < 1.0 <= self.lam:
            events.append({"kind": "bitnet", "step": step, "lam": self.lam,
                           "message": f"step {step}: BitNet quantization at full strength (lam=1)"})
        if self._apply_stage(step, optimizer):
            events.append({"kind": "bitnet", "step": step, "stage": 2,
                           "message": f"step {step}: BitNet stage 2: learning rate x{self.options.stage2_lr_scale}, "
                                      f"weight decay 0"})
        return events

    def step_metrics(self, optimizer) -> dict:
        return {**super().step_metrics(optimizer), "lam": self.lam}

    def state_dict(self) -> dict:
        return {"lam": self.lam}

    def load_state_dict(self, state: dict) -> None:
        if "lam" in state:
            self._set_lam(float(state["lam"]))

    # -- inference and export -------------------------------------------------------------------------------------

    def load_for_inference(self, source: Path, trust_remote_code: bool = False):
        from slimtune.train import checkpoint as ckpt_io

        model, tokenizer = super().load_for_inference(source, trust_remote_code)
        lam = 1.0
        if (Path(source) / "trainer.pt").is_file():
            lam = float(ckpt_io.load_state(Path(source), "trainer.pt").get("method", {}).get("lam", 1.0))
        bitnet_model(model, self.options, lam)
        if self.options.input_norm:  # the norms are new modules: load their trained weights too
            self.load_weights(model, Path(source))
        return model, tokenizer

    def export_checkpoint(self, source: Path, out_dir: Path, *, overwrite: bool = False, **options) -> Path:
        """Pack the checkpoint's BitNet layers (four ternary values per byte + inverse scale) into a folder that
        plain `transformers.AutoModelForCausalLM.from_pretrained` loads with its BitNet integration. A GPT
        checkpoint (``model=gpt``) is rebuilt as `slimtune sample` rebuilds it and exported as transformers'
        GPTBigCode."""
        if options:
            raise SlimtuneError(f"method=bitnet has no export option {', '.join(options)}")
        if GPTFamily.owns_checkpoint(source):
            from slimtune.sample import load_gpt_checkpoint

            model, tokenizer, _ = load_gpt_checkpoint(source, "cpu")
        else:
            model, tokenizer = self.load_for_inference(source)
        return export_bitnet(model, tokenizer, out_dir, overwrite=overwrite)

    # -- reporting ------------------------------------------------------------------------------------------------

    def describe(self, model, optimizer) -> str:
        o = self.options
        parts = [f"method bitnet: {len(self._layers)} BitLinear layers (ternary weights, int8 inputs"
                 f"{', input RMSNorm' if o.input_norm else ''}), lam {self.lam:g}"]
        if o.warmup_steps:
            parts.append(f"rising to 1 over {o.warmup_steps} steps")
        if o.two_stage:
            parts.append(f"two-stage: from step {self._stage2_from()} lr x{o.stage2_lr_scale}, weight decay 0")
        return ", ".join(parts)

    def estimate_memory(self, spec, run):
        # Full AdamW on the floating-point weights, plus the quantized copy of every block weight that each matmul
        # keeps for backward (`slimtune.plan.methods.bitnet_state`); every layer keeps its activations.
        from slimtune.plan.estimate import activation_bytes, bitnet_state

        refuse_eight_bit_adam(run, "bitnet")
        return (bitnet_state(spec, run.weight_dtype, master_weights=run.master_weights, checkpointing=run.checkpointing)
                + activation_bytes(spec, run.batch, run.seq, **run.activation_options()))


def export_bitnet(model: nn.Module, tokenizer, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a model whose linears are `BitLinear`s as a packed BitNet folder (config.json with a
    ``quantization_config`` of ``quant_method: bitnet``, model.safetensors, tokenizer); returns the folder.

    A Hugging Face model keeps its class; slimtune's GPT (with its slimtune tokenizer) becomes transformers'
    GPTBigCode (`slimtune.quant.gpt_export`)."""
    from safetensors.torch import save_file

    from slimtune.atomic import check_new_folder, write_folder_atomically
    from slimtune.quant.pack import bitnet_quantization_config, export_bitlinear_state

    layers = _bitlinears(model)
    if not layers:
        raise SlimtuneError(f"{type(model).__name__} has no BitNet layers to pack; export a method=bitnet checkpoint")
    partial = [n for n, m in layers if m.lam < 1.0]
    if partial:
        raise SlimtuneError(f"this checkpoint is still warming up quantization (lam={layers[0][1].lam:g} < 1 in "
                            f"{partial[0]} and {len(partial) - 1} more): the packed format holds fully ternary layers "
                            f"only. Train past bitnet.warmup_steps and export a later checkpoint")
    if _is_slimtune_gpt(model):
        from slimtune.quant.gpt_export import export_gpt

        return export_gpt(model, tokenizer, out_dir, overwrite=overwrite)
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise SlimtuneError(f"BitNet export needs a Hugging Face causal LM or slimtune's GPT, got "
                            f"{type(model).__name__}")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    for name, layer in layers:
        packed = export_bitlinear_state(layer, name=name)  # refuses an output size the format cannot hold
        for key, tensor in packed.items():
            state[f"{name}.{key}"] = tensor.contiguous()
    norm_flags = {m.use_rms_norm for _, m in layers}
    keep = sorted(re.escape(n) for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and n not in dict(layers))
    config = copy.deepcopy(model.config)
    config.quantization_config = bitnet_quantization_config(
        modules_to_not_convert=keep or ["lm_head"], use_rms_norm=norm_flags == {True},
        rms_norm_eps=layers[0][1].rms_norm.eps if norm_flags == {True} else 1e-6)

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(folder)

    return write_folder_atomically(check_new_folder(out_dir, overwrite), write, replace=True)

