"""The settings of a training run that decide its memory, apart from the model's shape and the method's options.

A method's ``estimate_memory(spec, run)`` and a strategy's ``estimate_memory(plan, spec, run)`` receive one
`RunSettings`; ``slimtune estimate`` fills it from its flags, a training run from its config (`slimtune.plan.run`).

Pure Python: nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.errors import SlimtuneError
from slimtune.plan.activations import ATTENTION_KINDS
from slimtune.plan.parts import dtype_bytes

OPTIMIZERS = ("adamw", "adamw8bit")


class NoEstimate(SlimtuneError):
    """A method or strategy that cannot estimate its memory (raised by `Method.estimate_memory`'s default)."""


@dataclass(frozen=True)
class RunSettings:
    """How a step runs, as far as memory is concerned (per device)."""

    batch: int = 1
    """Sequences per micro-batch on one device."""
    seq: int = 1024
    """Tokens per sequence (the longest a batch is padded to)."""
    weight_dtype: str = "bf16"
    """Storage dtype of the weights (what the optimizer updates; frozen weights stay in it too)."""
    act_dtype: str = "bf16"
    """Dtype of the activations: the autocast dtype, or the weights' dtype without autocast."""
    checkpointing: bool = False
    """Gradient checkpointing per transformer block."""
    optimizer: str = "adamw"
    """adamw (two fp32-or-weight-dtype moments) or adamw8bit (bitsandbytes-style 8-bit moments)."""
    master_weights: bool = False
    """16-bit weights keep an fp32 master copy for the update (DeepSpeed / HF mixed precision). slimtune's full
    method updates the stored weights directly (False); BAdam always keeps fp32 masters for its active block."""
    device: str = "cuda"
    """Device kind: cuda, cpu or mps (framework baseline, dropout-mask size)."""
    world_size: int = 1
    """Devices the strategy spreads the run over."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (a pipeline keeps several in flight)."""
    attention: str = "flash"
    """flash (SDPA's fused kernels) or eager (the scores' softmax is kept)."""
    loss_chunk: int | None = None
    """None: full (batch, seq, vocab) logits; an int: the chunked head + loss holds this many positions' logits."""
    logits_fp32: bool = True
    """The loss upcasts the logits to fp32 (Hugging Face models do; slimtune's GPT does not)."""
    cpu_allocator: str = "keep"
    """runtime.cpu_allocator of a CPU run: how much freed memory the process keeps (`plan.run.allocator_plan`)."""

    def __post_init__(self):
        for key in ("batch", "seq", "world_size", "grad_accum"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SlimtuneError(f"{key} must be a positive integer, got {value!r}")
        dtype_bytes(self.weight_dtype)
        dtype_bytes(self.act_dtype)
        if self.optimizer not in OPTIMIZERS:
            raise SlimtuneError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.attention not in ATTENTION_KINDS:
            raise SlimtuneError(f"attention {self.attention!r} is not one of {', '.join(ATTENTION_KINDS)}")
        if self.loss_chunk is not None and (not isinstance(self.loss_chunk, int) or self.loss_chunk < 1):
            raise SlimtuneError(f"loss_chunk must be a positive number of positions or None, got {self.loss_chunk!r}")

    @property
    def eight_bit(self) -> bool:
        return self.optimizer == "adamw8bit"

    def activation_options(self, **method_options) -> dict:
        """Keyword options for `activation_bytes`: these settings plus what the method decides (which layers train,
        LoRA adapters, a quantized base)."""
        return dict(act_dtype=self.act_dtype, checkpointing=self.checkpointing, attention=self.attention,
                    loss_chunk=self.loss_chunk, logits_fp32=self.logits_fp32, device=self.device,
                    weight_dtype=self.weight_dtype, **method_options)
