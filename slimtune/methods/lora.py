"""LoRA and QLoRA (method=lora, method=qlora): low-rank adapters on a frozen base, built on `peft`.

peft does the adapter arithmetic (its `LoraConfig`, imported as `PeftLoraConfig` beside this module's `LoraConfig`
section; `get_peft_model`; state-dict helpers); slimtune decides what to adapt, keeps checkpoints in peft's own
format (`slimtune.methods.lora_adapters`: a checkpoint is an adapter folder, so
`peft.PeftModel.from_pretrained(base, "out/step-000200")` loads it without slimtune), and rebuilds base + adapter
for inference and export. For training, the plain LoRA linear layers get a forward that scales and adds the
adapter's output in place (`slimtune.methods.peft_patch`): peft's operations on the same values, bit for bit, with
fewer temporary tensors and so a lower peak.

QLoRA keeps the frozen linear layers in 4-bit (NF4 or FP4, optionally double-quantized) through `bitsandbytes`,
quantized while transformers loads the weights. Unlike peft's `prepare_model_for_kbit_training`, the frozen
embeddings and norms stay in their storage dtype: casting them to fp32 costs memory and buys nothing when they
never train. A merged export dequantizes the base and adds the LoRA delta in fp32; it never re-quantizes (that
would erase a small fine-tune). qlora.init=loftq starts the adapters at the rank-r part of each layer's rounding error
(`slimtune.quant.loftq`), leaving the base as it is.

peft and bitsandbytes are imported only inside functions: the method registry imports this module whether or not
they are installed, and a missing one is an error that names the extra to install (`slimtune.extras`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.extras import require_bitsandbytes, require_peft, require_torchao
from slimtune.families import ModelFamily, checkpoint_family, family_of
from slimtune.methods.badam import BAdam
from slimtune.methods.base import Method, OptimizerContext, build_adam, decay_groups, trainable_numel
from slimtune.methods.lora_adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FINGERPRINT, CLASSIFIER_HEADS,
                                            check_base, fingerprint, head_names, load_adapter_weights, merged_model,
                                            resolve_targets)
from slimtune.methods.peft_patch import lean_lora_layers
from slimtune.quant.four_bit import dequantized_weight, is_quantized, own_memory, quantized_bytes
from slimtune.registry import METHODS
from slimtune.typed_config import check_choice

# peft initialisations that keep the base weights as they are (PiSSA, OLoRA, CorDA and peft's LoftQ rewrite the
# base, so an adapter-only checkpoint could not rebuild the model; EVA needs data before training). qlora.init=loftq
# is slimtune's own (the base stays as method=qlora stores it, `slimtune.quant.loftq`): peft creates the adapters
# with its default, then `Qlora.prepare` sets them.
INITS = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal", "random": False, "loftq": True}

NF4_BLOCK = 64
"""Weights per NF4 scale (bitsandbytes' and torchao's default)."""


def nf4_linears(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Replace the weight of every linear layer but the output and classification heads by torchao's NF4 tensor
    (frozen), one layer at a time, so at most one layer exists twice; products run in `compute_dtype`."""
    nf4 = require_torchao("qlora.backend=torchao")
    heads = head_names(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in heads and not is_quantized(module.weight):
            n = module.weight.numel()
            if n % NF4_BLOCK:
                raise SlimtuneError(f"qlora.backend=torchao quantizes blocks of {NF4_BLOCK} weights; {name} has {n}. "
                                    f"Use qlora.backend=bitsandbytes for this model")
            # Scales are quantized in groups of up to 256 (fewer for layers too small for one group).
            weight = module.weight.detach().to(compute_dtype)
            quantized = nf4.to_nf4(weight, block_size=NF4_BLOCK, scaler_block_size=math.gcd(256, n // NF4_BLOCK))
            module.weight = nn.Parameter(quantized, requires_grad=False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Config sections
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """Low-rank adapters on a frozen base (method=lora)."""

    section: ClassVar[str] = "lora"  # the config section, in error messages
    r: int = 8
    """Rank of every adapter (the A matrix is r x in, B is out x r)."""
    alpha: float = 16.0
    """Scaling numerator: the adapter's output is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list = field(default_factory=list)
    """Linear layers to adapt, as name patterns: a full module name, a name suffix (q_proj, self_attn.o_proj) or a
    glob (*.mlp.*). Empty: every attention and MLP projection of the transformer blocks. all-linear: every linear
    layer except the output head."""
    modules_to_save: list = field(default_factory=list)
    """Modules trained in full and saved with the adapter (a new classification head is added automatically)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): also trains a magnitude vector per adapted layer."""
    init: str = "default"
    """Adapter initialisation (peft's init_lora_weights): default (A random, B zero), gaussian, orthogonal, or
    random (B non-zero too: the model changes before any training; for tests). method=qlora also takes loftq: the
    adapters start at the best rank-r correction of the 4-bit base's rounding (the adapter then belongs to the
    4-bit base: merge it, or load it over a base quantized the same way)."""
    adapter: str = ""
    """Start from this peft adapter folder (adapter_config.json + adapter_model.safetensors) instead of a fresh
    adapter; its rank, targets and scaling replace the keys above."""
    badam: bool = False
    """Train the adapters one block at a time with BAdam: only the active block's adapters have gradients and
    optimizer state; badam.* sets the blocks and the switching."""

    def __post_init__(self):
        _check_lora_keys(self.section, self)


@dataclass
class QloraConfig(LoraConfig):
    """Low-rank adapters on a frozen 4-bit base (method=qlora): every lora.* key, and how the base is stored."""

    section: ClassVar[str] = "qlora"
    quant_type: str = "nf4"
    """4-bit format of the frozen linear weights: nf4 (NormalFloat, for normally distributed weights) or fp4."""
    double_quant: bool = True
    """Quantize the per-block scales too (about 0.37 bits per weight saved)."""
    compute_dtype: str = "auto"
    """Dtype the 4-bit weights are dequantized to for each product: auto (bf16 where the device computes it
    natively, else fp32), fp32 or bf16."""
    backend: str = "bitsandbytes"
    """Library that stores and multiplies the 4-bit weights: bitsandbytes (quantizes while loading; CPU and CUDA)
    or torchao (its NF4 tensor, which FSDP2 shards; quantizes each linear layer right after loading; nf4 with
    double quantization only)."""

    def __post_init__(self):
        super().__post_init__()
        check_choice("qlora.quant_type", self.quant_type, ("nf4", "fp4"))
        check_choice("qlora.compute_dtype", self.compute_dtype, ("auto", "fp32", "bf16"))
        check_choice("qlora.backend", self.backend, ("bitsandbytes", "torchao"))
        if self.backend == "torchao" and (self.quant_type != "nf4" or not self.double_quant):
            raise SlimtuneError("qlora.backend=torchao stores NF4 with double quantization only: remove "
                                "qlora.quant_type / qlora.double_quant, or use qlora.backend=bitsandbytes")


def _check_lora_keys(section: str, o) -> None:
    if o.r <= 0:
        raise SlimtuneError(f"{section}.r must be a positive integer (the adapter rank), got {o.r}")
    if o.alpha <= 0:
        raise SlimtuneError(f"{section}.alpha must be > 0, got {o.alpha}")
    if not 0.0 <= o.dropout < 1.0:
        raise SlimtuneError(f"{section}.dropout must be in [0, 1), got {o.dropout}")
    check_choice(f"{section}.init", o.init, tuple(INITS))
    if o.init == "loftq":
        if section != "qlora":
            raise SlimtuneError(f"{section}.init=loftq starts the adapters at a 4-bit base's rounding error: it is for "
                                f"method=qlora (qlora.init=loftq); for method={section} use one of "
                                f"{', '.join(i for i in INITS if i != 'loftq')}")
        if o.use_dora:
            raise SlimtuneError("qlora.init=loftq and qlora.use_dora=true do not combine (DoRA sizes its magnitudes "
                                "from the adapters at creation): drop one of them")
        if o.adapter:
            raise SlimtuneError("qlora.init=loftq and qlora.adapter both set the adapters' starting values: drop one "
                                "of them")
    if o.adapter and not (Path(o.adapter) / ADAPTER_CONFIG).is_file():
        raise SlimtuneError(f"{section}.adapter={o.adapter} is not a peft adapter folder (no {ADAPTER_CONFIG} in it)")


# ---------------------------------------------------------------------------------------------------------------
# method=lora
# ---------------------------------------------------------------------------------------------------------------


@METHODS.register("lora")
class Lora(Method):
    """Adapters train; the base is frozen. Checkpoints hold the adapter only, in peft's format."""

    config_cls = LoraConfig
    also_reads = ("badam",)  # with lora.badam=true, the badam.* section sets the blocks

    def __init__(self, cfg):
        super().__init__(cfg)
        self._blocks = None
        if self.options.badam:
            # BAdam over the adapters: its block optimizer trains only `lora_` parameters of the active block.
            self._blocks = BAdam(cfg)
            for capability in ("fixed_trainable_set", "grads_in_param_grad", "torch_optimizer_state"):
                setattr(self, capability, getattr(BAdam, capability))
        elif cfg.section("badam") != type(cfg.section("badam"))():
            raise SlimtuneError(f"badam.* keys apply to method={self.name} only with {self.name}.badam=true (adapters "
                                f"trained block by block); set {self.name}.badam=true or remove them")

    # -- model ----------------------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module) -> nn.Module:
        peft = require_peft()
        o = self.options
        self._fingerprint = fingerprint(model)
        if o.adapter:
            config = peft.LoraConfig.from_pretrained(o.adapter)
            config.inference_mode = False
        else:
            config = self.peft_config(model)
        config.base_model_name_or_path = self._base_path()
        try:
            peft_model = peft.get_peft_model(model, config)
        except (ValueError, TypeError) as exc:
            where = f"the adapter in {o.adapter}" if o.adapter else f"{self.name}.target_modules"
            raise SlimtuneError(f"{where} does not fit model={self.cfg.model}: {exc}") from None
        if o.adapter:
            load_adapter_weights(peft_model, Path(o.adapter))
        lean_lora_layers(peft_model)  # same results, fewer temporary tensors (a lower peak)
        # The loop trains the base model itself, whose linears peft has wrapped in place: slimtune's losses see
        # the model class they know (e.g. the fused head + loss of Llama-like models), parameter names stay the
        # base's plus `lora_A` / `lora_B`. The peft wrapper is kept for saving in peft's format.
        self.peft_model = peft_model
        return peft_model.get_base_model()

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig as PeftLoraConfig

        o = self.options
        saved = list(o.modules_to_save)
        for name in saved:
            if not any(n == name or n.endswith("." + name) for n, _ in model.named_modules()):
                raise SlimtuneError(f"{self.name}.modules_to_save: {name!r} is no module of this model")
        family = family_of(self.cfg)
        saved += [h for h in family.trainable_heads
                  if isinstance(getattr(model, h, None), nn.Module) and h not in saved]
        return PeftLoraConfig(task_type=family.peft_task_type, r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout,
                              target_modules=resolve_targets(model, list(o.target_modules)),
                              modules_to_save=saved or None, use_rslora=o.use_rslora, use_dora=o.use_dora,
                              init_lora_weights=INITS[o.init])

    def _base_path(self) -> str:
        return family_of(self.cfg).base_model_path()

    # -- optimization ---------------------------------------------------------------------------------------------

    def build_optimizer(self, model: nn.Module, ctx: OptimizerContext) -> torch.optim.Optimizer:
        if self._blocks is not None:
            return self._blocks.build_optimizer(model, ctx)
        o = self.cfg.optim
        return build_adam(decay_groups(model, o.weight_decay, o.decay_embeddings), self.cfg, ctx.device)

    def clip_grad_norm_(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        if self._blocks is not None:
            return self._blocks.clip_grad_norm_(model, optimizer, max_norm)
        return super().clip_grad_norm_(model, optimizer, max_norm)

    def hand_updates_to_engine(self, optimizer: torch.optim.Optimizer) -> None:
        if self._blocks is not None:
            self._blocks.hand_updates_to_engine(optimizer)

    def count_engine_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._blocks is not None:
            self._blocks.count_engine_step(optimizer)

    def on_start(self, step: int, optimizer: torch.optim.Optimizer) -> list[dict]:
        return self._blocks.on_start(step, optimizer) if self._blocks is not None else []

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> list[dict]:
        return self._blocks.after_step(step, optimizer) if self._blocks is not None else []

    def step_metrics(self, optimizer: torch.optim.Optimizer) -> dict:
        return self._blocks.step_metrics(optimizer) if self._blocks is not None else {}

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save_weights(self, model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        if state_dict is not None:  # keyed as the whole model (the peft model's base), but peft reads its own names
            base = self.peft_model.get_base_model()  # `model` may be only this rank's part of it (a pipeline stage)
            prefix = next(name for name, module in self.peft_model.named_modules() if module is base)
            state_dict = {f"{prefix}.{key}": value for key, value in state_dict.items()}
        self.peft_model.save_pretrained(str(folder), state_dict=state_dict)  # peft keeps the adapters' entries
        readme = folder / "README.md"  # peft's model-card template: not part of the adapter
        if readme.is_file():
            readme.unlink()
        (folder / BASE_FINGERPRINT).write_text(json.dumps({"fingerprint": self._fingerprint,
                                                           "model": self.cfg.model}, indent=1) + "\n")

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        check_base(folder, model, self.cfg.model)
        load_adapter_weights(self.peft_model, folder)

    # -- export and inference -------------------------------------------------------------------------------------

    def load_base(self, source: Path, trust_remote_code: bool = False):
        """(frozen base model, tokenizer) as the run that wrote the checkpoint `source` loaded them."""
        from slimtune.models.build import DTYPES
        from slimtune.models.hf import load_tokenizer
        from slimtune.train import checkpoint as ckpt_io

        ckpt_io.read_model_config(source)  # a checkpoint folder, or the error saying it is none
        family = checkpoint_family(source) or ModelFamily  # the family's own head (a classifier's labels)
        trust = trust_remote_code or self.cfg.hf.trust_remote_code
        extra = {"dtype": DTYPES[self.cfg.hf.weights_dtype], **self.load_options()}
        model = family.load_base(self.cfg.model, source, trust_remote_code=trust, **extra)
        return model, load_tokenizer(source)

    def load_adapter_model(self, source: Path, trust_remote_code: bool = False):
        """(peft model of base + the adapter in `source`, tokenizer), checked against the base it was trained on."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        base, tokenizer = self.load_base(source, trust_remote_code)
        check_base(source, base, self.cfg.model)
        config = PeftLoraConfig.from_pretrained(str(source))
        config.inference_mode = True
        model = get_peft_model(base, config)
        load_adapter_weights(model, source)
        return model.eval(), tokenizer

    def load_for_inference(self, source: Path, trust_remote_code: bool = False):
        if not (Path(source) / ADAPTER_CONFIG).is_file():
            return super().load_for_inference(source, trust_remote_code)
        model, tokenizer = self.load_adapter_model(Path(source), trust_remote_code)
        return model.get_base_model(), tokenizer  # adapters stay in place, unmerged: the forward training ran

    def export_checkpoint(self, source: Path, out_dir: Path, *, overwrite: bool = False, merge: bool = False,
                          quantize: str | None = None, **options) -> Path:
        """Without `merge`: the peft adapter folder (adapter + tokenizer). With `merge`: a plain transformers folder
        whose weights are the base (dequantized for QLoRA) plus the adapter's delta, in fp32; with `quantize`
        (nf4 or fp4) too, its linear layers re-quantized to 4 bits (bitsandbytes' format in transformers)."""
        from slimtune.atomic import check_new_folder, write_folder_atomically
        from slimtune.models.hf import save_plain

        if options:
            raise SlimtuneError(f"method={self.name} has no export option {', '.join(options)}")
        if quantize and not merge:
            raise SlimtuneError(f"--quantize {quantize} re-quantizes merged weights: add --merge (an adapter folder "
                                f"has no base weights to quantize)")
        if quantize:
            check_choice("--quantize", quantize, ("nf4", "fp4"))
            require_bitsandbytes(f"--quantize {quantize}")
        source, out_dir = Path(source), Path(out_dir)
        if not (source / ADAPTER_CONFIG).is_file():
            raise SlimtuneError(f"{source} holds no {ADAPTER_CONFIG}: not a checkpoint of method={self.name}")
        check_new_folder(out_dir, overwrite)

        def write(tmp: Path) -> None:
            if merge:
                model, tokenizer = self.load_adapter_model(source)
                save_plain(merged_model(model, quantize), tokenizer, tmp)
                return
            for f in source.iterdir():
                if f.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FINGERPRINT) or f.name.startswith(
                        ("tokenizer", "special_tokens", "chat_template")):
                    shutil.copy2(f, tmp / f.name)

        write_folder_atomically(out_dir, write, replace=True)
        if not merge and self.options.init == "loftq":
            print(f"warning: {out_dir}: this adapter was trained from qlora.init=loftq, so it also corrects the 4-bit "
                  f"rounding of its base: load it over the base quantized the same way ({self.options.quant_type}"
                  f"{', double quant' if self.options.double_quant else ''}), or export with --merge for "
                  f"full-precision weights", file=sys.stderr)
        return out_dir

    # -- reporting ------------------------------------------------------------------------------------------------

    def describe(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
        from slimtune.memory import param_numel

        config = self.peft_model.peft_config[self.peft_model.active_adapter]
        n = sum(param_numel(p) for p in model.parameters())
        trainable = trainable_numel(model)
        targets = config.target_modules
        shown = ", ".join(sorted(targets)) if isinstance(targets, (set, list)) else str(targets)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        blocks = f"; adapters by blocks: {self._blocks.describe(model, optimizer)}" if self._blocks else ""
        return (f"method {self.name}: r={config.r} alpha={config.lora_alpha:g} on {shown}; "
                f"{trainable / 1e6:.3f}M of {n / 1e6:.2f}M parameters train{blocks}")

    def estimate_memory(self, spec, run):
        # The frozen base at its storage size, adapters at 16 bytes per parameter (fp32 weight, gradient, two
        # moments); every layer keeps what its adapters' backward needs.
        from slimtune.plan.estimate import activation_bytes, lora_state

        adapters = self.planner_adapters()
        with _planner_errors(self.name):
            return (lora_state(spec, adapters, storage_dtype=run.weight_dtype)
                    + activation_bytes(spec, run.batch, run.seq, **run.activation_options(lora=adapters)))

    def planner_adapters(self):
        """The adapters as the memory planner describes them (`slimtune.plan.activations.LoraAdapters`)."""
        from slimtune.plan.activations import LoraAdapters

        o = self.options
        # The planner names a block's linears by their last part; a glob is taken as all of them (an upper bound).
        targets = tuple(dict.fromkeys("all-linear" if any(c in t for c in "*?[") else t.rpartition(".")[2]
                                      for t in o.target_modules)) or ("all-linear",)  # default: every projection
        with _planner_errors(self.name):
            return LoraAdapters(rank=o.r, targets=targets, dropout=o.dropout)


@contextmanager
def _planner_errors(method: str):
    """Targets the planner cannot describe mean no estimate, not a refused run: `prepare` checks them against the
    real model and gives the user's error."""
    from slimtune.plan.settings import NoEstimate

    try:
        yield
    except NoEstimate:
        raise
    except SlimtuneError as exc:
        raise NoEstimate(f"the planner cannot describe {method}.target_modules: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# method=qlora
# ---------------------------------------------------------------------------------------------------------------


@METHODS.register("qlora")
class Qlora(Lora):
    """LoRA on a base whose frozen linear layers are stored in 4 bits and dequantized one at a time for each
    product. Embeddings, norms and the output head keep their storage dtype."""

    config_cls = QloraConfig

    def compute_dtype(self) -> torch.dtype:
        choice = self.options.compute_dtype
        if choice == "auto":
            from slimtune.hardware import native_bf16, pick_device

            return torch.bfloat16 if native_bf16(pick_device(self.cfg.runtime.device)) else torch.float32
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]

    def load_options(self) -> dict[str, Any]:
        if not family_of(self.cfg).loads_pretrained:
            raise SlimtuneError(f"method=qlora quantizes a Hugging Face model while loading it; model={self.cfg.model} "
                                "is built from scratch (use method=lora for it)")
        o = self.options
        if o.backend == "torchao":
            require_torchao("qlora.backend=torchao")
            return {}  # loaded as stored, then quantized layer by layer (`prepare`)
        require_bitsandbytes("method=qlora")
        from transformers import BitsAndBytesConfig

        compute = self.compute_dtype()
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=o.quant_type, bnb_4bit_use_double_quant=o.double_quant,
            bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=["lm_head", *CLASSIFIER_HEADS])}

    def prepare(self, model: nn.Module) -> nn.Module:
        # No prepare_model_for_kbit_training: it casts every frozen non-quantized tensor (embeddings, norms) to
        # fp32, which costs memory and changes nothing that trains.
        own_memory(self._quantize(model))
        model = super().prepare(model)
        if self.options.init == "loftq":
            self.loftq_adapters(model)
        return model

    @torch.no_grad()
    def loftq_adapters(self, model: nn.Module) -> int:
        """Set every adapter on a 4-bit linear to the rank-r approximation of its rounding error (the original
        weight, read from the model folder, minus the dequantized 4-bit one); returns how many were set. On a
        resumed run the checkpoint's adapters replace these."""
        from peft.tuners.lora import LoraLayer

        from slimtune.models.hf import resolve_model
        from slimtune.quant.loftq import SourceWeights, low_rank_factors

        count = 0
        prefixes = tuple(p for p in (getattr(model, "base_model_prefix", ""),) if p)
        with SourceWeights(resolve_model(self.cfg.model)) as source:
            for name, module in model.named_modules():
                base = module.get_base_layer() if isinstance(module, LoraLayer) else None
                if base is None or not is_quantized(base.weight):
                    continue
                residual = source.find(name, prefixes).float() - dequantized_weight(base)
                for adapter in module.lora_A:
                    b, a = low_rank_factors(residual, module.r[adapter], module.scaling[adapter])
                    module.lora_B[adapter].weight.copy_(b)
                    module.lora_A[adapter].weight.copy_(a)
                    count += 1
        if not count:
            raise SlimtuneError("qlora.init=loftq found no adapter on a 4-bit layer (qlora.target_modules names only "
                                "layers that stay unquantized): use qlora.init=default")
        return count

    def _quantize(self, model: nn.Module) -> nn.Module:
        """The torchao backend quantizes after loading; bitsandbytes already did while loading, and its layers get
        slimtune's CPU product (`slimtune.quant.bnb4`: the same values, no weight-sized allocation per product)."""
        if self.options.backend == "torchao":
            return nf4_linears(model, self.compute_dtype())
        from slimtune.quant.bnb4 import use_workspace_4bit

        use_workspace_4bit(model)
        return model

    def load_base(self, source: Path, trust_remote_code: bool = False):
        model, tokenizer = super().load_base(source, trust_remote_code)
        return self._quantize(model), tokenizer

    def describe(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
        o = self.options
        quantized = sum(quantized_bytes(m.weight) for m in model.modules()
                        if isinstance(m, nn.Linear) and is_quantized(m.weight))
        from slimtune.memory import format_bytes

        return (f"{super().describe(model, optimizer)}; base linears in {o.backend} {o.quant_type}"
                f"{' + double quant' if o.double_quant else ''} ({format_bytes(quantized)}), compute "
                f"{str(self.compute_dtype()).replace('torch.', '')}")

    def estimate_memory(self, spec, run):
        from slimtune.plan.estimate import activation_bytes, qlora_state

        adapters = self.planner_adapters()
        compute = "bf16" if self.options.compute_dtype == "bf16" else run.weight_dtype
        with _planner_errors(self.name):
            return (qlora_state(spec, adapters, double_quant=self.options.double_quant, compute_dtype=compute)
                    + activation_bytes(spec, run.batch, run.seq,
                                       **run.activation_options(lora=adapters, quantized_base=True)))
