"""Drop-in quantized linear layers and the helper that swaps them into a model.

* `FakeQuantLinear`: ``nn.Linear`` (same ``weight``/``bias`` keys) whose forward uses the fake-quantized weight
  (and, optionally, fake-quantized inputs), with a straight-through gradient: what ``method=qat`` trains.
* `QuantizedLinear`: real integer weight codes with their scales and zero points (post-training quantization,
  ``slimtune quantize``); optionally static int8 input quantization with a calibrated scale.
* `replace_linears`: swap every ``nn.Linear`` of a model (but the ones to keep) for a layer built from it.

Scheme and granularity names: the user-facing short names ``sym``/``asym`` and ``tensor``/``channel`` (command line,
``qat.*`` keys) and the long names of `slimtune.quant.arith` are both accepted (`scheme_name`, `granularity_name`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.arith import code_range, dequantize, fake_quantize, quant_params, quantize

__all__ = [
    "FakeQuantLinear",
    "QuantizedLinear",
    "granularity_name",
    "linear_names",
    "linear_weight_bytes",
    "replace_linears",
    "scheme_name",
]

_SCHEMES = {"sym": "symmetric", "asym": "asymmetric", "symmetric": "symmetric", "asymmetric": "asymmetric"}
_GRANULARITIES = {"tensor": "per_tensor", "channel": "per_channel", "per_tensor": "per_tensor",
                  "per_channel": "per_channel"}
ACTIVATION_BITS = 8


def scheme_name(scheme: str, key: str = "scheme") -> str:
    """The arith name (``symmetric``/``asymmetric``) of ``sym``/``asym`` (or of the long name itself)."""
    if scheme not in _SCHEMES:
        raise SlimtuneError(f"unknown quantization {key} {scheme!r}; choose sym (symmetric, zero point 0) or asym "
                            "(asymmetric, with a zero point)")
    return _SCHEMES[scheme]


def granularity_name(granularity: str, key: str = "granularity") -> str:
    """The arith name (``per_tensor``/``per_channel``) of ``tensor``/``channel`` (or of the long name itself)."""
    if granularity not in _GRANULARITIES:
        raise SlimtuneError(f"unknown quantization {key} {granularity!r}; choose tensor (one scale per weight) or "
                            "channel (one scale per output channel)")
    return _GRANULARITIES[granularity]


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` that computes with ``fake_quantize(weight)`` (and ``fake_quantize(input)`` with
    ``activations``): the values an integer layer would use, with the straight-through gradient of
    `slimtune.quant.arith.fake_quantize` flowing into the floating-point weight.

    Weights use ``scheme`` and ``granularity``; inputs use ``scheme`` at 8 bits per token (one range per row of the
    last dim, measured on the fly), so no example's quantization depends on the others in its batch (or on padding,
    or on how a strategy shards the batch), and there is no observer state to checkpoint. This is dynamic per-token
    int8 activation quantization; `slimtune quantize --activations` instead calibrates static per-tensor ranges.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 scheme: str = "symmetric", granularity: str = "per_channel", bits: int = 8,
                 activations: bool = False, name: str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scheme = scheme_name(scheme)
        self.granularity = granularity_name(granularity)
        code_range(self.scheme, bits)  # checks bits
        self.bits = bits
        self.activations = activations
        self.layer_name = name

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, name: str | None = None, **options) -> FakeQuantLinear:
        """A FakeQuantLinear computing with ``linear``'s own weight and bias Parameters (shared, not copied)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    dtype=linear.weight.dtype, name=name, **options)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.scheme, self.granularity, self.bits, name=self.layer_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_features) -> (..., out_features)
        if self.activations:  # one scale (and zero point) per token: per_channel over the rows of (tokens, in)
            tokens = x.reshape(-1, x.shape[-1])
            x = fake_quantize(tokens, self.scheme, "per_channel", ACTIVATION_BITS, name=self.layer_name).view(x.shape)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, {self.scheme} {self.granularity} int{self.bits} weights"
                f"{', per-token int8 inputs' if self.activations else ''}")


class QuantizedLinear(nn.Module):
    """A linear layer holding integer weight codes: ``weight`` (int8 for symmetric, uint8 for asymmetric, shape
    ``(out, in)``), ``weight_scale`` (fp32) and, asymmetric only, ``weight_zero_point`` (uint8) (0-d per tensor,
    ``(out, 1)`` per channel), and the floating-point ``bias``. With static activation quantization also
    ``input_scale`` / ``input_zero_point`` (0-d, calibrated): the input is quantized with them before the product.

    The product uses torch's int8 kernels where they exist and pay off (`choose_int8_kernel`, `int8_product`):
    symmetric weights with floating-point inputs through ``torch._weight_int8pack_mm`` (int8 weights, one scale per
    output row), symmetric weights with static int8 inputs through ``torch._int_mm`` (int8 x int8 -> int32);
    otherwise (asymmetric zero points, a device without the kernel, or shapes where it is slower) it dequantizes
    the weight and multiplies in floating point. ``kernels_used`` collects what the forwards ran;
    ``use_int8_kernels = False`` forces the dequantizing path.
    """

    KERNEL = "dequantize + floating-point matmul"
    use_int8_kernels = True

    def __init__(self, in_features: int, out_features: int, bias: bool, *, scheme: str, granularity: str,
                 bits: int = 8, activations: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.granularity, self.bits = scheme_name(scheme), granularity_name(granularity), bits
        code_dtype = torch.int8 if self.scheme == "symmetric" else torch.uint8
        scale_shape = (out_features, 1) if self.granularity == "per_channel" else ()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=code_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        # Symmetric zero points are always 0 and not stored; asymmetric ones lie in [0, 2^bits - 1]: one byte each.
        self.register_buffer("weight_zero_point", torch.zeros(scale_shape, dtype=torch.uint8, device=device)
                             if self.scheme == "asymmetric" else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.activations = activations
        self.kernels_used: set[str] = set()  # what the forwards so far ran (reports say it)
        if activations:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, scheme: str, granularity: str, bits: int = 8,
                    activations: bool = False, name: str | None = None) -> QuantizedLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme=scheme,
                    granularity=granularity, bits=bits, activations=activations, dtype=linear.weight.dtype,
                    device=linear.weight.device)
        scale, zero_point = quant_params(linear.weight, layer.scheme, layer.granularity, bits, name=name)
        layer.weight.copy_(quantize(linear.weight, scale, zero_point, bits, layer.scheme))
        layer.weight_scale.copy_(scale)
        if layer.weight_zero_point is not None:
            layer.weight_zero_point.copy_(zero_point)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def set_input_range(self, low: float, high: float) -> None:
        """Calibrated input range (from an observer) → the static input scale and zero point."""
        if not self.activations:
            raise SlimtuneError("this QuantizedLinear was built without activation quantization")
        scale, zero_point = quant_params(torch.tensor([low, high]), self.scheme, "per_tensor", ACTIVATION_BITS)
        self.input_scale.copy_(scale)
        self.input_zero_point.copy_(zero_point)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        zero_point = 0 if self.weight_zero_point is None else self.weight_zero_point.to(torch.int32)
        return dequantize(self.weight, self.weight_scale, zero_point, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_features) -> (..., out_features)
        kernel = choose_int8_kernel(self, x) if self.use_int8_kernels else None
        y = int8_product(self, x, kernel) if kernel else None
        if y is not None:
            self.kernels_used.add(kernel)
            return y if self.bias is None else y + self.bias
        self.kernels_used.add(self.KERNEL)
        if self.activations:
            x = fake_quantize(x, self.scheme, "per_tensor", ACTIVATION_BITS, scale=self.input_scale,
                              zero_point=self.input_zero_point)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def weight_bytes(self) -> int:
        """Bytes of the codes plus scales and zero points (not the bias)."""
        parts = (self.weight, self.weight_scale, self.weight_zero_point)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.scheme} {self.granularity} int{self.bits}{', static int8 inputs' if self.activations else ''}")


# Kernels found missing on a (device type, kernel) pair: not tried again in this process.
_UNSUPPORTED: set[tuple[str, str]] = set()
WEIGHT_ONLY_KERNEL = "int8 weights x fp inputs (torch._weight_int8pack_mm)"
INT8_INT8_KERNEL = "int8 x int8 -> int32 (torch._int_mm)"


def choose_int8_kernel(layer: QuantizedLinear, x: torch.Tensor) -> str | None:
    """The int8 kernel worth running for ``x`` through ``layer``, or None (dequantize + fp matmul).

    Only symmetric 8-bit weights qualify (the kernels have no zero point). On CPU torch's int8 kernels are slower
    than dequantizing for more than one token (measured, torch 2.13, AMD EPYC, one thread, a 1536x576 weight:
    ``_weight_int8pack_mm`` 3.4 ms vs 12 ms dequantized for 1 token, but 66 ms vs 11 ms for 16 tokens and 1.5 s vs
    0.04 s for 512; ``_int_mm`` on 512 tokens 1.1 s vs 0.04 s), so there it only runs the weight-only kernel for a
    single token (decoding). On accelerators they are the fast path for every shape.
    """
    if layer.scheme != "symmetric" or layer.bits != 8 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if x.device.type == "cpu":
        return WEIGHT_ONLY_KERNEL if not layer.activations and x.numel() == layer.in_features else None
    return INT8_INT8_KERNEL if layer.activations else WEIGHT_ONLY_KERNEL


def int8_product(layer: QuantizedLinear, x: torch.Tensor, kernel: str) -> torch.Tensor | None:
    """``x @ W.T`` (no bias) with ``kernel`` (one of the two above), or None where the device lacks it.

    These ops are torch's own (underscored, so version-dependent): a missing or refusing kernel is remembered per
    device type and the caller falls back to dequantizing.
    """
    key = (x.device.type, kernel)
    if key in _UNSUPPORTED:
        return None
    x2 = x.reshape(-1, layer.in_features).contiguous()  # (N, in)
    row_scales = layer.weight_scale.reshape(-1).expand(layer.out_features)  # (out,)
    try:
        if kernel == INT8_INT8_KERNEL:
            codes = quantize(x2, layer.input_scale, layer.input_zero_point, ACTIVATION_BITS, "symmetric")
            acc = torch._int_mm(codes, layer.weight.t())  # (N, out) int32, exact
            y = (acc.float() * (layer.input_scale * row_scales)).to(x.dtype)
        else:
            y = torch._weight_int8pack_mm(x2, layer.weight, row_scales.to(x.dtype).contiguous())
    except (RuntimeError, NotImplementedError, AttributeError):
        _UNSUPPORTED.add(key)
        return None
    return y.reshape(*x.shape[:-1], layer.out_features)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights (not biases) of every linear layer of ``model``, quantized or not; shared weights once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.weight_bytes()
        elif isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel() * module.weight.element_size()
    return total


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def linear_names(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``model`` that `replace_linears` replaces.

    Left out: layers whose name is in ``skip`` or ends with ``.<entry>`` (``lm_head`` keeps the output head) and
    layers whose weight is shared with an embedding (a tied output head).
    """
    tied = _embedding_weights(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module.weight) not in tied
            and not any(name == s or name.endswith("." + s) for s in skip)]


def replace_linears(model: nn.Module, build: Callable[[str, nn.Linear], nn.Module],
                    skip: Sequence[str] = ("lm_head",)) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` named by `linear_names` by ``build(name, linear)``, in place;
    returns the replaced names."""
    targets = linear_names(model, skip)
    for name in targets:
        model.set_submodule(name, build(name, model.get_submodule(name)))
    return targets
