"""Bytes of weights, gradients and optimizer state for each training method, and of quantized weights.

Bytes per parameter, as in docs/DESIGN.md ("Memory accounting"), with P parameters and w bytes per stored weight
(2 for bf16/fp16, 4 for fp32):

- full Adam: fp32 16 (4 weight + 4 gradient + 8 moments); bf16 weights with an fp32 master copy 18
  (2 + 4 master + 4 gradient + 8 moments); 8-bit moments take 2 bytes instead of 8.
- BAdam: w bytes for every weight plus 16 (bf16: 4 master + 4 gradient + 8 moments) or 12 (fp32: no master) per
  parameter of the active block: 2M + 16M/D and 4M + 12M/D with D equal blocks.
- LoRA / QLoRA: the frozen base at its storage size (2 bytes, or ~0.52 for NF4 with double quantization), plus
  16 bytes per adapter parameter (fp32 weight, gradient and two moments).
- QAT / BitNet: full Adam plus the fake-quantized weight copies the forward keeps for backward.

Every function returns a `Plan` with ``weights``, ``gradients``, ``optimizer`` (and ``temporary`` where a method has
one); add `activation_bytes` and a baseline to get a step's peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from slimtune.errors import SlimtuneError
from slimtune.plan.activations import LoraAdapters
from slimtune.plan.parts import Plan, dtype_bytes, format_bytes
from slimtune.plan.spec import Linear, ModelSpec

# ----------------------------------------------------------------------------------------------------------------
# Weights, plain and quantized
# ----------------------------------------------------------------------------------------------------------------


def _nf4(rows: int, cols: int) -> int:
    """NF4 (QLoRA): 4 bits per weight + one fp32 absmax per block of 64 weights: 0.5 + 4/64 = 0.5625 bytes."""
    n = rows * cols
    return math.ceil(n / 2) + 4 * math.ceil(n / 64)


def _nf4_double_quant(rows: int, cols: int) -> int:
    """NF4 with double quantization (QLoRA): the 64-block absmax values are themselves quantized to 8 bits, with one
    fp32 scale per 256 of them and one fp32 offset per tensor: 0.5 + 1/64 + 4/(64 * 256) = 0.5159 bytes (4.127 bits,
    as in the QLoRA paper)."""
    n = rows * cols
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


def _int8(rows: int, cols: int) -> int:
    """int8 weights with one fp32 scale per output row (LLM.int8-style absmax): 1 byte + 4/cols."""
    return rows * cols + 4 * rows


def _ternary(rows: int, cols: int) -> int:
    """Ternary {-1, 0, 1} weights packed 4 per byte (2 bits) with one fp32 absmean scale per tensor (BitNet b1.58)."""
    return math.ceil(rows * cols / 4) + 4


QUANT_FORMATS: dict[str, Callable[[int, int], int]] = {
    "nf4": _nf4,
    "nf4-dq": _nf4_double_quant,
    "int8": _int8,
    "ternary": _ternary,
}
"""Quantized weight format → bytes of one (rows=out_features, cols=in_features) weight matrix."""


def _quant_format(quantized: str | None) -> Callable[[int, int], int] | None:
    if quantized is None:
        return None
    if quantized not in QUANT_FORMATS:
        raise SlimtuneError(f"unknown quantized format {quantized!r}; use one of {', '.join(QUANT_FORMATS)}")
    return QUANT_FORMATS[quantized]


def linear_weight_bytes(lin: Linear, storage_dtype: str = "bf16", quantized: str | None = None) -> int:
    """Bytes of one linear layer: its weight (quantized or at ``storage_dtype``) and its bias (at ``storage_dtype``)."""
    w = dtype_bytes(storage_dtype)
    fmt = _quant_format(quantized)
    weight = fmt(lin.out_features, lin.in_features) if fmt else w * lin.in_features * lin.out_features
    return weight + (w * lin.out_features if lin.bias else 0)


def weights_bytes(spec: ModelSpec, storage_dtype: str = "bf16", quantized: str | None = None, *,
                  quantize_head: bool = False) -> int:
    """Bytes of all parameters as stored on the device.

    Block linears at ``storage_dtype`` or in the ``quantized`` format (`QUANT_FORMATS`); embeddings, norms and
    biases always at ``storage_dtype``; an untied output head quantized only with ``quantize_head`` (litgpt's
    bitsandbytes plugin quantizes it, Hugging Face's loader keeps it). With ``quantized=None`` this is
    ``n_params * bytes(storage_dtype)``.
    """
    w = dtype_bytes(storage_dtype)
    per_layer = sum(linear_weight_bytes(lin, storage_dtype, quantized) for lin in spec.linears)
    per_layer += 2 * spec.norm_params * w
    head = 0
    if not spec.tied_embeddings:
        head = linear_weight_bytes(spec.head, storage_dtype, quantized if quantize_head else None)
    return spec.n_layers * per_layer + (spec.embedding_params + spec.norm_params) * w + head


# ----------------------------------------------------------------------------------------------------------------
# Method states: weights + gradients + optimizer
# ----------------------------------------------------------------------------------------------------------------

_EIGHT_BIT_MOMENTS = 2 * (1 + 4 / 2048)  # two 1-byte moments, fp32 absmax per 2048-block (bitsandbytes)


def adam_bytes_per_param(weight_dtype: str = "bf16", *, master_weights: bool = True,
                         eight_bit: bool = False) -> tuple[float, float, float]:
    """(weight, gradient, optimizer) bytes per trained parameter under Adam/AdamW.

    fp32 weights: 4, 4, 8 (two fp32 moments) = 16. 16-bit weights with ``master_weights``: 2, 4 (fp32 gradient),
    12 (fp32 master copy + moments) = 18. 16-bit without master weights (pure bf16 training, moments in bf16):
    2, 2, 4 = 8. ``eight_bit``: the moments take 2 bytes (1 each, bitsandbytes 8-bit Adam) instead of 8.
    """
    w = dtype_bytes(weight_dtype)
    low_precision = w < 4
    if low_precision and not master_weights:
        return w, w, _EIGHT_BIT_MOMENTS if eight_bit else 2 * w
    moments = _EIGHT_BIT_MOMENTS if eight_bit else 8
    return w, 4, moments + (4 if low_precision else 0)


def full_adam(spec: ModelSpec, weight_dtype: str = "bf16", *, master_weights: bool = True,
              eight_bit: bool = False) -> Plan:
    """Full fine-tuning (or pre-training) with Adam: every parameter at `adam_bytes_per_param` bytes.

    bf16 with master weights: 18·P bytes (the BAdam paper's "Adam needs 18M GB" for M billion parameters); fp32:
    16·P; 8-bit Adam with bf16 master weights: 12·P.
    """
    w, g, o = adam_bytes_per_param(weight_dtype, master_weights=master_weights, eight_bit=eight_bit)
    p = spec.n_params
    kind = "8-bit Adam" if eight_bit else "Adam"
    return Plan(parts={"weights": round(w * p), "gradients": round(g * p), "optimizer": round(o * p)},
                notes=[f"full fine-tuning, {kind}, {weight_dtype} weights"
                       f"{' + fp32 master' if w < 4 and master_weights else ''}: {w + g + o:g} bytes x "
                       f"{p / 1e9:.3f}B parameters"],
                trainable_params=p)


BADAM_GRANULARITIES = ("layer", "attn_mlp", "matrix")


def _badam_blocks(spec: ModelSpec, granularity: str, include_embedding: bool, include_head: bool) -> list[int]:
    """Parameter count of every BAdam block (as `slimtune.methods.blocks` partitions a model)."""
    if granularity == "layer":
        blocks = [spec.layer_params] * spec.n_layers
    elif granularity == "attn_mlp":
        blocks = [spec.attention_params, spec.mlp_params] * spec.n_layers
    elif granularity == "matrix":
        # A norm joins the first matrix of the part it feeds.
        first_of_part = {next(lin.name for lin in spec.linears if lin.reads == src) for src in ("attn_in", "mlp_in")}
        per_layer = [lin.params + (spec.norm_params if lin.name in first_of_part else 0) for lin in spec.linears]
        blocks = per_layer * spec.n_layers
    else:
        raise SlimtuneError(f"badam granularity {granularity!r} is not one of {', '.join(BADAM_GRANULARITIES)}")
    if include_embedding:
        blocks.append(spec.embedding_params)
    if include_head:
        blocks.append(spec.head_params + spec.norm_params)
    return blocks


def badam_state(spec: ModelSpec, weight_dtype: str = "bf16", *, granularity: str = "layer",
                include_embedding: bool = False, include_head: bool = False, n_blocks: int | None = None) -> Plan:
    """BAdam (block-coordinate Adam): all weights at ``weight_dtype``, Adam state for the active block only.

    Derivation (docs/DESIGN.md): every parameter is stored once at w bytes (w·M). Only the active block's A parameters
    have a gradient and Adam state, kept in fp32 for accurate updates: a 4-byte gradient and two 4-byte moments,
    plus a 4-byte fp32 master copy when the stored weights are 16-bit (an fp32 weight is its own master). So
    bf16: 2M + 16A, fp32: 4M + 12A bytes. With D equal blocks A = M/D, giving the paper's 2M + 16M/D (and
    4M + 12M/D). Here A is the largest real block of the partition (``granularity``: one block per layer, per
    attention/MLP half, or per matrix; embedding and head are blocks only when included, as in BAdam's defaults);
    ``n_blocks`` instead uses the idealised A = M/D of the paper.
    """
    w = dtype_bytes(weight_dtype)
    m = spec.n_params
    blocks = _badam_blocks(spec, granularity, include_embedding, include_head)
    if n_blocks is not None:
        if not isinstance(n_blocks, int) or n_blocks < 1:
            raise SlimtuneError(f"n_blocks must be a positive integer, got {n_blocks!r}")
        active, d = math.ceil(m / n_blocks), n_blocks
    else:
        active, d = max(blocks), len(blocks)
    master = 4 if w < 4 else 0
    return Plan(parts={"weights": w * m, "gradients": 4 * active, "optimizer": (8 + master) * active},
                notes=[f"BAdam, {weight_dtype} weights: {w}M + {12 + master}A with D={d} blocks, active block "
                       f"A={active / 1e6:.1f}M parameters"],
                trainable_params=active)


def lora_state(spec: ModelSpec, lora: LoraAdapters, *, storage_dtype: str = "bf16", quantized: str | None = None,
               quantize_head: bool = False) -> Plan:
    """LoRA: the frozen base at its storage size (`weights_bytes`), adapters at 16 bytes per parameter.

    Adapter parameters: r * (in + out) for every adapted linear in every layer (`LoraAdapters.params`); each has an
    fp32 weight (4, counted in ``weights``), an fp32 gradient (4) and two fp32 moments (8). Frozen weights have no
    gradient buffers. With a ``quantized`` base the forward and backward dequantize one weight at a time into
    ``storage_dtype``: the largest such weight is counted as ``temporary``.
    """
    adapter = lora.params(spec)
    temporary = 0
    if quantized is not None:
        w = dtype_bytes(storage_dtype)
        largest = max(lin.in_features * lin.out_features for lin in spec.linears)
        if quantize_head and not spec.tied_embeddings:
            largest = max(largest, spec.hidden * spec.vocab)
        temporary = w * largest
    base = weights_bytes(spec, storage_dtype, quantized, quantize_head=quantize_head)
    targets = ", ".join(lin.name.rpartition(".")[2] for lin in lora.adapted(spec)[0])
    return Plan(parts={"weights": base + 4 * adapter, "gradients": 4 * adapter, "optimizer": 8 * adapter,
                       "temporary": temporary},
                notes=[f"LoRA r={lora.rank} on {targets or 'no block linears'}"
                       f"{' + lm_head' if lora.adapted(spec)[1] else ''}: {adapter:,} adapter parameters x 16 bytes; "
                       f"frozen base {format_bytes(base)} ({quantized or storage_dtype})"],
                trainable_params=adapter)


def qlora_state(spec: ModelSpec, lora: LoraAdapters, *, double_quant: bool = True, compute_dtype: str = "bf16",
                quantize_head: bool = False) -> Plan:
    """QLoRA: `lora_state` with the base in NF4 (``nf4-dq`` with double quantization), computing in
    ``compute_dtype``."""
    return lora_state(spec, lora, storage_dtype=compute_dtype, quantized="nf4-dq" if double_quant else "nf4",
                      quantize_head=quantize_head)


def _fake_quant_copies(spec: ModelSpec, weight_dtype: str, checkpointing: bool) -> int:
    """Bytes of the fake-quantized weight copies that linears keep for backward (one block's with checkpointing)."""
    per_layer = dtype_bytes(weight_dtype) * sum(lin.in_features * lin.out_features for lin in spec.linears)
    return per_layer * (1 if checkpointing else spec.n_layers)


def qat_state(spec: ModelSpec, weight_dtype: str = "bf16", *, master_weights: bool = True,
              checkpointing: bool = False) -> Plan:
    """Quantization-aware training: `full_adam`, plus the fake-quantized copy of every block weight.

    Each linear computes with ``fake_quant(weight)``, a new tensor of the weight's size that the matmul keeps for
    its backward until the layer's backward runs: w bytes per block-linear parameter for every layer (one layer's
    worth with gradient checkpointing), counted as ``temporary``.
    """
    plan = full_adam(spec, weight_dtype, master_weights=master_weights)
    copies = _fake_quant_copies(spec, weight_dtype, checkpointing)
    return plan + Plan(parts={"temporary": copies},
                       notes=[f"QAT: fake-quantized weight copies kept for backward, {format_bytes(copies)}"])


def bitnet_state(spec: ModelSpec, weight_dtype: str = "bf16", *, master_weights: bool = True,
                 checkpointing: bool = False) -> Plan:
    """BitNet (b1.58) training: full Adam on latent floating-point weights, each forward using a ternary copy.

    Memory is that of `qat_state`: the ternary weights exist only as fake-quantized copies in ``weight_dtype``
    during training. The exported model is ``weights_bytes(spec, quantized="ternary")``.
    """
    plan = full_adam(spec, weight_dtype, master_weights=master_weights)
    copies = _fake_quant_copies(spec, weight_dtype, checkpointing)
    return plan + Plan(parts={"temporary": copies},
                       notes=[f"BitNet: latent {weight_dtype} weights; ternary copies kept for backward, "
                              f"{format_bytes(copies)}"])
