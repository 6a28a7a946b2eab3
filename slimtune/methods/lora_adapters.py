"""LoRA adapters as peft stores them, apart from the methods that train them (`slimtune.methods.lora`): which layers
to adapt, the adapter folder and the fingerprint of its base, loading an adapter with checks, and merging it into a
plain transformers model:

    adapter_config.json        peft's config, `base_model_name_or_path` = the base folder that was used
    adapter_model.safetensors  the adapter (and any `modules_to_save`, e.g. a new classification head)
    slimtune_base.json         a fingerprint of the frozen base, so an adapter is never silently put on another
                               model (resume, inference and merged export check it)

peft and transformers are imported only inside functions (the method registry imports this module without them).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.families import HFClassifierFamily
from slimtune.quant.four_bit import dequantized_weight, is_quantized


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FINGERPRINT = "slimtune_base.json"
# Classification heads that transformers initialises fresh for a sequence classifier: they must train and be saved.
CLASSIFIER_HEADS = HFClassifierFamily.trainable_heads


def linear_names(model: nn.Module) -> list[str]:
    """Names of every linear layer (nn.Linear and its subclasses, such as bitsandbytes' Linear4bit)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def head_names(model: nn.Module) -> set[str]:
    """Output layers that must never get an adapter by default: the LM head and classification heads."""
    heads = {name for name in CLASSIFIER_HEADS if isinstance(getattr(model, name, None), nn.Module)}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else getattr(model, "lm_head", None)
    heads |= {name for name, m in model.named_modules() if head is not None and m is head}
    return heads


_LAYER_INDEX = re.compile(r"(?:^|\.)\d+\.")


def default_targets(model: nn.Module) -> list[str]:
    """Every attention and MLP projection: the linear layers inside the numbered transformer blocks, as the name
    suffixes after the block index (`self_attn.q_proj`, `mlp.c_fc`, `attention.self.query`), which peft matches
    against the end of each module name."""
    suffixes = set()
    for name in linear_names(model):
        found = list(_LAYER_INDEX.finditer(name))
        if found:
            suffixes.add(name[found[-1].end():])
    return sorted(suffixes)


def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def resolve_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """`lora.target_modules` → what peft gets: plain names and suffixes as they are, globs and `all-linear`
    expanded to full module names. Every pattern must match a linear layer."""
    linears = linear_names(model)
    if not patterns:
        targets = default_targets(model)
        if targets:
            return targets
        patterns = ["all-linear"]
    if patterns == ["all-linear"]:
        heads = head_names(model)
        return [n for n in linears if n not in heads]
    out: list[str] = []
    for pattern in patterns:
        hits = [n for n in linears if _matches(n, pattern)]
        if not hits:
            shown = sorted({_LAYER_INDEX.sub(".N.", n) for n in linears})
            raise SlimtuneError(f"lora.target_modules: {pattern!r} matches no linear layer of this model. Its linear "
                                f"layers (N = block index): {', '.join(shown)}; or use all-linear")
        out.extend(hits if any(c in pattern for c in "*?[") else [pattern])
    return list(dict.fromkeys(out))


def fingerprint(model: nn.Module) -> str:
    """A short hash of every base tensor's name, shape, dtype and a strided sample of its values (at most 4096 per
    tensor): cheap at any model size, and different for another architecture, seed or fine-tune. Adapters and new
    classification heads are left out."""
    h = hashlib.sha256()
    state = {}
    for name, t in model.state_dict().items():
        # With adapters injected, the base tensors are renamed (`q_proj.base_layer.weight`,
        # `score.original_module.weight`); adapters and trained copies are not part of the base.
        # A classification head is freshly initialised at every load (and trained as a module to save).
        if name.split(".")[0] in CLASSIFIER_HEADS:
            continue
        if torch.is_tensor(t) and "lora_" not in name and ".modules_to_save." not in name:
            t = getattr(t, "quantized_data", t)  # torchao NF4: its 4-bit codes
            state[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = t
    for name, t in sorted(state.items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].contiguous().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def load_adapter_weights(model: nn.Module, folder: Path) -> None:
    """Load `folder`'s adapter_model.safetensors into the peft model `model`, refusing (with the differences) an
    adapter whose tensor names or shapes do not fit this model."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(folder) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise SlimtuneError(f"{folder} holds no {ADAPTER_WEIGHTS}: not a peft adapter folder")
    saved = load_file(str(file))
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = [f"{k} {tuple(saved[k].shape)} vs {tuple(expected[k].shape)}" for k in saved
                if k in expected and saved[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        parts = []
        for label, items in (("not in the adapter", missing), ("not in this model", unexpected),
                             ("different shapes (adapter vs model)", reshaped)):
            if items:
                parts.append(f"{len(items)} {label}, e.g. {', '.join(items[:3])}")
        raise SlimtuneError(f"the adapter in {folder} does not fit this base model: {'; '.join(parts)}. Load it on "
                            f"the base model it was trained on")
    set_peft_model_state_dict(model, saved)


def check_base(folder: Path, model: nn.Module, base_name: str) -> None:
    """Refuse to put the adapter in `folder` on a base other than the one it was trained on (when it says)."""
    file = Path(folder) / BASE_FINGERPRINT
    if not file.is_file():
        return  # an adapter made elsewhere: only its names and shapes can be checked
    saved = json.loads(file.read_text())
    if saved.get("fingerprint") != fingerprint(model):
        raise SlimtuneError(f"the adapter in {folder} was trained on a different base model than model={base_name} "
                            f"now holds (its weights differ from those the adapter was trained on). Use the exact "
                            f"base it was trained on")


def merged_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict in fp32 with every adapter's delta added and 4-bit weights dequantized (never
    re-quantized), keyed as the plain transformers model names its tensors."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    skip: set[str] = set()
    for name, module in base.named_modules():
        if any(name.startswith(s) for s in skip):  # inside a layer already merged (its base_layer, its adapters)
            continue
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            weight = dequantized_weight(layer)
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = _merge_one(module, adapter, weight)
            out[f"{name}.weight"] = weight
            if layer.bias is not None:
                out[f"{name}.bias"] = layer.bias.detach().float()
            skip.add(name + ".")
        elif isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[module.active_adapter]
            for key, t in trained.state_dict().items():
                out[f"{name}.{key}"] = t.detach().float()
            skip.add(name + ".")
        elif isinstance(module, nn.Linear) and is_quantized(module.weight):
            out[f"{name}.weight"] = dequantized_weight(module)
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.detach().float()
            skip.add(name + ".")
    for key, t in base.state_dict().items():
        if key not in out and not any(key.startswith(s) for s in skip):
            out[key] = t.detach().float() if t.is_floating_point() else t
    return out


def _merge_one(module, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    # DoRA rescales the merged weight by its magnitude vector; peft computes the delta and scale for both cases.
    delta = module.get_delta_weight(adapter).float()
    if module.use_dora.get(adapter, False):
        dora = module.lora_magnitude_vector[adapter]
        norm = dora.get_weight_norm(weight, delta.to(weight.dtype), scaling=1).detach()
        scale = (dora.weight / norm).view(-1, 1)
        return scale * (weight + delta)
    return weight + delta


def merged_model(peft_model: nn.Module, quantize: str | None = None) -> nn.Module:
    """The base model's plain transformers class in fp32 holding the base plus every adapter's delta (`merged_state`);
    with `quantize` (nf4 or fp4), its linear layers re-quantized to 4 bits (`_quantized`)."""
    plain = _plain_model(peft_model, merged_state(peft_model))
    return _quantized(plain, quantize) if quantize else plain


def _plain_model(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The base model's plain transformers class in fp32, holding `state` (no quantization config)."""
    import copy

    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    config.dtype = torch.float32
    plain = type(base)(config).float()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(plain)]
    if missing or unexpected:
        raise SlimtuneError(f"merging failed: the merged weights do not fit {type(base).__name__} (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(base.generation_config)
    return plain.eval()


def _quantized(model: nn.Module, quant_type: str) -> nn.Module:
    """`model` reloaded with its linear layers in 4 bits (double quantization), as transformers saves and loads
    them with bitsandbytes. Only on request: re-quantizing can erase a small fine-tune's delta."""
    import tempfile

    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["lm_head", *CLASSIFIER_HEADS])
    with tempfile.TemporaryDirectory(prefix="slimtune-merge-") as tmp:
        model.save_pretrained(tmp)
        return type(model).from_pretrained(tmp, quantization_config=config, device_map="cpu", dtype=torch.float32,
                                           local_files_only=True)


def _tied_keys(model: nn.Module) -> set[str]:
    # A tied output head shares the embedding's tensor; the state dict may omit it.
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}
