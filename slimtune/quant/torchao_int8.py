"""The torchao int8 weight-only layout of a `slimtune quantize` folder, which plain transformers also loads.

transformers (5.x, with torchao installed) loads a pre-quantized torchao folder from safetensors when
``config.json`` has a ``quantization_config`` with ``quant_method: torchao`` and the weight's torchao config, and
``model.safetensors`` holds every quantized weight flattened the way torchao's safetensors support writes its
``Int8Tensor``: for a layer ``L``, ``L._weight_qdata`` (int8 codes, ``(out, in)``), ``L._weight_scale`` (fp32,
``(out, 1)`` per row or ``(1, 1)`` per tensor) and ``L._weight_zero_point`` (int8, same shape, all 0 for symmetric
codes), plus, in the file's metadata, a JSON description of every tensor under its parameter name (``L.weight``:
type ``Int8Tensor``, ``block_size``, ``dtype``; plain tensors: type ``Tensor``) and the list ``tensor_names``.
torchao's linear then computes ``x @ qdata.T * scale (+ bias)``.

That is slimtune's symmetric 8-bit weight-only layer (`QuantizedLinear` without activations): codes with zero
point 0 and an fp32 scale per output channel (torchao ``PerRow``) or per weight (``PerTensor``), dequantized as
``code * scale``. The codes are written as slimtune computed them. torchao's own quantizer would choose others:
``scale = max|w| / 127.5`` with codes in [-128, 127] (slimtune: ``max|w| / 127``, codes in [-127, 127]), so a
weight quantized by torchao differs from slimtune's in some codes; stored this way a QAT checkpoint keeps the
codes it trained against, and transformers dequantizes them to exactly slimtune's weights.

Asymmetric weights (uint8 codes with a zero point: torchao's int8 weight-only layout is symmetric), fewer bits
and static activation quantization (torchao's static int8 activations clamp to [-128, 127], slimtune's to
[-127, 127]) stay in slimtune's own layout, which only slimtune loads.

Writing needs neither torchao nor transformers' torchao support; slimtune's own loader reads the layout back
without torchao (`from_torchao_state`).
"""

from __future__ import annotations

import json
import re

import torch

from slimtune.errors import SlimtuneError

LAYOUT = "torchao"
"""The ``layout`` of `slimtune_quantization.json` for folders in this layout (others: ``slimtune``)."""

_GRANULARITY = {"per_channel": "PerRow", "per_tensor": "PerTensor"}
_PARTS = ("qdata", "scale", "zero_point")


def transformers_loadable(scheme: str, granularity: str, bits: int, activations: bool) -> bool:
    """Whether weights quantized this way (arith names: ``symmetric``, ``per_channel``) have a torchao layout."""
    return scheme == "symmetric" and bits == 8 and not activations and granularity in _GRANULARITY


def quantization_config(granularity: str, modules_to_not_convert: list[str]) -> dict:
    """The ``quantization_config`` of ``config.json``: torchao's ``Int8WeightOnlyConfig`` with the granularity,
    as transformers' ``TorchAoConfig.to_dict`` writes it (torchao 0.14+: config version 2).

    ``modules_to_not_convert`` (regular expressions matched as transformers does) replaces transformers' default
    skip list: name every linear layer left in floating point, the output head included.
    """
    granularity_data = {"dim": -1} if granularity == "per_channel" else {}
    return {
        "quant_method": "torchao",
        "quant_type": {"default": {
            "_type": "Int8WeightOnlyConfig",
            "_version": 2,
            "_data": {
                "granularity": {"_type": _GRANULARITY[granularity], "_version": 1, "_data": granularity_data},
                "group_size": None,
                "set_inductor_config": True,
            },
        }},
        "modules_to_not_convert": list(modules_to_not_convert),
        "include_input_output_embeddings": False,
        "untie_embedding_weights": False,
    }


def _prefix(name: str) -> str:
    return f"{name}._weight_"


def to_torchao_state(state: dict[str, torch.Tensor], layers: list[str], dtype: torch.dtype
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) for ``safetensors.torch.save_file`` from a state dict with `QuantizedLinear` layers.

    ``state`` has, for each of ``layers``, ``<layer>.weight`` (int8 codes) and ``<layer>.weight_scale`` (fp32, 0-d
    per tensor or ``(out, 1)`` per channel); every other entry is written as it is. ``dtype`` is the floating-point
    dtype the weights stand for (the model's).
    """
    quantized = set(layers)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    names: list[str] = []
    dtype_name = str(dtype).removeprefix("torch.")
    for key, value in state.items():
        layer, _, leaf = key.rpartition(".")
        if layer in quantized and leaf == "weight_scale":
            continue
        names.append(key)
        if layer not in quantized or leaf != "weight":
            tensors[key] = value
            metadata[key] = json.dumps({"_type": "Tensor"})
            continue
        codes, scale = value, state[f"{layer}.weight_scale"]
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise SlimtuneError(f"{layer}: the torchao layout holds 2-d int8 codes, got {codes.dtype} "
                                f"{tuple(codes.shape)}; quantize with --scheme sym")
        out_features, in_features = codes.shape
        per_tensor = scale.dim() == 0  # QuantizedLinear: 0-d per tensor, (out, 1) per channel
        scale = scale.reshape(1, 1) if per_tensor else scale.reshape(out_features, 1)
        tensors[_prefix(layer) + "qdata"] = codes.contiguous()
        tensors[_prefix(layer) + "scale"] = scale.to(torch.float32).contiguous()
        tensors[_prefix(layer) + "zero_point"] = torch.zeros_like(scale, dtype=torch.int8)
        metadata[key] = json.dumps({
            "_type": "Int8Tensor",
            "_data": {"act_quant_kwargs": None, "reduce_range": False,
                      "block_size": [out_features if per_tensor else 1, in_features],
                      "dtype": {"_type": "torch.dtype", "_data": dtype_name}},
            "_tensor_data_names": ["zero_point", "qdata", "scale"],
        })
    missing = quantized - {n.rpartition(".")[0] for n in names}
    if missing:
        raise SlimtuneError(f"quantized layers {sorted(missing)[:3]} have no codes in the state dict")
    metadata["tensor_names"] = json.dumps(names)
    metadata["format"] = "pt"
    return tensors, metadata


def from_torchao_state(state: dict[str, torch.Tensor], layers: list[str], granularity: str, where: str
                       ) -> dict[str, torch.Tensor]:
    """The `QuantizedLinear` state dict (``weight``, ``weight_scale``) of a file written by `to_torchao_state`."""
    state = dict(state)
    for layer in layers:
        try:
            codes, scale, zero_point = (state.pop(_prefix(layer) + part) for part in _PARTS)
        except KeyError:
            raise SlimtuneError(f"{where}: layer {layer} has no torchao int8 weight ({_prefix(layer)}qdata, "
                                "scale, zero_point); the file does not match slimtune_quantization.json. "
                                "Quantize the model again with slimtune quantize") from None
        if codes.dtype != torch.int8 or bool(zero_point.ne(0).any()):
            raise SlimtuneError(f"{where}: layer {layer} is not symmetric int8 (codes {codes.dtype}, non-zero zero "
                                "points); slimtune loads the torchao int8 weight-only layout with zero points 0. "
                                "Load this folder with transformers instead")
        state[f"{layer}.weight"] = codes
        state[f"{layer}.weight_scale"] = scale.reshape(()) if granularity == "per_tensor" else scale
    return state


def unconverted_linears(model: torch.nn.Module) -> list[str]:
    """``modules_to_not_convert`` for a model whose quantized layers are no longer ``nn.Linear``: the escaped
    names of the linear layers left in floating point."""
    return sorted(re.escape(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
