"""Typed configuration: dataclasses with a docstring per field, YAML files and `key=value` overrides.

Every setting a user can change is a field of a dataclass below, followed by a string literal that documents it.
That one docstring feeds `slimtune train --help`, error messages and the example YAMLs, so it cannot drift.

Sources are applied in order: defaults → YAML file(s) → command-line `key=value` / `section.key=value`. Values are
type-checked against the field annotations; an unknown key is an error that suggests the closest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from slimtune.errors import SlimtuneError

CPU_ALLOCATOR_MODES = ("keep", "system", "release")


# ---------------------------------------------------------------------------------------------------------------
# The configuration of `slimtune train`
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BadamConfig:
    """Block coordinate descent with Adam (`method=badam`)."""

    switch_every: Optional[int] = None
    """Optimizer steps on one block before switching to the next. Empty: the paper's rule
    min(max(n / (B * D), 50), 100) for n training examples, effective batch B and D blocks."""
    switch_mode: str = "random"
    """Block order: random (reshuffled every pass), ascending, descending or fixed."""
    granularity: str = "layer"
    """What one block is: layer (a transformer block), attn_mlp (attention and MLP separately) or matrix."""
    include_embedding: bool = False
    """Make the token embedding its own block."""
    include_lm_head: bool = False
    """Make the output head its own block (ignored when it is tied to the embedding)."""
    active_modules: list = field(default_factory=list)
    """Parameter-name prefixes that are trained at every step (e.g. a new classification head)."""


@dataclass
class TrainConfig:
    """Everything `slimtune train` needs. Keys are given as `key=value` on the command line or in a YAML file."""

    # --- what to train on -------------------------------------------------------------------------------------
    data: str = ""
    """Training data: a folder written by `slimtune prepare` (model=gpt), or for Hugging Face models an Alpaca
    JSON/JSONL, chat JSONL (messages), plain .txt, or classification JSONL file."""
    out_dir: str = "out"
    """Where checkpoints (step-NNNNNN/), metrics.jsonl and loss.png are written."""
    model: str = "gpt"
    """`gpt` trains slimtune's GPT from scratch (data = a `slimtune prepare` folder) with the n_layer/n_head/n_embd
    settings below. Anything else fine-tunes a Hugging Face model (data = a JSON/JSONL/txt file): a local model
    folder, a .gguf file, or the built-in name smollm2-135m."""
    task: str = "lm"
    """For Hugging Face models: lm (causal language modelling / instruction tuning) or classify (a new
    classification head on JSONL records with text, optional text_pair, and label)."""

    # --- fine-tuning data (Hugging Face models) ------------------------------------------------------------------
    max_seq_len: int = 512
    """Longest training sequence in tokens; longer examples are truncated (and counted in a warning)."""
    packing: bool = False
    """Pack several short examples into each max_seq_len sequence (positions restart per example)."""
    chat_template: str = ""
    """Chat template for instruction data: empty uses the tokenizer's own; chatml or alpaca name a built-in one."""
    column_map: dict = field(default_factory=dict)
    """Rename fields of the data file, e.g. column_map.instruction=question column_map.output=answer."""
    val_data: str = ""
    """A separate validation file; otherwise val_fraction of the data file is held out."""
    val_fraction: float = 0.05
    """Share of the data file's records held out for validation (0 = none) when val_data is empty."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward instead of storing them: less memory, about 30% more compute."""
    weights_dtype: str = "fp32"
    """Storage dtype of the model's weights: fp32, bf16 or fp16 (compute precision is the precision key)."""
    trust_remote_code: bool = False
    """Allow a model folder to run its own Python code (only for folders you trust)."""

    # --- GPT architecture (model=gpt) ---------------------------------------------------------------------------
    n_layer: int = 6
    """Number of transformer blocks."""
    n_head: int = 6
    """Attention heads per block; n_embd must be divisible by it."""
    n_embd: int = 384
    """Width of the residual stream."""
    block_size: int = 256
    """Context length in tokens: the length of every training window."""
    dropout: float = 0.0
    """Dropout probability (0 for pre-training; 0.1+ helps small data sets)."""
    bias: bool = False
    """Use bias in Linear and LayerNorm layers (GPT-2 uses True; False is slightly faster and better)."""

    # --- batches and schedule ----------------------------------------------------------------------------------
    batch_size: int = 12
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (per process under DDP)."""
    max_iters: int = 2000
    """Optimizer steps to train for."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup_iters."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_iters: int = 100
    """Steps of linear warmup from 0 to lr."""
    lr_decay_iters: Optional[int] = None
    """Step at which the cosine decay reaches min_lr. Empty: max_iters."""
    decay_lr: bool = True
    """Use the warmup + cosine schedule; false keeps lr constant."""

    # --- optimizer ---------------------------------------------------------------------------------------------
    method: str = "full"
    """What is trained and how it is stepped: full (AdamW on every parameter) or badam."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (never to biases or norms)."""
    decay_embeddings: bool = True
    """Apply weight decay to embedding matrices too (nanoGPT does)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    badam: BadamConfig = field(default_factory=BadamConfig)
    """BAdam settings (used when method=badam)."""

    # --- evaluation, logging, checkpoints ----------------------------------------------------------------------
    eval_interval: int = 250
    """Evaluate train/val loss every this many steps (and at the end); 0 disables evaluation."""
    eval_iters: int = 20
    """Batches averaged per loss estimate."""
    log_interval: int = 10
    """Write a metrics.jsonl line every this many steps."""
    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at evaluations and at the end)."""
    keep_last: int = 3
    """Keep only the newest N checkpoints; 0 keeps all."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in out_dir if there is one; never: start fresh;
    must: fail if there is none; or a path to a step-NNNNNN folder."""
    seed: int = 1337
    """Seed for initialisation, data order and dropout."""
    progress: bool = True
    """Show a progress bar."""
    plot: bool = True
    """Write loss.png at the end of training."""

    # --- hardware ----------------------------------------------------------------------------------------------
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), or an explicit torch device such as cpu, cuda, cuda:1, mps."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware computes bf16 natively, else fp32), fp32, bf16 or fp16."""
    compile: bool = False
    """Compile the model with torch.compile (slow start, faster steps on GPUs; on CPU it keeps matmul=aten)."""
    matmul: str = "auto"
    """Kernel for nn.Linear products on CPU in fp32: auto (time torch's BLAS against oneDNN once per machine and
    use the faster; oneDNN was ~2x faster on an AMD Zen 5 CPU), onednn, or aten (torch's default)."""
    threads: int = 0
    """CPU threads for torch (0: leave torch's default)."""
    cpu_shards: int = 0
    """CPU only: split each micro-batch by rows into this many shards that run side by side on as many threads,
    one core each, their gradients added in a fixed order (faster for small models, whose single ops cannot keep
    several cores busy; one extra gradient copy per extra shard). 0 = auto (one shard per thread for model=gpt,
    method=full, dropout=0, without DDP or compile, while the extra copies fit in 256 MiB); 1 = off."""
    cpu_allocator: str = "keep"
    """How glibc (Linux) treats freed CPU buffers: keep (reuse them: no page faults per step, up to ~5% faster,
    peak as with glibc's defaults), system (glibc's defaults), or release (return large buffers to the OS: ~20%
    lower peak, 1.3-1.7x slower)."""

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "max_iters", "block_size", "n_layer", "n_head", "n_embd")
        for key in positive:
            if getattr(self, key) <= 0:
                raise SlimtuneError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise SlimtuneError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (each head gets n_embd/n_head dims)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise SlimtuneError(f"dropout must be in [0, 1), got {self.dropout}")
        for key in ("eval_interval", "log_interval", "save_interval", "keep_last", "warmup_iters", "threads",
                    "cpu_shards"):
            if getattr(self, key) < 0:
                raise SlimtuneError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.eval_iters <= 0:
            raise SlimtuneError(f"eval_iters must be a positive integer, got {self.eval_iters}")
        if self.lr <= 0 or self.min_lr < 0:
            raise SlimtuneError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.grad_clip < 0:
            raise SlimtuneError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        _check_choice("method", self.method, ("full", "badam"))
        _check_choice("task", self.task, ("lm", "classify"))
        _check_choice("weights_dtype", self.weights_dtype, ("fp32", "bf16", "fp16"))
        if self.max_seq_len <= 0:
            raise SlimtuneError(f"max_seq_len must be a positive integer, got {self.max_seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise SlimtuneError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.model == "gpt" and self.task != "lm":
            raise SlimtuneError("task=classify needs a Hugging Face model (model=PATH); model=gpt is a language model")
        _check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check_choice("matmul", self.matmul, ("auto", "onednn", "aten"))
        _check_choice("cpu_allocator", self.cpu_allocator, CPU_ALLOCATOR_MODES)
        _check_choice("badam.switch_mode", self.badam.switch_mode, ("random", "ascending", "descending", "fixed"))
        _check_choice("badam.granularity", self.badam.granularity, ("layer", "attn_mlp", "matrix"))
        if self.badam.switch_every is not None and self.badam.switch_every < 1:
            raise SlimtuneError(f"badam.switch_every must be >= 1, got {self.badam.switch_every}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
        raise SlimtuneError(f"{key}={value!r} is not one of {', '.join(choices)}.{did_you_mean}")


# ---------------------------------------------------------------------------------------------------------------
# Generic machinery: field docs, YAML, overrides, type checks
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to the string literal written right below it in the source."""
    source = textwrap.dedent(inspect.getsource(cls))
    class_node = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    body = class_node.body
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or empty)"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Check `value` against annotation `tp`; convert only where no information is lost (int → float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0], source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "6e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. resume=000200 or a numeric path component
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise SlimtuneError(
        f"{source}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}). "
        f"Run `slimtune train --help` to see every key with its type."
    )


def _unknown_key(key: str, cls: type, prefix: str, source: str) -> SlimtuneError:
    valid = [f.name for f in dataclasses.fields(cls)]
    qualified = [prefix + v for v in valid]
    hint = difflib.get_close_matches(prefix + key, qualified, n=1, cutoff=0.5)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    return SlimtuneError(
        f"{source}: unknown config key {prefix + key!r}.{did_you_mean} Run `slimtune train --help` for all keys."
    )


def _apply(values: dict[str, Any], cls: type, current: dict[str, Any], prefix: str, source: str) -> None:
    """Merge the nested mapping `values` into `current` (a dict of field values of `cls`), checking each key."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = _resolved_types(cls)
    for key, value in values.items():
        key = str(key)
        if key not in names:
            raise _unknown_key(key, cls, prefix, source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise SlimtuneError(f"{source}: {prefix + key} is a section; give its keys as {prefix + key}.KEY=VALUE")
            _apply(value, tp, current[key], prefix + key + ".", source)
        else:
            current[key] = _coerce(prefix + key, value, tp, source)


def _defaults(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = _defaults(hints[f.name])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        else:
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _build(cls: type, values: dict[str, Any]):
    hints = _resolved_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = values[f.name]
        kwargs[f.name] = _build(hints[f.name], v) if dataclasses.is_dataclass(hints[f.name]) else v
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` → (["section", "key"], value parsed as a YAML scalar: 3 → int, 1e-3 → float, true → bool)."""
    if "=" not in text:
        raise SlimtuneError(f"expected key=value, got {text!r} (e.g. batch_size=16 or badam.switch_mode=ascending)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise SlimtuneError(f"empty key in {text!r}")
    if raw == "":
        value: Any = None
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and value != raw:
            value = raw
        if value is None and raw.lower() not in ("null", "none", "~"):
            value = raw
    return key.split("."), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from `path`, with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise SlimtuneError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SlimtuneError(f"{path}: a config file must be a mapping of key: value, got {type(data).__name__}")
    return data


def make_config(cls: type, yaml_files: list[str] = (), overrides: list[str] = (), base: dict | None = None):
    """Build a `cls` instance from defaults, an optional `base` mapping, YAML files and `key=value` overrides."""
    values = _defaults(cls)
    if base:
        _apply(base, cls, values, "", "checkpoint config")
    for path in yaml_files:
        _apply(load_yaml(path), cls, values, "", str(path))
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        _apply({parts[0]: nested}, cls, values, "", "command line")
    return _build(cls, values)


def to_dict(cfg) -> dict[str, Any]:
    """The config as plain nested dicts (what checkpoints and metrics record)."""
    return dataclasses.asdict(cfg)


def help_text(cls: type, prefix: str = "") -> str:
    """One line per key: name, type, default, docstring — the body of `slimtune train --help`."""
    lines = []
    hints = _resolved_types(cls)
    docs = field_docs(cls)
    defaults = _defaults(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append("")
            lines.append(f"  [{prefix}{f.name}] {docs.get(f.name, '')}")
            lines.append(help_text(tp, prefix + f.name + "."))
            continue
        default = defaults[f.name]
        shown = "(empty)" if default in (None, "", []) else repr(default) if isinstance(default, str) else default
        lines.append(f"  {prefix}{f.name}  ({_type_name(tp)}, default {shown})")
        lines.append(textwrap.fill(docs.get(f.name, ""), width=110, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
