"""Loading quantized model folders for slimtune's own inference (chat, generate, eval, quantize).

Two formats, recognised from the folder (`quantized_format`):

* ``bitnet``: a BitNet export (`slimtune.methods.bitnet.export_bitnet`, or any folder in transformers' BitNet
  ``bitlinear`` format): ``config.json`` has ``quantization_config.quant_method == "bitnet"``. The packed ternary
  weights are unpacked once into `PackedBitLinear` layers. transformers itself also loads these folders.
* ``slimtune-int``: a `slimtune quantize` output: ``slimtune_quantization.json`` (scheme, layers, ``layout``)
  next to the config, int8 weight codes with their scales in ``model.safetensors`` (`QuantizedLinear`). Layout
  ``torchao`` (symmetric 8-bit weight-only, per channel or per tensor): torchao's int8 weight-only tensors, and
  ``config.json`` has the matching torchao ``quantization_config``, so transformers (with torchao) loads the
  folder too (`slimtune.quant.torchao_int8`); slimtune reads it without torchao. Layout ``slimtune`` (the other
  schemes; folders written before the layout existed): slimtune's own keys, only slimtune loads it.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError

QUANT_FILE = "slimtune_quantization.json"
"""The description of a `slimtune quantize` folder: scheme, granularity, bits, activations, quantized layers."""


def quantized_format(folder: str | Path) -> str | None:
    """``"bitnet"``, ``"slimtune-int"`` or None (an ordinary folder)."""
    folder = Path(folder)
    if (folder / QUANT_FILE).is_file():
        return "slimtune-int"
    config = folder / "config.json"
    if config.is_file():
        qc = json.loads(config.read_text()).get("quantization_config") or {}
        if qc.get("quant_method") == "bitnet":
            return "bitnet"
    return None


def _skipped(name: str, patterns: list[str]) -> bool:
    # transformers' documented matching of modules_to_not_convert: a pattern matches from the start up to a module
    # boundary (as a regex), or as a suffix of the module name.
    return any(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(p) for p in patterns)


def _empty_model(folder: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    config = AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
    qc = getattr(config, "quantization_config", None)
    config = copy.deepcopy(config)
    if qc is not None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.to(dtype), qc


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise SlimtuneError(f"{folder}/model.safetensors does not fit its config: missing "
                            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()


def load_bitnet_folder(folder: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A transformers model from a packed BitNet folder, its BitNet layers as `PackedBitLinear` (eval mode)."""
    from safetensors.torch import load_file

    from slimtune.quant.bitnet import PackedBitLinear
    from slimtune.quant.pack import unpack_ternary

    folder = Path(folder)
    model, qc = _empty_model(folder, dtype, trust_remote_code)
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("linear_class", "bitlinear") != "bitlinear" or qc.get("quantization_mode", "offline") != "offline":
        raise SlimtuneError(f"{folder}: slimtune loads BitNet folders with linear_class=bitlinear, "
                            f"quantization_mode=offline; this one has {qc.get('linear_class')}/"
                            f"{qc.get('quantization_mode')}. Load it with transformers instead")
    skip = qc.get("modules_to_not_convert") or ["lm_head"]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]
    for name in names:
        linear = model.get_submodule(name)
        model.set_submodule(name, PackedBitLinear(linear.in_features, linear.out_features,
                                                  use_rms_norm=bool(qc.get("use_rms_norm")),
                                                  rms_norm_eps=qc.get("rms_norm_eps", 1e-6),
                                                  bias=linear.bias is not None, dtype=dtype))
    state = load_file(str(folder / "model.safetensors"))
    for name in names:
        out_features = model.get_submodule(name).out_features
        state[f"{name}.weight"] = unpack_ternary(state[f"{name}.weight"], out_features, name=name)
        state[f"{name}.weight_scale"] = state[f"{name}.weight_scale"].float()
    _load_state(model, state, folder)
    return model.eval()


def load_int_folder(folder: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A transformers model from a `slimtune quantize` folder, with `QuantizedLinear` layers (eval mode)."""
    from safetensors.torch import load_file

    from slimtune.quant.layers import QuantizedLinear

    folder = Path(folder)
    info = json.loads((folder / QUANT_FILE).read_text())
    model, _ = _empty_model(folder, dtype, trust_remote_code)
    for name in info["layers"]:
        linear = model.get_submodule(name)
        model.set_submodule(name, QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                                  scheme=info["scheme"], granularity=info["granularity"],
                                                  bits=info["bits"], activations=info["activations"], dtype=dtype))
    state = load_file(str(folder / "model.safetensors"))
    layout = info.get("layout", "slimtune")
    if layout == "torchao":
        from slimtune.quant.torchao_int8 import from_torchao_state

        state = from_torchao_state(state, info["layers"], info["granularity"], f"{folder}/model.safetensors")
    elif layout != "slimtune":
        raise SlimtuneError(f"{folder}/{QUANT_FILE} has an unknown layout {layout!r} (slimtune or torchao); it was "
                            "written by a newer slimtune: upgrade slimtune, or quantize the model again")
    _load_state(model, state, folder)
    return model.eval()


def load_quantized_causal_lm(folder: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The model of a quantized folder (see `quantized_format`)."""
    loaders = {"bitnet": load_bitnet_folder, "slimtune-int": load_int_folder}
    kind = quantized_format(folder)
    if kind is None:
        raise SlimtuneError(f"{folder} is not a quantized model folder")
    return loaders[kind](folder, dtype, trust_remote_code)
