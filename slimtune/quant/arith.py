"""Textbook uniform quantization: scales, zero points, integer codes and fake quantization.

Two schemes, two granularities, 2..8 bits (8 and 4 are the ones slimtune uses):

* ``symmetric``: ``scale = max|x| / (2^(b-1) - 1)``, zero point 0, codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``
  stored as ``int8``. The range is *narrow*: the most negative code (-128 for 8 bits, -8 for 4 bits) is never
  produced, so the grid is symmetric around 0 and ``-code`` is always representable. That costs one code out
  of 256 (or 16) and keeps ``dequantize(-q) == -dequantize(q)``.
* ``asymmetric``: ``scale = (max - min) / (2^b - 1)``, ``zero_point = round(-min / scale)`` clamped to the code
  range, codes in ``[0, 2^b - 1]`` stored as ``uint8``. ``min``/``max`` are first widened to include 0
  (``min = min(x.min(), 0)``, ``max = max(x.max(), 0)``, as PyTorch's min/max observers do). That keeps the
  zero point inside the code range without clamping it, makes 0.0 exactly representable (padding, ReLU
  zeros) and keeps the round-trip error within half a step for tensors of one sign, where clamping an
  out-of-range zero point would otherwise shift every value. A tensor with both signs uses the full code
  range: its minimum becomes code 0 and its maximum code ``2^b - 1``.

Granularity ``per_tensor`` gives one scale; ``per_channel`` gives one scale per index of dim 0 (the output
channel of a ``(out, in)`` weight). Scales and zero points are returned already shaped to broadcast against
``x``: a 0-d tensor per tensor, ``(C, 1, ..., 1)`` per channel. Scales are fp32, zero points int32.

Degenerate inputs: where the range is 0 (all zeros, or a scale that underflows to 0) the scale is set to 1.0,
so every value maps to the zero point and dequantizes back to exactly 0.0. A tensor of one repeated non-zero
value maps to the extreme code and comes back within one float rounding of itself.

4-bit codes are stored one per byte; packing two per byte is a storage concern left to the exporter.
"""

from __future__ import annotations

import torch

from slimtune.errors import SlimtuneError

__all__ = [
    "GRANULARITIES",
    "SCHEMES",
    "code_range",
    "dequantize",
    "fake_quantize",
    "quant_params",
    "quantize",
]

SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("per_tensor", "per_channel")
MIN_BITS, MAX_BITS = 2, 8  # codes must fit one (u)int8 byte; 1-bit symmetric would have no non-zero code
_CODE_DTYPE = {"symmetric": torch.int8, "asymmetric": torch.uint8}


def _where(name: str | None) -> str:
    return f" for {name!r}" if name else ""


def _check_scheme(scheme: str, name: str | None = None) -> None:
    if scheme not in SCHEMES:
        raise SlimtuneError(f"unknown quantization scheme {scheme!r}{_where(name)}; choose one of {', '.join(SCHEMES)}")


def _check_granularity(granularity: str, name: str | None = None) -> None:
    if granularity not in GRANULARITIES:
        raise SlimtuneError(
            f"unknown quantization granularity {granularity!r}{_where(name)}; choose one of {', '.join(GRANULARITIES)}"
        )


def _check_bits(bits: int, name: str | None = None) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise SlimtuneError(
            f"quantization bits={bits!r}{_where(name)} is not supported; use an integer from {MIN_BITS} to {MAX_BITS} "
            "(8 and 4 are the usual choices)"
        )


def code_range(scheme: str, bits: int) -> tuple[int, int]:
    """The smallest and largest integer code of ``scheme`` at ``bits`` bits (both inclusive)."""
    _check_scheme(scheme)
    _check_bits(bits)
    if scheme == "symmetric":
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def _reduce(x: torch.Tensor, granularity: str, op: str) -> torch.Tensor:
    """``op`` ("amin"/"amax") over the whole tensor, or over every dim but 0 keeping dims for broadcasting."""
    if granularity == "per_tensor" or x.dim() == 0:
        return getattr(torch, op)(x)
    if x.dim() == 1:
        return x.clone()  # one channel per element
    return getattr(torch, op)(x, dim=tuple(range(1, x.dim())), keepdim=True)


def quant_params(
    x: torch.Tensor,
    scheme: str = "symmetric",
    granularity: str = "per_tensor",
    bits: int = 8,
    *,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp32) and zero point (int32) that map ``x`` onto the integer codes of ``scheme``.

    Both are shaped to broadcast against ``x``: 0-d for ``per_tensor``, ``(x.shape[0], 1, ...)`` for
    ``per_channel``. ``name`` (a layer or parameter name) is used in error messages.
    """
    _check_scheme(scheme, name)
    _check_granularity(granularity, name)
    _check_bits(bits, name)
    if granularity == "per_channel" and x.dim() == 0:
        raise SlimtuneError(f"per_channel quantization{_where(name)} needs a tensor with a channel dim 0; got a scalar")
    if x.numel() == 0:
        raise SlimtuneError(f"cannot quantize an empty tensor{_where(name)} (shape {tuple(x.shape)})")
    x = x.detach().float()
    if not torch.isfinite(x).all():
        raise SlimtuneError(
            f"tensor{_where(name)} contains inf or NaN; quantization needs finite values (check the training run "
            "that produced it, e.g. for a diverged loss)"
        )
    lo, hi = code_range(scheme, bits)
    if scheme == "symmetric":
        scale = _reduce(x.abs(), granularity, "amax") / hi
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        low = _reduce(x, granularity, "amin").clamp(max=0.0)
        high = _reduce(x, granularity, "amax").clamp(min=0.0)
        scale = (high - low) / (hi - lo)
    # A zero range (or one so small that the scale underflows) would divide by 0; with scale 1 every value maps
    # to the zero point and the (all ~0) values come back as exactly 0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scheme == "asymmetric":
        zero_point = torch.round(-low / scale).clamp(lo, hi).to(torch.int32)
    return scale, zero_point


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int = 8, scheme: str = "symmetric"
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point)``: ``int8`` for symmetric, ``uint8`` for asymmetric.

    Rounding is round-half-to-even (``torch.round``).
    """
    lo, hi = code_range(scheme, bits)
    codes = torch.round(x.detach().float() / scale) + zero_point
    return codes.clamp(lo, hi).to(_CODE_DTYPE[scheme])


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Real values ``(codes - zero_point) * scale`` in ``dtype``."""
    return ((codes.to(torch.int32) - zero_point).float() * scale).to(dtype)


class _FakeQuantize(torch.autograd.Function):
    """Quantize-dequantize in the forward; straight-through gradient inside the code range, zero outside."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, lo, hi):
        unclamped = torch.round(x.detach().float() / scale) + zero_point
        ctx.save_for_backward((unclamped >= lo) & (unclamped <= hi))
        return ((unclamped.clamp(lo, hi) - zero_point) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (inside,) = ctx.saved_tensors
        return grad_output * inside.to(grad_output.dtype), None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scheme: str = "symmetric",
    granularity: str = "per_tensor",
    bits: int = 8,
    *,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable with a straight-through estimator.

    The gradient is passed through unchanged where ``round(x / scale) + zero_point`` lies inside the code range
    and is zero where the value was clamped (the textbook STE). Without ``scale``/``zero_point`` they are computed
    from ``x`` itself (no gradient flows into them), so every value is inside the range.
    """
    if (scale is None) != (zero_point is None):
        raise SlimtuneError(f"fake_quantize{_where(name)}: pass both scale and zero_point, or neither")
    if scale is None:
        scale, zero_point = quant_params(x, scheme, granularity, bits, name=name)
    lo, hi = code_range(scheme, bits)
    return _FakeQuantize.apply(x, scale.detach(), zero_point.detach(), lo, hi)
