"""BitNet b1.58 linear layer: ternary weights, 8-bit activations, trained with a straight-through estimator.

`BitLinear` is a drop-in ``nn.Linear`` (same ``weight`` key and init, no bias) that computes with

    w' = w + lam * (q_w(w) - w)        x' = x + lam * (q_x(x) - x)        y = x' @ w'.T

where the gradient of ``q_w`` and ``q_x`` is taken as the identity (straight-through), so the fp ``weight``
keeps receiving the full gradient whatever ``lam`` is. ``lam`` (0..1) is the quantization strength: 0 is exactly
``nn.Linear``, 1 is full BitNet quantization, values in between let a method warm quantization in gradually.

The quantizers (BitNet b1.58, Ma et al. 2024):

* weights, per tensor, absmean: ``m = max(mean|W|, 1e-5)``, codes ``clamp(round(W * (1/m)), -1, 1)`` in
  {-1, 0, +1}, dequantized ``codes / (1/m)``, computed in fp32 whatever the weight dtype;
* activations, per token (last dim), absmax to 8 bits: ``s = 127 / max(max|x|, 1e-5)``, codes
  ``clamp(round(x * s), -128, 127)``, dequantized ``codes / s``, computed in the input dtype.

What Hugging Face transformers expects (read from transformers 5.x ``integrations/bitnet.py``,
``quantizers/quantizer_bitnet.py``, ``utils/quantization_config.py::BitNetQuantConfig``), and what is matched:

* ``quantization_config = {"quant_method": "bitnet", "linear_class": "bitlinear" | "autobitlinear",
  "quantization_mode": "offline" | "online", "use_rms_norm": bool, "rms_norm_eps": float,
  "modules_to_not_convert": [...]}``; the defaults are ``bitlinear`` / ``offline`` / no norm. When
  ``modules_to_not_convert`` is given it replaces the default skip list, so it must name ``lm_head`` itself.
  Every other ``nn.Linear`` of the model becomes a BitNet layer.
* ``linear_class="bitlinear"`` (the inference layer, ``BitLinear``): buffers ``weight`` uint8 of shape
  ``(out_features // 4, in_features)`` (four ternary rows per byte, see `slimtune.quant.pack`) and
  ``weight_scale`` of shape ``(1,)`` in the model dtype holding the **inverse** scale ``1/m``: it computes
  ``F.linear(x_codes, w_codes) / (weight_scale * s)`` with the activation codes and ``s`` exactly as above,
  computed in the input dtype. ``out_features`` must therefore be a multiple of 4.
* ``linear_class="autobitlinear"``, ``offline``: the same packed ``weight`` (unpacked while loading) but
  ``weight_scale`` holds ``m`` itself and **multiplies** the output; activations are quantized as above but in
  fp32 (then cast back). ``online``: the plain fp ``weight`` (our state dict as is), quantized every forward
  with the same fp32 absmean formula as here.
* There is no norm inside the layer by default. With ``use_rms_norm`` every converted layer applies a
  Llama-style RMSNorm (fp32 statistics, cast back, times a learnt ``rms_norm.weight``) to its input before
  quantizing, which is the published b1.58 recipe; ``BitLinear(use_rms_norm=True)`` reproduces it with the
  same ``rms_norm.weight`` key. It is one switch for the whole model in transformers' config, so export
  either all BitNet layers with it or none. (transformers' ``bitnet`` model family instead has
  ``attn_sub_norm`` / ``ffn_sub_norm`` modules in the model, outside the linear layers.)

With ``lam=1`` this layer computes as transformers' ``bitlinear`` inference does for the exported state: the same
weight codes (by construction) and activation codes, an integer-valued matmul of the codes, then one division by
``weight_scale * s`` (`ternary_linear`), so in fp32 the outputs are bit-identical. That matters beyond the
last digit: dequantizing first (``codes / s`` times ``codes / weight_scale``) differs by ~1e-7 relative, and such a
difference occasionally moves a downstream activation across a rounding boundary of its 8-bit code, after
which an exported model disagreed with slimtune by more than 1e-3 in its logits. transformers decorates its
helpers with ``torch.compile``; the comparison in the tests runs them eagerly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimtuneError

__all__ = [
    "ACTIVATION_BITS",
    "BitLinear",
    "PackedBitLinear",
    "RMSNorm",
    "quantize_activations",
    "quantize_weight",
    "ternary_linear",
    "ternary_weight_codes",
    "token_activation_codes",
]

WEIGHT_SCALE_MIN = 1e-5  # floor of mean|W|, as in the b1.58 recipe and transformers
ACTIVATION_ABSMAX_MIN = 1e-5  # floor of a token's max|x|, same source
ACTIVATION_BITS = 8
_ACT_QMIN, _ACT_QMAX = -(2 ** (ACTIVATION_BITS - 1)), 2 ** (ACTIVATION_BITS - 1) - 1  # -128, 127


def ternary_weight_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary codes of ``weight`` and the *inverse* scale ``1 / max(mean|W|, 1e-5)``.

    Returns ``(codes, inv_scale)``: ``codes`` int8 in {-1, 0, 1} with ``weight``'s shape, ``inv_scale`` a 0-d
    fp32 tensor. The weight is approximated by ``codes / inv_scale``. Computed in fp32 without gradient.
    """
    w = weight.detach().float()
    inv_scale = 1.0 / w.abs().mean().clamp(min=WEIGHT_SCALE_MIN)
    codes = (w * inv_scale).round().clamp(-1, 1).to(torch.int8)
    return codes, inv_scale


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """The ternary approximation ``{-1, 0, +1} * mean|W|`` of ``weight``, in its dtype, without gradient."""
    codes, inv_scale = ternary_weight_codes(weight)
    return (codes.float() / inv_scale).to(weight.dtype)


def token_activation_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) absmax 8-bit codes of ``x`` and their multipliers ``s = 127 / max|x|``.

    Returns ``(codes, s)``: ``codes`` int8 in [-128, 127] shaped like ``x``, ``s`` in ``x``'s dtype shaped
    ``(..., 1)``; ``x`` is approximated by ``codes / s``. Computed in ``x``'s dtype (as transformers' inference
    layer does) without gradient.
    """
    x = x.detach()
    s = _ACT_QMAX / x.abs().amax(dim=-1, keepdim=True).clamp(min=ACTIVATION_ABSMAX_MIN)
    codes = (x * s).round().clamp(_ACT_QMIN, _ACT_QMAX).to(torch.int8)
    return codes, s


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """The per-token 8-bit approximation of ``x``, in its dtype, without gradient."""
    codes, s = token_activation_codes(x)
    return codes.to(x.dtype) / s


def ternary_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear`` of the full-strength (lam=1) BitNet quantizations of ``x`` and ``weight``, in transformers' order.

    Value: ``F.linear(x_codes, w_codes) / (inv_scale * s)``. The matmul of integer codes is exact in fp32 (every
    sum is an integer of magnitude at most 128 * in_features, below 2**24 up to 131072 inputs), so the one rounding
    is the division's, whatever order the matmul kernel sums in; this is what transformers' ``bitlinear`` layer
    computes (see the module docstring).
    The scales are cast to the input dtype, as transformers stores ``weight_scale`` in the model dtype.

    Gradient: straight through both quantizers, as in the dequantize-first form ``F.linear(x', W')``:
    ``dL/dx = g W'`` and ``dL/dW = g^T x'``. The codes carry ``s * (x - x.detach())`` and
    ``inv_scale * (W - W.detach())``, exact zeros in value whose gradients the division by ``inv_scale * s``
    scales back.
    """
    x_codes, s = token_activation_codes(x)
    w_codes, inv_scale = ternary_weight_codes(weight)
    inv_scale = inv_scale.to(weight.dtype)
    xq = x_codes.to(x.dtype) + s * (x - x.detach())
    wq = w_codes.to(weight.dtype) + inv_scale * (weight - weight.detach())
    return F.linear(xq, wq) / (inv_scale.to(x.dtype) * s)


def _straight_through_blend(x: torch.Tensor, quantized: torch.Tensor, lam: float) -> torch.Tensor:
    """Value ``x + lam * (quantized - x)``, gradient the identity with respect to ``x``.

    ``lerp`` returns its end points exactly, so ``lam=1`` gives ``quantized`` bit for bit and ``lam=0`` gives
    ``x``; ``x - x.detach()`` adds an exact zero that carries the gradient.
    """
    frozen = x.detach()
    return torch.lerp(frozen, quantized, lam) + (x - frozen)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim as transformers' Llama/BitNet layers compute it.

    Statistics in fp32, the normalised input cast back to its dtype, then multiplied by ``weight`` (shape
    ``(dim,)``, initialised to ones).
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class BitLinear(nn.Linear):
    """``nn.Linear`` without bias whose weights and inputs are BitNet b1.58-quantized with strength ``lam``.

    Args:
        in_features, out_features, device, dtype: as for ``nn.Linear``.
        bias: must be False; BitNet layers have no bias.
        lam: quantization strength in [0, 1]; 1 = full quantization, 0 = plain ``nn.Linear``. Plain attribute,
            so a method can schedule it (it is not part of the state dict).
        use_rms_norm: apply an RMSNorm (key ``rms_norm.weight``) to the input before quantizing, as the
            published b1.58 recipe and transformers' ``use_rms_norm=True`` do.
        rms_norm_eps: epsilon of that norm.
        name: the layer's name in its model, used in error messages.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        *,
        lam: float = 1.0,
        use_rms_norm: bool = False,
        rms_norm_eps: float = 1e-6,
        name: str | None = None,
    ):
        if bias:
            where = f" {name!r}" if name else ""
            raise SlimtuneError(
                f"BitLinear{where} cannot have a bias: BitNet b1.58 layers (and transformers' BitNet export) are "
                "bias-free. Pass bias=False, or keep this layer as nn.Linear (list it in the method's modules to "
                "skip)."
            )
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.layer_name = name
        self.lam = lam
        self.rms_norm = RMSNorm(in_features, rms_norm_eps, device=device, dtype=dtype) if use_rms_norm else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        lam: float = 1.0,
        use_rms_norm: bool = False,
        rms_norm_eps: float = 1e-6,
        name: str | None = None,
    ) -> BitLinear:
        """A BitLinear computing with ``linear``'s weight Parameter (shared, not copied)."""
        if linear.bias is not None:
            where = f" {name!r}" if name else ""
            raise SlimtuneError(
                f"linear layer{where} has a bias, which BitNet b1.58 layers do not have; keep it as nn.Linear "
                "(list it in the method's modules to skip) or use a model without linear biases."
            )
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, device="meta", dtype=weight.dtype, lam=lam, name=name)
        layer.weight = weight
        if use_rms_norm:
            layer.rms_norm = RMSNorm(linear.in_features, rms_norm_eps, device=weight.device, dtype=weight.dtype)
        return layer

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:  # also rejects NaN
            where = f" of {self.layer_name!r}" if getattr(self, "layer_name", None) else ""
            raise SlimtuneError(f"BitLinear quantization strength lam{where} must be in [0, 1], got {value}")
        self._lam = value

    @property
    def use_rms_norm(self) -> bool:
        return self.rms_norm is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in_features) -> (..., out_features)
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        if self._lam == 0.0:
            return F.linear(x, self.weight)  # skip the quantizers: nothing of them would reach the output
        if self._lam == 1.0:
            return ternary_linear(x, self.weight)
        weight = _straight_through_blend(self.weight, quantize_weight(self.weight), self._lam)
        x = _straight_through_blend(x, quantize_activations(x), self._lam)
        return F.linear(x, weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self._lam}"


class PackedBitLinear(nn.Module):
    """Inference layer for an exported (packed) BitNet weight: the ternary codes unpacked once.

    Buffers ``weight`` (int8 codes in {-1, 0, 1}, shape ``(out, in)``) and ``weight_scale`` (shape ``(1,)``, the
    *inverse* scale ``1 / mean|W|``, as transformers' ``bitlinear`` stores it), optional ``rms_norm``. The forward
    is `BitLinear`'s at ``lam=1`` for the weight these codes came from, bit for bit: per-token int8 inputs times
    the codes, divided by ``weight_scale * s`` (`ternary_linear`).
    """

    def __init__(self, in_features: int, out_features: int, *, use_rms_norm: bool = False, rms_norm_eps: float = 1e-6,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        # A bias added after the product, as transformers' layer does (an export into an architecture whose linears
        # always have one, e.g. the GPT's GPTBigCode folder, stores zeros there).
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.rms_norm = RMSNorm(in_features, rms_norm_eps, device=device, dtype=dtype) if use_rms_norm else None
        self.compute_dtype = dtype or torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_features) -> (..., out_features)
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        x_codes, s = token_activation_codes(x)
        inv_scale = self.weight_scale.float().reshape(()).to(x.dtype)
        y = F.linear(x_codes.to(x.dtype), self.weight.to(x.dtype)) / (inv_scale * s)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ternary (unpacked)"
