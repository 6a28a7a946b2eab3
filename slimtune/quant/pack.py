"""Ternary weight packing and the export of `BitLinear` to transformers' BitNet format.

Layout (the one transformers' ``integrations/bitnet.py`` reads): a ternary ``(out, in)`` matrix is stored as a
uint8 ``(out // 4, in)`` matrix. Each code is shifted to {0, 1, 2} (code + 1) and takes 2 bits. The output rows
are split into four consecutive groups of ``out // 4`` rows; byte ``[j, k]`` holds row ``j`` of group 0 in bits
0-1, row ``j`` of group 1 in bits 2-3, group 2 in bits 4-5 and group 3 in bits 6-7, i.e. original rows
``j``, ``j + out/4``, ``j + 2*out/4``, ``j + 3*out/4``. The bit pattern ``11`` is never written.

transformers sizes the packed buffer as ``out_features // 4`` rows and unpacks ``4 * rows`` rows, so only
output dimensions that are a multiple of 4 survive the round trip; other sizes are refused here.
"""

from __future__ import annotations

import torch

from slimtune.errors import SlimtuneError
from slimtune.quant.bitnet import BitLinear, ternary_weight_codes

__all__ = [
    "LINEAR_CLASSES",
    "VALUES_PER_BYTE",
    "bitnet_quantization_config",
    "export_bitlinear_state",
    "pack_ternary",
    "unpack_ternary",
]

VALUES_PER_BYTE = 4  # 2 bits per ternary value
_BITS_PER_VALUE = 8 // VALUES_PER_BYTE
LINEAR_CLASSES = ("bitlinear", "autobitlinear")


def _where(name: str | None) -> str:
    return f" of layer {name!r}" if name else ""


def _check_out_features(out_features: int, name: str | None) -> None:
    if out_features % VALUES_PER_BYTE:
        raise SlimtuneError(
            f"output dimension {out_features}{_where(name)} is not a multiple of {VALUES_PER_BYTE}: transformers' "
            f"BitNet format packs {VALUES_PER_BYTE} ternary output rows per byte and cannot store it. Keep this "
            "layer unquantized (add it to the modules to skip) or give it a multiple-of-4 output size."
        )


def _group_shape(rows: int, packed_like: torch.Tensor) -> tuple[int, ...]:
    return (VALUES_PER_BYTE, rows, *packed_like.shape[1:])


def pack_ternary(codes: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """Pack ternary ``codes`` (integer, values in {-1, 0, 1}, shape ``(out, ...)``) into uint8 ``(out // 4, ...)``.

    ``codes`` is not modified. ``name`` (the layer's name) is used in error messages.
    """
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise SlimtuneError(f"pack_ternary{_where(name)} needs integer codes in {{-1, 0, 1}}, got dtype {codes.dtype}")
    if codes.dim() == 0:
        raise SlimtuneError(f"pack_ternary{_where(name)} needs a tensor with an output dimension, got a scalar")
    _check_out_features(codes.shape[0], name)
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise SlimtuneError(
            f"pack_ternary{_where(name)}: codes must be in {{-1, 0, 1}}, found values from {int(codes.min())} to "
            f"{int(codes.max())}; quantize the weight first (slimtune.quant.bitnet.ternary_weight_codes)"
        )
    rows = codes.shape[0] // VALUES_PER_BYTE
    shifted = (codes.to(torch.int16) + 1).to(torch.uint8).contiguous()
    groups = shifted.reshape(_group_shape(rows, shifted))  # group g = original rows [g*rows, (g+1)*rows)
    packed = torch.zeros_like(groups[0])
    for g in range(VALUES_PER_BYTE):
        packed |= groups[g] << (_BITS_PER_VALUE * g)
    return packed


def unpack_ternary(packed: torch.Tensor, out_features: int, *, name: str | None = None) -> torch.Tensor:
    """Inverse of `pack_ternary`: int8 codes in {-1, 0, 1} of shape ``(out_features, ...)``."""
    if packed.dtype != torch.uint8:
        raise SlimtuneError(f"unpack_ternary{_where(name)} needs a uint8 packed tensor, got dtype {packed.dtype}")
    if packed.dim() == 0:
        raise SlimtuneError(f"unpack_ternary{_where(name)} needs a tensor with an output dimension, got a scalar")
    _check_out_features(out_features, name)
    rows = packed.shape[0]
    if out_features != rows * VALUES_PER_BYTE:
        raise SlimtuneError(
            f"unpack_ternary{_where(name)}: {rows} packed rows hold exactly {rows * VALUES_PER_BYTE} output rows, "
            f"but out_features={out_features}; pass the layer's real output size"
        )
    shifts = torch.arange(0, 8, _BITS_PER_VALUE, device=packed.device, dtype=torch.uint8)
    shifts = shifts.reshape(VALUES_PER_BYTE, *([1] * packed.dim()))
    fields = (packed.unsqueeze(0) >> shifts) & 0b11  # (4, rows, ...): group g of the original rows
    if (fields == 0b11).any():
        raise SlimtuneError(
            f"unpack_ternary{_where(name)}: the packed tensor holds the bit pattern 11, which no ternary value "
            "encodes; it is not a BitNet-packed weight (or it is corrupted)"
        )
    return fields.reshape(out_features, *packed.shape[1:]).to(torch.int8) - 1


def export_bitlinear_state(
    layer: BitLinear,
    *,
    linear_class: str = "bitlinear",
    dtype: torch.dtype | None = None,
    name: str | None = None,
    row_order: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors transformers' offline BitNet layer of ``linear_class`` loads, keyed as in its state dict.

    * ``weight``: uint8 ``(out // 4, in)``, the packed absmean ternary codes of ``layer.weight``, with its output
      rows in ``row_order`` when given (a permutation of ``range(out)``: a fused layer laid out as another
      architecture expects it; exact, since the one scale per tensor does not depend on the order);
    * ``weight_scale``: shape ``(1,)`` in ``dtype`` (default: the weight's dtype). For ``"bitlinear"`` (the
      default class) it is the inverse scale ``1 / mean|W|`` (the layer divides by it); for
      ``"autobitlinear"`` it is ``mean|W|`` (the layer multiplies by it);
    * ``rms_norm.weight`` when the layer has its input norm.

    For transformers' ``online`` mode no export is needed: ``layer.state_dict()`` is what it loads.
    """
    if linear_class not in LINEAR_CLASSES:
        raise SlimtuneError(f"unknown BitNet linear_class {linear_class!r}; choose one of {', '.join(LINEAR_CLASSES)}")
    if not isinstance(layer, BitLinear):
        raise SlimtuneError(
            f"export_bitlinear_state{_where(name)} needs a slimtune BitLinear, got {type(layer).__name__}"
        )
    name = name or layer.layer_name
    dtype = dtype or layer.weight.dtype
    codes, inv_scale = ternary_weight_codes(layer.weight)
    if row_order is not None:
        if not torch.equal(torch.sort(row_order).values, torch.arange(layer.out_features)):
            raise SlimtuneError(f"row_order{_where(name)} must be a permutation of its {layer.out_features} output "
                                f"rows")
        codes = codes[row_order]
    scale = inv_scale if linear_class == "bitlinear" else 1.0 / inv_scale
    state = {
        "weight": pack_ternary(codes, name=name),
        "weight_scale": scale.reshape(1).to(dtype),
    }
    if layer.rms_norm is not None:
        state["rms_norm.weight"] = layer.rms_norm.weight.detach().clone()
    return state


def bitnet_quantization_config(
    *,
    modules_to_not_convert: list[str] | None = None,
    linear_class: str = "bitlinear",
    quantization_mode: str = "offline",
    use_rms_norm: bool = False,
    rms_norm_eps: float = 1e-6,
) -> dict:
    """The ``quantization_config`` entry of ``config.json`` for a model exported with `export_bitlinear_state`.

    transformers converts every ``nn.Linear`` not listed in ``modules_to_not_convert`` (names of modules, e.g.
    ``["lm_head"]``); when the list is given it replaces transformers' default skip list, so include the output
    head. ``quantization_mode="online"`` (only with ``"autobitlinear"``) stores fp weights instead.
    """
    if linear_class not in LINEAR_CLASSES:
        raise SlimtuneError(f"unknown BitNet linear_class {linear_class!r}; choose one of {', '.join(LINEAR_CLASSES)}")
    if quantization_mode not in ("offline", "online"):
        raise SlimtuneError(f"unknown BitNet quantization_mode {quantization_mode!r}; choose one of offline, online")
    if quantization_mode == "online" and linear_class != "autobitlinear":
        raise SlimtuneError("BitNet quantization_mode='online' needs linear_class='autobitlinear'")
    return {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": quantization_mode,
        "use_rms_norm": use_rms_norm,
        "rms_norm_eps": rms_norm_eps,
        "modules_to_not_convert": list(modules_to_not_convert) if modules_to_not_convert is not None else None,
    }
