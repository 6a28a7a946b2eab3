"""Quantization-aware training (method=qat): every linear layer computes with fake-quantized int8 weights (and,
with ``qat.activations``, fake-quantized int8 inputs), trained through a straight-through estimator, so that the
model learns weights that survive `slimtune quantize` to real integer weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.methods.base import Method, refuse_eight_bit_adam
from slimtune.registry import METHODS


@dataclass
class QatConfig:
    """Fake-quantized linear layers with a straight-through estimator (method=qat)."""

    scheme: str = "sym"
    """Integer grid of weights (and inputs): sym (scale = max|x| / 127, zero point 0) or asym (scale =
    (max - min) / 255, with a zero point)."""
    granularity: str = "channel"
    """One weight scale per output channel (channel) or per weight matrix (tensor)."""
    bits: int = 8
    """Bits per weight code (2..8; 8 is what `slimtune quantize` stores)."""
    activations: bool = False
    """Also fake-quantize every linear layer's input to 8 bits, per token with its own range (dynamic)."""
    skip: list = field(default_factory=lambda: ["lm_head"])
    """Linear layers kept in floating point: names, or last name parts (an output head tied to the embedding is
    always kept)."""

    def __post_init__(self):
        from slimtune.quant.arith import code_range
        from slimtune.quant.layers import granularity_name, scheme_name

        code_range(scheme_name(self.scheme, "qat.scheme"), self.bits)
        granularity_name(self.granularity, "qat.granularity")


def fake_quant_model(model: nn.Module, options: QatConfig) -> list[str]:
    """Swap every linear layer of ``model`` (but ``options.skip``) for a `FakeQuantLinear`; the names swapped."""
    from slimtune.quant.layers import FakeQuantLinear, replace_linears

    def build(name, linear):
        return FakeQuantLinear.from_linear(linear, name=name, scheme=options.scheme, granularity=options.granularity,
                                           bits=options.bits, activations=options.activations)

    swapped = replace_linears(model, build, options.skip)
    if not swapped:
        raise SlimtuneError(f"method=qat found no linear layer to quantize in {type(model).__name__} (skipped: "
                            f"{', '.join(options.skip) or 'none'}); QAT needs nn.Linear layers")
    return swapped


@METHODS.register("qat")
class Qat(Method):
    """AdamW on every parameter; linear layers see their weights as int8 codes times a scale."""

    config_cls = QatConfig

    def prepare(self, model: nn.Module) -> nn.Module:
        self._swapped = fake_quant_model(model, self.options)
        return model

    def load_for_inference(self, source: Path, trust_remote_code: bool = False):
        model, tokenizer = super().load_for_inference(source, trust_remote_code)
        fake_quant_model(model, self.options)
        return model, tokenizer

    def export_checkpoint(self, source: Path, out_dir: Path, *, overwrite: bool = False, **options) -> Path:
        """A plain transformers folder whose linear weights are the fake-quantized values the model trained with
        (stored in floating point, so transformers' logits equal slimtune's for weight-only QAT). For integer
        storage run `slimtune quantize` on the checkpoint with the same scheme and granularity."""
        from slimtune.models.hf import export_model
        from slimtune.quant.layers import FakeQuantLinear

        if options:
            raise SlimtuneError(f"method=qat has no export option {', '.join(options)}")
        model, tokenizer = self.load_for_inference(source)
        for name, module in list(model.named_modules()):
            if isinstance(module, FakeQuantLinear):
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device="meta", dtype=module.weight.dtype)
                plain.weight = nn.Parameter(module.quantized_weight().detach())
                plain.bias = module.bias
                model.set_submodule(name, plain)
        return export_model(model, tokenizer, out_dir, merge_in_place=True, overwrite=overwrite)

    def describe(self, model, optimizer) -> str:
        o = self.options
        return (f"method qat: {len(self._swapped)} linear layers fake-quantized ({o.scheme} {o.granularity} "
                f"int{o.bits} weights{', per-token int8 inputs' if o.activations else ''}), all parameters train")

    def estimate_memory(self, spec, run):
        # Full AdamW on the floating-point weights, plus the quantized copy of every block weight that each matmul
        # keeps for backward (`slimtune.plan.methods.qat_state`); every layer keeps its activations.
        from slimtune.plan.estimate import activation_bytes, qat_state

        refuse_eight_bit_adam(run, "qat")
        return (qat_state(spec, run.weight_dtype, master_weights=run.master_weights, checkpointing=run.checkpointing)
                + activation_bytes(spec, run.batch, run.seq, **run.activation_options()))
