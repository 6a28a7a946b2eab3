"""The one place slimtune changes how peft's layers run: LoRA linear layers whose forward adds in place.

`lean_lora_layers` switches the class of each LoRA linear layer (peft's `Linear`, and its bitsandbytes `Linear4bit`)
to a subclass whose forward, `_lean_lora_forward`, scales and adds the adapter's output in place. It reads peft's
layer attributes (`active_adapters`, `lora_A`, `lora_B`, `lora_dropout`, `scaling`, `lora_variant`, `merged`,
`disable_adapters`, `base_layer`) and runs peft's own forward for every case but the plain one, so a peft upgrade
that changes them breaks here; tests/methods/test_lora.py and test_qlora.py check the results against peft's
forward bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def _lean_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's forward of a LoRA linear layer, `base(x) + lora_B(lora_A(dropout(x))) * scaling`, with the scaling and
    the sum done in place. peft's own forward makes three output-sized tensors besides the base output (the adapter
    output, the scaled copy, the sum); this one makes one. The same operations on the same values: results and
    gradients are bit for bit peft's. Anything but that plain case (adapters disabled or merged, DoRA and other
    variants, per-call arguments, autocast, an adapter in another dtype than the input) runs peft's forward."""
    peft_forward = type(self).__mro__[1].forward
    adapters = [name for name in self.active_adapters if name in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or not adapters
            or any(name in self.lora_variant or self.lora_A[name].weight.dtype != x.dtype for name in adapters)
            or torch.is_autocast_enabled(x.device.type)):
        return peft_forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    if result.dtype != x.dtype:  # a base layer that computes in another dtype: peft casts, so let it
        return peft_forward(self, x)
    fresh = getattr(self.base_layer, "fresh_output", None)  # slimtune's 4-bit layers say when peft's copy is moot
    if (self._clone_base_output and not (fresh is not None and fresh(x))) or result._is_view():
        result = result.clone()  # as peft does for bitsandbytes' 4-bit layers; a custom autograd Function's output
        # (slimtune's oneDNN linear) may be a view too
    for name in adapters:
        # lora_B's backward needs its input, not its output, and the base layer's needs none: both may change in place
        delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))
        scaled = delta * self.scaling[name] if delta._is_view() else delta.mul_(self.scaling[name])
        result.add_(scaled)
    return result


_LEAN_CLASSES: dict[type, type] = {}


def lean_lora_layers(model: nn.Module) -> int:
    """Give every LoRA linear layer of `model` (peft's `Linear`, and its bitsandbytes `Linear4bit`) the forward above,
    by switching its class to a subclass (isinstance, state_dict and peft's own methods stay as they were); returns
    how many were switched.

    Measured on SmolLM2-135M (benchmarks/methods.py, 4 x 128 tokens, CPU): the training peak drops by ~150 MB,
    mostly not the temporaries themselves but the allocator's holes they leave between the activations."""
    import sys

    from peft.tuners.lora import layer as lora_layer

    bnb_layer = sys.modules.get("peft.tuners.lora.bnb")  # imported by peft only where bitsandbytes is installed
    plain = {lora_layer.Linear: False}
    if getattr(bnb_layer, "Linear4bit", None) is not None:
        plain[bnb_layer.Linear4bit] = True
    n = 0
    for module in model.modules():
        cls = type(module)
        if cls in plain:
            lean = _LEAN_CLASSES.get(cls)
            if lean is None:
                lean = _LEAN_CLASSES[cls] = type(cls.__name__, (cls,), {
                    "forward": _lean_lora_forward, "_clone_base_output": plain[cls], "__module__": __name__,
                    "__qualname__": f"lean_{cls.__name__}", "__doc__": f"peft's {cls.__name__} with the forward of "
                                                                       f"`_lean_lora_forward`."})
            module.__class__ = lean
            n += 1
    return n
