"""Activation memory of one training step, counted tensor by tensor from the architecture.

The forward pass keeps, for backward, the tensors that autograd saves. `layer_saved_tensors` lists them for one
transformer block, given which of its weights train and whether a gradient has to flow through it;
`activation_items` adds the embedding, the final norm, the logits and the loss, and applies gradient
checkpointing; `activation_bytes` sums them into a `Plan`. All sizes are bytes; ``t = batch * seq`` tokens.

What one block keeps (a = bytes of the activation dtype, h = hidden, i = intermediate, q/kv = widths of all query /
key-value heads, nh = query heads):

- each norm: RMSNorm (computed in fp32, as Hugging Face does) keeps its input upcast to fp32 (4h) and the inverse
  RMS (4) when a gradient flows through it, plus the normalised input (a·h) when its weight trains; LayerNorm keeps
  its input (a·h) and mean and rstd (8).
- a norm's output (a·h) only when a linear that reads it keeps its input: its weight trains, or it is a quantized
  kernel that keeps its input regardless (bitsandbytes' 4-bit matmul), or a LoRA adapter reads it directly. A frozen
  ``nn.Linear`` keeps nothing but its weight.
- attention: q (a·q) and k, v (a·kv each) after the rotary embedding, the output (a·q) and the log-sum-exp
  (4·nh) with SDPA / flash attention, which never store the (seq x seq) scores; the output projection reads the
  saved output (same storage). ``attention="eager"`` stores the softmax instead (4·nh·seq in fp32, plus an a-byte
  copy), k and v repeated to all query heads (a·q each), the output again for a trainable output projection,
  and, with attention dropout, its mask and the dropped probabilities.
- MLP: SwiGLU keeps gate, silu(gate) and up (3·a·i) and, when down trains, their product (a·i); GELU keeps the
  fc output (a·i) and, when proj trains, the GELU output (a·i).
- dropout (``hidden_dropout`` > 0) after the attention and MLP branches: one mask each. CUDA's fused dropout keeps
  a bool mask (1 byte per element); elsewhere PyTorch keeps the scaled noise in the activation dtype (a bytes).
- LoRA adapters (`LoraAdapters`): per adapted linear, the input in the adapter dtype (a copy when dropout or a dtype
  cast makes one; the shared input otherwise), the dropout mask, and A's output (rank elements).

Residual additions keep nothing. Outside the blocks: the token ids (when the embedding trains), the rotary
cos/sin tables, the final norm like any norm, and the loss: the logits (a per element, the model's output) and
their log-softmax (4 bytes in fp32), or with a chunked loss only d loss / d hidden.

These lists reproduce, to within a few bytes, what autograd saves for Hugging Face Llama (SDPA and eager, full,
LoRA via peft, BAdam-style frozen blocks, checkpointing) and slimtune's GPT; tests/plan/test_calibration.py
measures them with ``torch.autograd.graph.saved_tensors_hooks``. Not modelled: CPU SDPA falling back to the
unfused kernel when attention dropout is on, and HF GPT-2's Python GELU (which keeps more).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields

from slimtune.errors import SlimtuneError
from slimtune.plan.parts import Plan, dtype_bytes, format_bytes
from slimtune.plan.spec import Linear, ModelSpec

ATTENTION_KINDS = ("flash", "eager")


@dataclass(frozen=True)
class SavedTensor:
    """One tensor kept for backward: what it is, its size in bytes, and its layer (None outside the blocks)."""

    name: str
    nbytes: int
    layer: int | None = None


@dataclass(frozen=True)
class LoraAdapters:
    """Which linears get a LoRA adapter, and how it runs."""

    rank: int
    """Rank r: an adapter on an (in, out) linear has r * (in + out) parameters."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Linears to adapt: names as in `ModelSpec.linears` (``self_attn.q_proj``) or their last part (``q_proj``,
    ``c_attn``), ``all-linear`` for every linear of a block, ``lm_head`` for the output head."""
    dropout: float = 0.0
    """Dropout on the adapter's input (a mask and a dropped copy of the input are kept per adapter)."""
    dtype: str = "fp32"
    """Dtype the adapter computes in: peft keeps adapters in fp32 (casting the input, which costs a copy) even on a
    bf16 model; litgpt's ``bf16-true`` keeps them in bf16."""

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SlimtuneError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.targets:
            raise SlimtuneError("LoRA needs at least one target linear (e.g. q_proj, v_proj or all-linear)")
        if not 0.0 <= self.dropout < 1.0:
            raise SlimtuneError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        dtype_bytes(self.dtype)

    def adapted(self, spec: ModelSpec) -> tuple[tuple[Linear, ...], bool]:
        """(the adapted linears of one block, whether the output head is adapted) for ``spec``."""
        chosen: set[str] = set()
        head = False
        for target in self.targets:
            if target in ("all-linear", "all"):
                chosen.update(lin.name for lin in spec.linears)
                continue
            if target == "lm_head":
                head = True
                continue
            hits = {lin.name for lin in spec.linears if target in (lin.name, lin.name.rpartition(".")[2])}
            if not hits:
                valid = sorted({lin.name.rpartition(".")[2] for lin in spec.linears})
                raise SlimtuneError(
                    f"LoRA target {target!r} is not a linear layer of {spec.name}; choose from "
                    f"{', '.join(valid)}, all-linear, lm_head"
                )
            chosen.update(hits)
        return tuple(lin for lin in spec.linears if lin.name in chosen), head

    def params(self, spec: ModelSpec) -> int:
        """Adapter parameters in the whole model: r * (in + out) per adapted linear, in every layer."""
        linears, head = self.adapted(spec)
        per_layer = sum(self.rank * (lin.in_features + lin.out_features) for lin in linears)
        return spec.n_layers * per_layer + (self.rank * (spec.hidden + spec.vocab) if head else 0)


@dataclass(frozen=True)
class ActivationOptions:
    """How a step runs, as far as activation memory is concerned (the keyword options of `activation_bytes`)."""

    act_dtype: str = "bf16"
    """Dtype of the activations: the autocast dtype, or the weights' dtype without autocast."""
    checkpointing: bool = False
    """Gradient checkpointing per block: keep only each block's input, recompute one block at a time in backward."""
    backward_from_layer: int = 0
    """Lowest layer that backward reaches (the lowest with a trainable parameter); layers below keep nothing. BAdam's
    active block decides it; LoRA trains every layer, so it is 0."""
    trainable_layers: tuple[int, ...] | None = None
    """Layers whose own weights train. None: every layer from `backward_from_layer` up (full fine-tuning); ``()``
    for LoRA/QLoRA (only adapters train); ``(k,)`` for BAdam with layer k active."""
    embedding_trainable: bool | None = None
    """The embedding trains (keeps the token ids). None: only in full fine-tuning from layer 0."""
    head_trainable: bool | None = None
    """The final norm and output head train (the head keeps its input). None: only in full fine-tuning."""
    lora: LoraAdapters | None = None
    """LoRA adapters on the (frozen) block linears."""
    quantized_base: bool = False
    """The frozen block linears are quantized kernels that keep their input for backward (bitsandbytes 4-bit)."""
    quantized_head: bool = False
    """The output head is such a quantized kernel too (litgpt quantizes ``lm_head``; HF's bitsandbytes loader skips
    it)."""
    attention: str = "flash"
    """``flash``: SDPA's fused kernels (flash / memory-efficient), no (seq x seq) scores kept. ``eager``: the scores'
    softmax is kept."""
    loss_chunk: int | None = None
    """None: the full (batch, seq, vocab) logits exist and the loss keeps their log-softmax. An int: a chunked
    linear + cross-entropy (`slimtune.train.loss.linear_cross_entropy`) that holds this many positions' logits at a
    time."""
    logits_fp32: bool = True
    """The loss upcasts the logits to fp32 first (Hugging Face models do); otherwise it works in `act_dtype`."""
    device: str = "cuda"
    """Device kind (``cuda``, ``cpu``, ``mps``): decides whether a dropout mask is 1 byte (CUDA) or a bytes."""
    weight_dtype: str | None = None
    """Storage dtype of the block weights. Where it is wider than `act_dtype` (fp32 weights under bf16 autocast),
    each linear's product casts its weight, and the matmul keeps that copy for its input's gradient: a·in·out bytes
    per linear of every layer backward runs through (one block's with checkpointing). None: as `act_dtype`."""

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise SlimtuneError(f"attention={self.attention!r} is not one of {', '.join(ATTENTION_KINDS)}")
        if self.loss_chunk is not None and (not isinstance(self.loss_chunk, int) or self.loss_chunk < 1):
            raise SlimtuneError(f"loss_chunk must be a positive number of positions or None, got {self.loss_chunk!r}")
        if self.trainable_layers is not None:
            object.__setattr__(self, "trainable_layers", tuple(self.trainable_layers))
        dtype_bytes(self.act_dtype)
        if self.weight_dtype is not None:
            dtype_bytes(self.weight_dtype)

    @property
    def full(self) -> bool:
        """Full fine-tuning: every layer from `backward_from_layer` up trains."""
        return self.trainable_layers is None


def activation_options(**options) -> ActivationOptions:
    """`ActivationOptions` from keyword options; an unknown key is an error naming the closest valid one."""
    valid = [f.name for f in fields(ActivationOptions)]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SlimtuneError(f"unknown activation option {key!r}; {hint}valid options: {', '.join(valid)}")
    return ActivationOptions(**options)


def _mask_bytes(device: str, elem_bytes: int) -> int:
    """Bytes per dropout-mask element: CUDA's fused dropout keeps bools, other devices keep the scaled noise."""
    return 1 if str(device).split(":")[0] == "cuda" else elem_bytes


def _adapter_tensors(lin: Linear, lora: LoraAdapters, tokens: int, act_bytes: int, grad_flows: bool, device: str,
                     layer: int | None) -> list[SavedTensor]:
    """What a LoRA adapter on ``lin`` keeps: its input in the adapter dtype when dropout or a dtype cast makes a
    copy (otherwise it shares the tensor the base linear reads, counted there), the dropout mask when a gradient
    flows back through it, and A's output (rank elements per token)."""
    ad = dtype_bytes(lora.dtype)
    saved = []
    if lora.dropout > 0:
        if grad_flows:
            mask = _mask_bytes(device, ad) * lin.in_features * tokens
            saved.append(SavedTensor(f"{lin.name}.lora_dropout_mask", mask, layer))
        saved.append(SavedTensor(f"{lin.name}.lora_input", ad * lin.in_features * tokens, layer))
    elif ad != act_bytes:
        saved.append(SavedTensor(f"{lin.name}.lora_input", ad * lin.in_features * tokens, layer))  # the cast copy
    saved.append(SavedTensor(f"{lin.name}.lora_A_out", ad * lora.rank * tokens, layer))
    return saved


def layer_saved_tensors(spec: ModelSpec, batch: int, seq: int, *, act_dtype: str = "bf16",
                        weights_trainable: bool = True, input_requires_grad: bool = True,
                        lora: LoraAdapters | None = None, quantized_base: bool = False, attention: str = "flash",
                        device: str = "cuda", layer: int | None = None,
                        weight_copies: bool = False) -> list[SavedTensor]:
    """Tensors one transformer block keeps for backward, for a (batch, seq) micro-batch (see the module docstring).

    ``weights_trainable``: the block's own weights train (full fine-tuning, BAdam's active block). False: frozen,
    but a gradient still flows through it (LoRA's base, BAdam's blocks above the active one).
    ``input_requires_grad``: something below the block trains, so it must pass a gradient to its input.
    ``weight_copies``: autocast casts each (wider) weight for its product, and a linear whose input needs a gradient
    keeps the cast copy (see `ActivationOptions.weight_dtype`).
    """
    a = dtype_bytes(act_dtype)
    mask_a = _mask_bytes(device, a)
    adapted = {lin.name for lin in lora.adapted(spec)[0]} if lora else set()
    ad = dtype_bytes(lora.dtype) if lora else a
    tokens = batch * seq
    h, i, nh = spec.hidden, spec.intermediate, spec.n_heads
    saved: list[SavedTensor] = []

    def keep(name: str, bytes_per_token: int) -> None:
        if bytes_per_token > 0:
            saved.append(SavedTensor(name, bytes_per_token * tokens, layer))

    def reading(source: str) -> list[Linear]:
        return [lin for lin in spec.linears if lin.reads == source]

    def any_adapted(source: str) -> bool:
        return any(lin.name in adapted for lin in reading(source))

    def input_kept_by_linear(source: str) -> bool:
        # A frozen nn.Linear keeps only its weight; a trainable one, a quantized kernel, or an adapter computing in the
        # activation dtype without dropout keeps the very tensor it reads.
        return any(weights_trainable or quantized_base
                   or (lin.name in adapted and lora.dropout == 0 and ad == a) for lin in reading(source))

    def adapters(source: str, grad_flows: bool) -> None:
        for lin in reading(source):
            if lin.name in adapted:
                saved.extend(_adapter_tensors(lin, lora, tokens, a, grad_flows, device, layer))

    def weight_copy(source: str, input_grad: bool) -> None:
        if weight_copies and input_grad:
            for lin in reading(source):
                saved.append(SavedTensor(f"{lin.name}.weight_{act_dtype}", a * lin.in_features * lin.out_features,
                                         layer))

    def norm(prefix: str, grad_flows: bool) -> None:
        if spec.norm == "rmsnorm":
            if grad_flows:
                keep(f"{prefix}.input_fp32", 4 * h)
                keep(f"{prefix}.rstd", 4)
            if weights_trainable:
                keep(f"{prefix}.normalized", a * h)
        elif grad_flows or weights_trainable:
            keep(f"{prefix}.input", a * h)
            keep(f"{prefix}.mean_rstd", 8)

    # Attention half: norm, q/k/v, attention, output projection.
    norm("attn_norm", input_requires_grad)
    if input_kept_by_linear("attn_in"):
        keep("attn_norm.output", a * h)
    adapters("attn_in", input_requires_grad or weights_trainable)
    weight_copy("attn_in", input_requires_grad or weights_trainable)
    qkv_flows = input_requires_grad or weights_trainable or any_adapted("attn_in")
    if qkv_flows:
        # Eager attention repeats grouped k/v heads to all query heads before its matmuls; SDPA does not.
        kv = spec.kv_dim if attention == "flash" else spec.q_dim
        if spec.fused_qkv:  # q, k, v are views of the one c_attn output
            keep("attn.qkv", a * (spec.q_dim + 2 * kv))
        else:
            keep("attn.q", a * spec.q_dim)
            keep("attn.k", a * kv)
            keep("attn.v", a * kv)
        if attention == "flash":
            keep("attn.output", a * spec.q_dim)
            keep("attn.logsumexp", 4 * nh)
        else:
            keep("attn.softmax_fp32", 4 * nh * seq)
            if a < 4:
                keep("attn.probs", a * nh * seq)
            if spec.attention_dropout > 0:
                keep("attn.dropout_mask", mask_a * nh * seq)
                keep("attn.dropped_probs", a * nh * seq)
    if attention != "flash" and input_kept_by_linear("attn_out"):
        keep("attn.output", a * spec.q_dim)
    adapters("attn_out", qkv_flows)
    weight_copy("attn_out", qkv_flows)
    attn_branch_flows = qkv_flows or any_adapted("attn_out")
    if spec.hidden_dropout > 0 and attn_branch_flows:
        keep("attn.resid_dropout_mask", mask_a * h)

    # MLP half: norm, projections, activation.
    residual_flows = attn_branch_flows  # x + attn(x) needs a gradient when x or the attention branch does
    norm("mlp_norm", residual_flows)
    if input_kept_by_linear("mlp_in"):
        keep("mlp_norm.output", a * h)
    adapters("mlp_in", residual_flows)
    weight_copy("mlp_in", residual_flows or weights_trainable)
    mlp_flows = residual_flows or weights_trainable or any_adapted("mlp_in")
    if mlp_flows:
        if spec.mlp == "swiglu":
            keep("mlp.gate", a * i)
            keep("mlp.gate_silu", a * i)
            keep("mlp.up", a * i)
        else:
            keep("mlp.fc", a * i)
    if input_kept_by_linear("mlp_act"):
        keep("mlp.hidden", a * i)
    adapters("mlp_act", mlp_flows)
    weight_copy("mlp_act", mlp_flows)
    if spec.hidden_dropout > 0 and (mlp_flows or any_adapted("mlp_act")):
        keep("mlp.resid_dropout_mask", mask_a * h)
    return saved


def layer_backward_workspace(spec: ModelSpec, batch: int, seq: int, act_dtype: str = "bf16") -> int:
    """Bytes of gradients alive while one block runs backward (an estimate, not a saved-tensor count).

    The gradients of the block's widest group of intermediates (attention: q, k, v and output; MLP: its i-wide
    tensors, 3 for SwiGLU and 2 for GELU) plus the gradient of the residual stream, in the activation dtype.
    """
    a = dtype_bytes(act_dtype)
    attn = a * (2 * spec.q_dim + 2 * spec.kv_dim)
    mlp = (3 if spec.mlp == "swiglu" else 2) * a * spec.intermediate
    return batch * seq * (max(attn, mlp) + a * spec.hidden)


@dataclass
class _Estimate:
    items: list[SavedTensor] = field(default_factory=list)
    temporary: int = 0
    notes: list[str] = field(default_factory=list)


def _resolve(spec: ModelSpec, opts: ActivationOptions) -> tuple[int, set[int], bool, bool]:
    """(backward_from_layer, trainable layer indices, embedding trains, head trains), checked against the spec."""
    start = opts.backward_from_layer
    if not isinstance(start, int) or not 0 <= start <= spec.n_layers:
        raise SlimtuneError(f"backward_from_layer={start!r} must be in 0..{spec.n_layers} for {spec.name}")
    trainable = set(range(start, spec.n_layers)) if opts.full else set(opts.trainable_layers)
    wrong = sorted(k for k in trainable if not isinstance(k, int) or not 0 <= k < spec.n_layers)
    if wrong:
        raise SlimtuneError(f"trainable_layers {wrong} are not layers of {spec.name} (0..{spec.n_layers - 1})")
    below = sorted(k for k in trainable if k < start)
    if below:
        raise SlimtuneError(f"layers {below} train, but backward_from_layer={start} stops backward above them")
    embedding = opts.full and start == 0 if opts.embedding_trainable is None else opts.embedding_trainable
    if embedding and start != 0:
        raise SlimtuneError("the embedding trains, so backward reaches layer 0: set backward_from_layer=0")
    head = opts.full if opts.head_trainable is None else opts.head_trainable
    return start, trainable, embedding, head


def _estimate(spec: ModelSpec, batch: int, seq: int, opts: ActivationOptions, layers: range | None = None,
              first: bool = True, last: bool = True) -> _Estimate:
    """Saved tensors and temporary workspace for the layers in ``layers`` (all by default); ``first`` adds the
    embedding, ``last`` the final norm, head and loss (a pipeline stage has a slice)."""
    for key, value in (("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or value < 1:
            raise SlimtuneError(f"{key} must be a positive integer, got {value!r}")
    start, trainable, embedding_trains, head_trains = _resolve(spec, opts)
    layers = range(spec.n_layers) if layers is None else layers
    backward_layers = [k for k in layers if k >= start]
    a = dtype_bytes(opts.act_dtype)
    tokens = batch * seq
    est = _Estimate()

    def keep(name: str, nbytes: int) -> None:
        if nbytes > 0:
            est.items.append(SavedTensor(name, nbytes))

    copies = (opts.weight_dtype is not None and dtype_bytes(opts.weight_dtype) > a and not opts.quantized_base)

    def block(k: int) -> list[SavedTensor]:
        return layer_saved_tensors(spec, batch, seq, act_dtype=opts.act_dtype, weights_trainable=k in trainable,
                                   input_requires_grad=k > start or embedding_trains, lora=opts.lora,
                                   quantized_base=opts.quantized_base, attention=opts.attention,
                                   device=opts.device, layer=k, weight_copies=copies)

    if first:
        if embedding_trains:
            keep("embed.token_ids", 8 * tokens)
            if spec.max_positions:
                keep("embed.position_ids", 8 * seq)
            if spec.hidden_dropout > 0:
                keep("embed.dropout_mask", _mask_bytes(opts.device, a) * spec.hidden * tokens)
    if backward_layers and not spec.max_positions:
        keep("rope.cos_sin", 2 * a * spec.head_dim * seq)  # shared by every layer, independent of batch

    if opts.checkpointing and backward_layers:
        for k in backward_layers:
            est.items.append(SavedTensor("checkpoint.input", a * spec.hidden * tokens, k))
        # In backward, one block at a time is recomputed and keeps its full set again.
        recomputed = max((block(k) for k in backward_layers), key=lambda items: sum(t.nbytes for t in items))
        est.items.extend(SavedTensor(f"recompute.{t.name}", t.nbytes, t.layer) for t in recomputed)
        est.notes.append(f"gradient checkpointing: {len(backward_layers)} block inputs of "
                         f"{format_bytes(a * spec.hidden * tokens)} + one recomputed block")
    else:
        for k in backward_layers:
            est.items.extend(block(k))
    if backward_layers:
        est.temporary = layer_backward_workspace(spec, batch, seq, opts.act_dtype)
        if start:
            est.notes.append(f"backward stops at layer {start}: layers 0..{start - 1} keep no activations")

    if last:
        est.temporary = max(est.temporary, _head_and_loss(spec, batch, seq, opts, a, bool(backward_layers) or
                                                          embedding_trains, head_trains, keep, est.notes))
    return est


def _head_and_loss(spec: ModelSpec, batch: int, seq: int, opts: ActivationOptions, a: int, grad_flows: bool,
                   head_trains: bool, keep, notes: list[str]) -> int:
    """Keep the final norm's, head's and loss's tensors; return the loss's temporary workspace in bytes."""
    tokens = batch * seq
    h, vocab = spec.hidden, spec.vocab
    if spec.norm == "rmsnorm":
        if grad_flows:
            keep("final_norm.input_fp32", (4 * h + 4) * tokens)
        if head_trains:
            keep("final_norm.normalized", a * h * tokens)
    elif grad_flows or head_trains:
        keep("final_norm.input", (a * h + 8) * tokens)
    head_adapted = opts.lora is not None and opts.lora.adapted(spec)[1]
    if opts.loss_chunk is None:
        shares_input = head_adapted and opts.lora.dropout == 0 and dtype_bytes(opts.lora.dtype) == a
        if head_trains or opts.quantized_head or shares_input:
            keep("lm_head.input", a * h * tokens)
        if head_adapted:
            for t in _adapter_tensors(spec.head, opts.lora, tokens, a, grad_flows or head_trains, opts.device, None):
                keep(t.name, t.nbytes)
        loss_bytes = 4 if opts.logits_fp32 else a
        keep("logits", a * vocab * tokens)  # the model's output, alive until backward
        keep("loss.log_softmax", loss_bytes * vocab * tokens)
        keep("loss.targets", 8 * tokens)
        notes.append(f"full logits: {format_bytes(a * vocab * tokens)} + log-softmax "
                     f"{format_bytes(loss_bytes * vocab * tokens)} ({'fp32' if opts.logits_fp32 else 'act dtype'})")
        # Backward of the loss: the gradient of the log-softmax and of the logits, both (tokens, vocab).
        return 2 * loss_bytes * vocab * tokens
    chunk = min(opts.loss_chunk, tokens)
    keep("loss.hidden_grad", a * h * tokens)  # the chunked loss computes d loss / d hidden during forward
    workspace = chunk * vocab * (4 + (a if a < 4 else 0))
    if head_trains:
        keep("loss.head_grad", a * vocab * h)
        workspace += 4 * vocab * h + (a * vocab * h if a < 4 else 0)  # fp32 accumulator + one chunk's gradient
    notes.append(f"chunked loss: {chunk} positions x {vocab} logits at a time")
    return workspace


def activation_items(spec: ModelSpec, batch: int, seq: int, **options) -> list[SavedTensor]:
    """Every tensor kept for backward in a (batch, seq) micro-batch; ``options``: fields of `ActivationOptions`."""
    return _estimate(spec, batch, seq, activation_options(**options)).items


def activation_bytes(spec: ModelSpec, batch: int, seq: int, **options) -> Plan:
    """Activation memory of one (batch, seq) micro-batch as a `Plan` with ``activations`` and ``temporary``.

    ``activations`` = the sum of `activation_items` (bytes): per layer from `backward_from_layer` up, the
    tensors of `layer_saved_tensors` (or, with checkpointing, each block's input, a·h per token, plus one
    recomputed block), plus embedding, final norm, logits and loss. ``temporary`` = the larger of the loss's
    backward workspace (full logits: 2 x 4 x vocab bytes per token in fp32) and one block's backward
    (`layer_backward_workspace`). ``options``: fields of `ActivationOptions`.
    """
    opts = activation_options(**options)
    est = _estimate(spec, batch, seq, opts)
    total = sum(t.nbytes for t in est.items)
    return Plan(parts={"activations": total, "temporary": est.temporary},
                notes=[f"activations: batch {batch} x seq {seq} in {opts.act_dtype}, {format_bytes(total)}"]
                + est.notes)
