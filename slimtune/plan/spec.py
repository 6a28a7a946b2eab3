"""The shape of a decoder-only transformer, as far as memory is concerned.

A `ModelSpec` holds what the planner needs to count bytes without building the model: vocabulary, widths, layer
count, heads, the MLP and norm kinds, and which linear layers each block has (`ModelSpec.linears`, with their
(in, out) shapes). Parameter counts are computed from those shapes, so a spec can be checked against a published
total.

Three ways to get one:

- `ModelSpec.from_hf_config(path_or_dict)`: a Hugging Face ``config.json`` (Llama, Mistral, Qwen2, GPT-2).
- `ModelSpec.from_gpt(...)`: slimtune's own GPT (`slimtune.models.gpt`): GELU MLP 4x wide, LayerNorm, learned
  position embeddings, output head tied to the token embedding.
- `ModelSpec.preset(name)`: published shapes of well-known checkpoints (see `PRESETS`).

Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.errors import SlimtuneError

MLP_KINDS = ("swiglu", "gelu")
NORM_KINDS = ("rmsnorm", "layernorm")

# What a linear layer reads, named after the activation it consumes (the planner decides from this which
# activations a trainable or adapted linear keeps for its backward pass):
#   attn_in  - the attention norm's output        (q, k, v projections / fused c_attn)
#   attn_out - the attention output, heads merged (o_proj / attn.c_proj)
#   mlp_in   - the MLP norm's output              (gate, up / c_fc)
#   mlp_act  - the MLP's activated hidden state   (down / mlp.c_proj)
#   final    - the final norm's output            (lm_head)
LINEAR_INPUTS = ("attn_in", "attn_out", "mlp_in", "mlp_act", "final")


@dataclass(frozen=True)
class Linear:
    """One linear layer of a transformer block (or the output head)."""

    name: str
    """Name inside a block, as in the model's parameter names: ``self_attn.q_proj``, ``mlp.c_fc``, ``lm_head``."""
    in_features: int
    out_features: int
    bias: bool
    reads: str
    """Which activation feeds it; one of `LINEAR_INPUTS`."""

    @property
    def params(self) -> int:
        """Weight plus bias elements."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only transformer, enough to count its parameters and activations."""

    name: str
    """Display name (preset name, ``model_type`` of a config, or ``gpt``)."""
    vocab: int
    """Number of token ids (rows of the embedding, columns of the output head)."""
    hidden: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Query heads per block."""
    n_kv_heads: int
    """Key/value heads per block (grouped-query attention when smaller than `n_heads`)."""
    intermediate: int
    """Width of the MLP's hidden layer."""
    mlp: str = "swiglu"
    """``swiglu``: gate, up and down projections, silu(gate) * up. ``gelu``: fc and proj with a GELU between."""
    tied_embeddings: bool = False
    """The output head reuses the token embedding matrix (no separate ``lm_head`` parameters)."""
    norm: str = "rmsnorm"
    """``rmsnorm`` (weight only, computed in fp32 as Hugging Face does) or ``layernorm``."""
    head_dim: int = 0
    """Width of one attention head; 0 means ``hidden // n_heads``."""
    fused_qkv: bool = False
    """One ``c_attn`` matrix makes q, k and v (GPT-2, slimtune's GPT) instead of three projections."""
    qkv_bias: bool = False
    """Bias on the q, k, v projections (Qwen2; everything in GPT-2)."""
    o_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Bias on the MLP projections."""
    norm_bias: bool = False
    """LayerNorm has a bias as well as a weight."""
    max_positions: int = 0
    """Rows of a learned position embedding (GPT-2: ``n_positions``); 0 for rotary embeddings, which have none."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities during training."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches and the embedding output during training (GPT-2 ``resid_pdrop``)."""
    linears: tuple[Linear, ...] = field(init=False, repr=False, compare=False)
    """The linear layers of one block, in forward order (filled in from the fields above)."""

    def __post_init__(self):
        for key in ("vocab", "hidden", "n_layers", "n_heads", "n_kv_heads", "intermediate"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SlimtuneError(f"model spec {self.name!r}: {key} must be a positive integer, got {value!r}")
        if self.mlp not in MLP_KINDS:
            raise SlimtuneError(f"model spec {self.name!r}: mlp={self.mlp!r} is not one of {', '.join(MLP_KINDS)}")
        if self.norm not in NORM_KINDS:
            raise SlimtuneError(f"model spec {self.name!r}: norm={self.norm!r} is not one of {', '.join(NORM_KINDS)}")
        if self.n_heads % self.n_kv_heads:
            raise SlimtuneError(
                f"model spec {self.name!r}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if not self.head_dim:
            if self.hidden % self.n_heads:
                raise SlimtuneError(
                    f"model spec {self.name!r}: hidden={self.hidden} is not divisible by n_heads={self.n_heads}; "
                    "give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)
        for key in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise SlimtuneError(f"model spec {self.name!r}: {key} must be in [0, 1), got {getattr(self, key)}")
        object.__setattr__(self, "linears", self._block_linears())

    # ------------------------------------------------------------------------------------------------------------
    # Shapes
    # ------------------------------------------------------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        """Width of all query heads together: n_heads * head_dim."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of all key (or value) heads together: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    def _block_linears(self) -> tuple[Linear, ...]:
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        if self.fused_qkv:
            attn = [Linear("attn.c_attn", h, q + 2 * kv, self.qkv_bias, "attn_in"),
                    Linear("attn.c_proj", q, h, self.o_bias, "attn_out")]
        else:
            attn = [Linear("self_attn.q_proj", h, q, self.qkv_bias, "attn_in"),
                    Linear("self_attn.k_proj", h, kv, self.qkv_bias, "attn_in"),
                    Linear("self_attn.v_proj", h, kv, self.qkv_bias, "attn_in"),
                    Linear("self_attn.o_proj", q, h, self.o_bias, "attn_out")]
        if self.mlp == "swiglu":
            mlp = [Linear("mlp.gate_proj", h, i, self.mlp_bias, "mlp_in"),
                   Linear("mlp.up_proj", h, i, self.mlp_bias, "mlp_in"),
                   Linear("mlp.down_proj", i, h, self.mlp_bias, "mlp_act")]
        else:
            mlp = [Linear("mlp.c_fc", h, i, self.mlp_bias, "mlp_in"),
                   Linear("mlp.c_proj", i, h, self.mlp_bias, "mlp_act")]
        return tuple(attn + mlp)

    @property
    def head(self) -> Linear:
        """The output projection to the vocabulary (its parameters are the embedding's when tied)."""
        return Linear("lm_head", self.hidden, self.vocab, False, "final")

    # ------------------------------------------------------------------------------------------------------------
    # Parameter counts (elements, not bytes)
    # ------------------------------------------------------------------------------------------------------------

    @property
    def norm_params(self) -> int:
        """Parameters of one norm: a weight, plus a bias for LayerNorm with bias."""
        return self.hidden * (2 if self.norm == "layernorm" and self.norm_bias else 1)

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer block: its linears and its two norms."""
        return sum(lin.params for lin in self.linears) + 2 * self.norm_params

    @property
    def attention_params(self) -> int:
        """Parameters of a block's attention half: q/k/v/o (or c_attn/c_proj) and the norm before it."""
        return sum(lin.params for lin in self.linears if lin.reads.startswith("attn")) + self.norm_params

    @property
    def mlp_params(self) -> int:
        """Parameters of a block's MLP half: its projections and the norm before it."""
        return sum(lin.params for lin in self.linears if lin.reads.startswith("mlp")) + self.norm_params

    @property
    def embedding_params(self) -> int:
        """Token embedding plus learned position embedding (if any)."""
        return (self.vocab + self.max_positions) * self.hidden

    @property
    def head_params(self) -> int:
        """Output head parameters that are not shared with the embedding (0 when tied)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def n_params(self) -> int:
        """All parameters, tied matrices counted once (what ``sum(p.numel() for p in model.parameters())`` gives)."""
        return (self.embedding_params + self.n_layers * self.layer_params + self.norm_params + self.head_params)

    @property
    def largest_unit_params(self) -> int:
        """Parameters of the largest piece a sharded strategy gathers at once: a block, the embedding or the head."""
        return max(self.layer_params, self.embedding_params, self.head_params)

    def describe(self) -> str:
        """One line: name, parameter count and shape."""
        return (f"{self.name}: {self.n_params / 1e9:.3f}B parameters, {self.n_layers} layers, hidden {self.hidden}, "
                f"{self.n_heads} heads ({self.n_kv_heads} kv), {self.mlp} {self.intermediate}, vocab {self.vocab}")

    # ------------------------------------------------------------------------------------------------------------
    # Constructors
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_gpt(cls, n_layer: int = 12, n_head: int = 12, n_embd: int = 768, block_size: int = 1024,
                 vocab_size: int = 50304, bias: bool = True, dropout: float = 0.0) -> ModelSpec:
        """slimtune's GPT (`slimtune.models.gpt.GPT`) with these `GPTConfig` values.

        GELU MLP 4 * n_embd wide, fused c_attn, pre-LayerNorm (with bias when ``bias``), learned position embedding
        of ``block_size`` rows, output head tied to the token embedding. ``dropout`` applies to attention
        probabilities, residual branches and the embedding output, as in the model.
        """
        return cls(name="gpt", vocab=vocab_size, hidden=n_embd, n_layers=n_layer, n_heads=n_head, n_kv_heads=n_head,
                   intermediate=4 * n_embd, mlp="gelu", tied_embeddings=True, norm="layernorm", fused_qkv=True,
                   qkv_bias=bias, o_bias=bias, mlp_bias=bias, norm_bias=bias, max_positions=block_size,
                   attention_dropout=dropout, hidden_dropout=dropout)

    @classmethod
    def from_hf_config(cls, config: dict | str | Path) -> ModelSpec:
        """Read a Hugging Face ``config.json`` (a dict, a file path, or a model folder containing one).

        Supported ``model_type`` values: see `HF_ARCHITECTURES` (Llama-like: llama, mistral, qwen2; and gpt2). A
        config without ``model_type`` is read as GPT-2 when it has ``n_embd``, else as Llama-like.
        """
        source, cfg = _load_config(config)
        model_type = cfg.get("model_type")
        if model_type is None:
            model_type = "gpt2" if "n_embd" in cfg else "llama"
            arch_label = f"{'GPT-2' if model_type == 'gpt2' else 'Llama'}-like (no model_type)"
        else:
            arch_label = f"model_type {model_type!r}"
        reader = HF_ARCHITECTURES.get(model_type)
        if reader is None:
            raise SlimtuneError(
                f"{source}: {arch_label} is not supported by the memory planner; supported model types: "
                f"{', '.join(sorted(HF_ARCHITECTURES))}. Describe the model with ModelSpec(...) instead."
            )
        missing = [key for key in reader.required if cfg.get(key) is None]
        if missing:
            raise SlimtuneError(f"{source}: {arch_label} config is missing {', '.join(missing)}")
        return reader.build(cfg)

    @classmethod
    def preset(cls, name: str) -> ModelSpec:
        """Published shapes of a well-known checkpoint; `PRESETS` lists the names."""
        key = name.strip().lower()
        if key not in PRESETS:
            raise SlimtuneError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(name=key, **PRESETS[key])


def _load_config(config: dict | str | Path) -> tuple[str, dict]:
    """(description of the source for messages, the config as a dict)."""
    if isinstance(config, dict):
        return "config", config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SlimtuneError(f"no model config at {path}: give a config.json or a model folder that contains one")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SlimtuneError(f"cannot read {path} as JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise SlimtuneError(f"{path} does not hold a JSON object")
    return str(path), cfg


@dataclass(frozen=True)
class _HFReader:
    required: tuple[str, ...]
    build: Callable[[dict], ModelSpec]


def _llama_like(cfg: dict) -> ModelSpec:
    """Llama, Mistral, Qwen2: gated MLP, RMSNorm, rotary positions, optional grouped-query attention."""
    model_type = cfg.get("model_type", "llama")
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        name=model_type,
        vocab=cfg["vocab_size"],
        hidden=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        intermediate=cfg["intermediate_size"],
        mlp="swiglu",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm="rmsnorm",
        head_dim=cfg.get("head_dim") or 0,
        # Qwen2 always has q/k/v biases (and no o_proj bias); Llama's attention_bias covers q, k, v and o.
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        attention_dropout=float(cfg.get("attention_dropout") or 0.0),
    )


def _gpt2(cfg: dict) -> ModelSpec:
    """GPT-2: fused c_attn, GELU MLP (n_inner or 4x), LayerNorm with bias, learned positions, tied head."""
    hidden = cfg["n_embd"]
    return ModelSpec(
        name="gpt2",
        vocab=cfg["vocab_size"],
        hidden=hidden,
        n_layers=cfg["n_layer"],
        n_heads=cfg["n_head"],
        n_kv_heads=cfg["n_head"],
        intermediate=cfg.get("n_inner") or 4 * hidden,
        mlp="gelu",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        norm="layernorm",
        fused_qkv=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        norm_bias=True,
        max_positions=cfg.get("n_positions") or cfg.get("n_ctx") or 1024,
        attention_dropout=float(cfg.get("attn_pdrop") or 0.0),
        hidden_dropout=float(cfg.get("resid_pdrop") or 0.0),
    )


_LLAMA_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

HF_ARCHITECTURES: dict[str, _HFReader] = {
    "llama": _HFReader(_LLAMA_FIELDS, _llama_like),
    "mistral": _HFReader(_LLAMA_FIELDS, _llama_like),
    "qwen2": _HFReader(_LLAMA_FIELDS, _llama_like),
    "gpt2": _HFReader(("vocab_size", "n_embd", "n_layer", "n_head"), _gpt2),
}
"""``model_type`` → which fields a config must have and how to read it."""

# Shapes from each model's published config.json. Published totals, which tests/plan/test_spec.py checks:
# llama-2-7b 6.74B, llama-2-13b 13.0B, llama-3-8b 8.03B, llama-3-70b 70.6B, mistral-7b 7.24B, qwen2.5-7b 7.61B,
# smollm2-135m 134.5M.
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(vocab=32000, hidden=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate=11008),
    "llama-2-13b": dict(vocab=32000, hidden=5120, n_layers=40, n_heads=40, n_kv_heads=40, intermediate=13824),
    "llama-3-8b": dict(vocab=128256, hidden=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate=14336),
    "llama-3-70b": dict(vocab=128256, hidden=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate=28672),
    "mistral-7b": dict(vocab=32000, hidden=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate=14336),
    "qwen2.5-7b": dict(vocab=152064, hidden=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate=18944,
                       qkv_bias=True),
    "smollm2-135m": dict(vocab=49152, hidden=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate=1536,
                         tied_embeddings=True),
}
"""Preset name → `ModelSpec` fields (all Llama-like: SwiGLU, RMSNorm, rotary positions)."""
