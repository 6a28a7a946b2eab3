"""Post-training quantization of a causal LM's linear layers to int8 (`slimtune quantize`).

Weights: every ``nn.Linear`` (but the output head) becomes a `QuantizedLinear` holding int8 codes with the scheme's
scales and zero points. With activations, each layer's input range is first observed on calibration batches
(min/max, or a percentile of the values to ignore outliers) and stored as a static int8 input scale and zero point.

A QAT checkpoint (method=qat) quantized with the same scheme and granularity gets exactly the weight codes it
trained against (`FakeQuantLinear` and `QuantizedLinear` share the arithmetic). Symmetric weight-only folders keep
those codes in torchao's int8 weight-only format, which plain transformers also loads (`save_quantized`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.layers import QuantizedLinear, granularity_name, linear_names, replace_linears, scheme_name
from slimtune.quant.load import QUANT_FILE

OBSERVERS = ("minmax", "percentile")
_MAX_QUANTILE_VALUES = 1 << 24  # torch.quantile's input limit; larger inputs are subsampled evenly


@dataclass
class QuantizeSettings:
    scheme: str = "sym"
    """sym or asym (or the long names)."""
    granularity: str = "channel"
    """tensor or channel."""
    bits: int = 8
    activations: bool = False
    """Static int8 input quantization, calibrated."""
    observer: str = "minmax"
    """How calibration turns observed inputs into a range: minmax (the extremes seen) or percentile."""
    percentile: float = 99.99
    """For observer=percentile: the range is the mean over calibration batches of the (100 - p)th and pth
    percentiles of each layer's input values."""
    skip: Sequence[str] = ("lm_head",)

    def __post_init__(self):
        self.scheme = scheme_name(self.scheme)
        self.granularity = granularity_name(self.granularity)
        if self.observer not in OBSERVERS:
            raise SlimtuneError(f"unknown observer {self.observer!r}; choose one of {', '.join(OBSERVERS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise SlimtuneError(f"percentile must be in (50, 100], got {self.percentile}")


class _RangeObserver:
    """Input range of one layer over calibration batches."""

    def __init__(self, settings: QuantizeSettings):
        self.settings = settings
        self.lows: list[float] = []
        self.highs: list[float] = []

    def __call__(self, module, args, output=None) -> None:
        x = args[0].detach().float().flatten()
        if self.settings.observer == "minmax":
            self.lows.append(float(x.min()))
            self.highs.append(float(x.max()))
            return
        if x.numel() > _MAX_QUANTILE_VALUES:
            x = x[:: -(-x.numel() // _MAX_QUANTILE_VALUES)]
        q = self.settings.percentile / 100.0
        bounds = torch.quantile(x, torch.tensor([1.0 - q, q]))
        self.lows.append(float(bounds[0]))
        self.highs.append(float(bounds[1]))

    def range(self) -> tuple[float, float]:
        if self.settings.observer == "minmax":
            return min(self.lows), max(self.highs)
        return sum(self.lows) / len(self.lows), sum(self.highs) / len(self.highs)


@torch.no_grad()
def calibrate(model: nn.Module, names: list[str], batches: Iterable[dict], settings: QuantizeSettings
              ) -> dict[str, tuple[float, float]]:
    """Run ``batches`` (model keyword inputs) through ``model`` and return the observed input range of each layer."""
    observers = {name: _RangeObserver(settings) for name in names}
    handles = [model.get_submodule(name).register_forward_hook(observers[name]) for name in names]
    try:
        n = 0
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
            n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise SlimtuneError("the calibration data gave no batches; pass a file with at least one record")
    return {name: obs.range() for name, obs in observers.items()}


def quantize_model(model: nn.Module, settings: QuantizeSettings, calibration: Iterable[dict] | None = None
                   ) -> list[str]:
    """Replace ``model``'s linear layers by `QuantizedLinear` in place; returns their names.

    ``calibration`` (batches of model inputs) is required with ``settings.activations``.
    """
    names = linear_names(model, settings.skip)
    if not names:
        raise SlimtuneError(f"{type(model).__name__} has no linear layer to quantize (output head and layers tied "
                            f"to embeddings are kept in floating point); nothing would change")
    if settings.activations and calibration is None:
        raise SlimtuneError("static activation quantization (--activations) needs calibration data "
                            "(--calibration FILE) to measure each layer's input range")
    ranges = calibrate(model, names, calibration, settings) if settings.activations else {}
    replace_linears(model, lambda name, linear: QuantizedLinear.from_linear(
        linear, scheme=settings.scheme, granularity=settings.granularity, bits=settings.bits,
        activations=settings.activations, name=name), settings.skip)
    for name, (low, high) in ranges.items():
        model.get_submodule(name).set_input_range(low, high)
    return names


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, settings: QuantizeSettings, layers: list[str],
                   *, overwrite: bool = False, source: str | None = None) -> Path:
    """Write a quantized transformers model as a folder slimtune loads (`slimtune.quant.load`).

    Symmetric 8-bit weight-only folders (per channel or per tensor) are written in torchao's int8 weight-only
    layout (`slimtune.quant.torchao_int8`), with the codes slimtune computed: plain transformers (with torchao)
    loads them too. The other schemes are written in slimtune's own layout. Both have ``slimtune_quantization.json``
    (its ``layout`` says which), which slimtune's loader reads.
    """
    from safetensors.torch import save_file

    from slimtune.atomic import check_new_folder, write_folder_atomically
    from slimtune.quant import torchao_int8

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": "pt"}
    layout = "slimtune"
    if torchao_int8.transformers_loadable(settings.scheme, settings.granularity, settings.bits, settings.activations):
        layout = torchao_int8.LAYOUT
        state, metadata = torchao_int8.to_torchao_state(state, layers, getattr(model, "dtype", torch.float32))
        config.quantization_config = torchao_int8.quantization_config(settings.granularity,
                                                                      torchao_int8.unconverted_linears(model))
    info = {"format": "slimtune-int", "layout": layout, "source": source, "layers": layers,
            **{k: v for k, v in asdict(settings).items() if k != "skip"}}

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
        save_file(state, str(folder / "model.safetensors"), metadata=metadata)
        tokenizer.save_pretrained(folder)
        (folder / QUANT_FILE).write_text(json.dumps(info, indent=2) + "\n")

    return write_folder_atomically(check_new_folder(out_dir, overwrite), write, replace=True)
