"""Build the model a run trains, from the config, what the data says (vocabulary, labels), and the method's
loading options (storage dtype, quantize while loading). Kept apart from the data so that a method decides how the
model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BuiltModel:
    model: nn.Module
    config: dict
    """A JSON-able description of the architecture, compared on resume."""
    description: str


def build_model(cfg, spec: dict, load_options: dict) -> BuiltModel:
    """`spec`: the workload's `model_spec()`; `load_options`: the method's `load_options()` (keys: dtype,
    quantization_config). The run's model family (`slimtune.families`) builds it."""
    from slimtune.families import family_of

    return family_of(cfg).build_model(spec, load_options)


def build_gpt(cfg, spec: dict) -> BuiltModel:
    """slimtune's GPT from the gpt.* keys and the data's vocabulary."""
    from slimtune.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=spec["vocab_size"], **asdict(cfg.gpt)))
    g = cfg.gpt
    return BuiltModel(model, asdict(model.config),
                      f"GPT {g.n_layer}x{g.n_embd}, {model.num_params() / 1e6:.2f}M parameters")


def build_hf(cfg, spec: dict, load_options: dict) -> BuiltModel:
    """A Hugging Face causal LM, or a sequence classifier where the data has labels (`spec["label_names"]`)."""
    from slimtune.models.hf import enable_checkpointing, load_causal_lm, load_sequence_classifier

    dtype = load_options.get("dtype", DTYPES[cfg.hf.weights_dtype])
    quantize = load_options.get("quantization_config")  # e.g. QLoRA's 4-bit base, quantized while loading
    if "label_names" in spec:
        names = spec["label_names"]
        model, _ = load_sequence_classifier(cfg.model, num_labels=len(names), label_names=names, dtype=dtype,
                                            trust_remote_code=cfg.hf.trust_remote_code, quantization_config=quantize)
        kind, extra = "hf-classifier", {"labels": names}
    else:
        model, _ = load_causal_lm(cfg.model, dtype=dtype, trust_remote_code=cfg.hf.trust_remote_code,
                                  quantization_config=quantize)
        kind, extra = "hf-causal-lm", {}
    if cfg.hf.gradient_checkpointing:
        enable_checkpointing(model)
    c = model.config
    arch = {k: getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                             "num_attention_heads", "vocab_size")}
    n = sum(p.numel() for p in model.parameters())
    return BuiltModel(model, {"kind": kind, "source": cfg.model, **extra, **arch},
                      f"{type(model).__name__} from {cfg.model}, {n / 1e6:.1f}M parameters")
