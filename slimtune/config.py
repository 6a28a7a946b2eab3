"""Typed configuration: dataclasses with a docstring per field, YAML files and `key=value` overrides.

Every setting a user can change is a field of a dataclass below, followed by a string literal that documents it.
That one docstring feeds `slimtune train --help`, error messages and the example YAMLs, so it cannot drift.

`TrainConfig` has a few top-level keys people type on every command line (model, data, method, strategy, lr,
batch_size, max_iters or num_epochs, out_dir, resume, seed) and one section per concern (`gpt.*`, `hf.*`,
`dataset.*`, `optim.*`, `eval.*`, `log.*`, `ckpt.*`, `runtime.*`). Each method and strategy brings its own section
(`badam.*`, ...): its `config_cls`, found through the registries in `slimtune.registry`.

Sources are applied in order: defaults → YAML file(s) → command-line `key=value` / `section.key=value`. Values are
type-checked against the field annotations; dict-valued keys merge key by key; an unknown key is an error that
suggests the closest valid key; a key that does not apply to the chosen model, method or strategy is an error.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from slimtune.errors import SlimtuneError

CPU_ALLOCATOR_MODES = ("keep", "system", "release")
TRACKER_NAMES = ("tensorboard", "wandb", "mlflow")


# ---------------------------------------------------------------------------------------------------------------
# The configuration of `slimtune train`, in sections
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GPTSection:
    """slimtune's GPT trained from scratch (model=gpt)."""

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

    def __post_init__(self):
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, key) <= 0:
                raise SlimtuneError(f"gpt.{key} must be a positive integer, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise SlimtuneError(f"gpt.n_embd={self.n_embd} must be divisible by gpt.n_head={self.n_head} "
                                f"(each head gets n_embd/n_head dims)")
        if not 0.0 <= self.dropout < 1.0:
            raise SlimtuneError(f"gpt.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class HFSection:
    """A Hugging Face model (model=PATH, a .gguf file or smollm2-135m)."""

    task: str = "lm"
    """lm (causal language modelling / instruction tuning) or classify (a new classification head on JSONL
    records with text, optional text_pair, and label)."""
    weights_dtype: str = "fp32"
    """Storage dtype of the model's weights: fp32, bf16 or fp16 (compute precision is runtime.precision)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward instead of storing them: less memory, about 30% more compute."""
    trust_remote_code: bool = False
    """Allow a model folder to run its own Python code (only for folders you trust)."""

    def __post_init__(self):
        check_choice("hf.task", self.task, ("lm", "classify"))
        check_choice("hf.weights_dtype", self.weights_dtype, ("fp32", "bf16", "fp16"))


@dataclass
class DatasetSection:
    """Fine-tuning data files (Hugging Face models)."""

    max_seq_len: int = 512
    """Longest training sequence in tokens; longer examples are truncated (and counted in a warning)."""
    packing: bool = False
    """Pack several short examples into each max_seq_len sequence (positions restart per example)."""
    chat_template: str = ""
    """Chat template for instruction data: empty uses the tokenizer's own; chatml or alpaca name a built-in one."""
    column_map: dict = field(default_factory=dict)
    """Rename fields of the data file, e.g. dataset.column_map.instruction=question dataset.column_map.output=answer
    (each key is merged into the map)."""
    role_map: dict = field(default_factory=dict)
    """Map other role names of chat data to system, user or assistant, e.g. dataset.role_map.tutor=assistant (human,
    gpt, bot, model and chatgpt are known already; each key is merged into the map)."""
    weights: list = field(default_factory=list)
    """Mixing weights of several data files (data=[a.jsonl,b.parquet] dataset.weights=[0.7,0.3]): the share of
    training examples drawn from each. Empty: every example of every file once per epoch."""
    val_data: str = ""
    """A separate validation file; it replaces the held-out split of the training file."""
    val_fraction: Optional[float] = None
    """Share of the data file's records held out for validation (0 = none). Empty: 0.05, or 0 with val_data."""

    def __post_init__(self):
        if self.max_seq_len <= 0:
            raise SlimtuneError(f"dataset.max_seq_len must be a positive integer, got {self.max_seq_len}")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise SlimtuneError(f"dataset.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_data and self.val_fraction:
            raise SlimtuneError(f"dataset.val_data={self.val_data} replaces the held-out split; remove "
                                f"dataset.val_fraction={self.val_fraction} (or set it to 0)")
        for w in self.weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise SlimtuneError(f"dataset.weights={self.weights}: every weight must be a number >= 0, got {w!r}")
        if self.weights and sum(self.weights) <= 0:
            raise SlimtuneError(f"dataset.weights={self.weights} sum to {sum(self.weights)}; they must sum to a "
                                "positive number (they are normalised to shares)")

    @property
    def held_out_fraction(self) -> float:
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.0 if self.val_data else 0.05


@dataclass
class OptimSection:
    """The optimizer and the learning-rate schedule (every method builds its optimizer from these)."""

    name: str = "adamw"
    """Optimizer: adamw (torch's AdamW, fused where the device has it), adamw8bit or paged_adamw8bit (bitsandbytes:
    8-bit moments, 2 bytes per trainable parameter instead of 8; needs the qlora extra). Every method uses it."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (per process under DDP)."""
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
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_iters: int = 100
    """Steps of linear warmup from 0 to lr."""
    lr_decay_iters: Optional[int] = None
    """Step at which the cosine decay reaches min_lr. Empty: max_iters."""
    decay_lr: bool = True
    """Use the warmup + cosine schedule; false keeps lr constant."""

    def __post_init__(self):
        check_choice("optim.name", self.name, ("adamw", "adamw8bit", "paged_adamw8bit"))
        if self.grad_accum <= 0:
            raise SlimtuneError(f"optim.grad_accum must be a positive integer, got {self.grad_accum}")
        if self.warmup_iters < 0:
            raise SlimtuneError(f"optim.warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.min_lr < 0:
            raise SlimtuneError(f"optim.min_lr must be >= 0, got {self.min_lr}")
        if self.grad_clip < 0:
            raise SlimtuneError(f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            raise SlimtuneError(f"optim.lr_decay_iters must be a positive integer, got {self.lr_decay_iters}")


@dataclass
class EvalSection:
    """Evaluation of the train and validation loss during training."""

    interval: int = 250
    """Evaluate every this many steps (and at the end); 0 disables evaluation."""
    iters: int = 20
    """Batches per loss estimate and split."""

    def __post_init__(self):
        if self.interval < 0:
            raise SlimtuneError(f"eval.interval must be >= 0, got {self.interval}")
        if self.iters <= 0:
            raise SlimtuneError(f"eval.iters must be a positive integer, got {self.iters}")


@dataclass
class LogSection:
    """What a run prints and writes besides checkpoints."""

    interval: int = 10
    """Write a metrics.jsonl line every this many steps."""
    progress: bool = True
    """Show a progress bar."""
    plot: bool = True
    """Write loss.png at the end of training."""
    report_to: list = field(default_factory=list)
    """Experiment trackers that get the same records as metrics.jsonl: any of tensorboard, wandb, mlflow
    (comma-separated; none or empty: only metrics.jsonl). Their files go to out_dir/tensorboard, out_dir/wandb and
    out_dir/mlruns; each needs its extra, e.g. pip install 'slimtune[tensorboard]'."""

    def __post_init__(self):
        if self.interval < 0:
            raise SlimtuneError(f"log.interval must be >= 0, got {self.interval}")
        if self.report_to in (["none"], ["None"]):
            self.report_to = []
        for name in self.report_to:
            check_choice("log.report_to", name, TRACKER_NAMES)


@dataclass
class CkptSection:
    """Checkpoints (step-NNNNNN folders in out_dir)."""

    interval: int = 0
    """Save a checkpoint every this many steps (0: only at evaluations and at the end)."""
    keep_last: int = 3
    """Keep only the newest N checkpoints of this run; 0 keeps all."""

    def __post_init__(self):
        for key in ("interval", "keep_last"):
            if getattr(self, key) < 0:
                raise SlimtuneError(f"ckpt.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class RuntimeSection:
    """Where and how the computation runs."""

    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), or an explicit torch device such as cpu, cuda, cuda:1, mps."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware computes bf16 natively, decided by capability and a measurement;
    else fp32), fp32, bf16 or fp16."""
    compile: bool = False
    """Compile what runs in the forward with torch.compile (slow start, faster steps on GPUs)."""
    threads: int = 0
    """CPU threads for torch (0: leave torch's default)."""
    matmul: str = "auto"
    """Kernel for nn.Linear products on CPU in fp32: auto (time torch's BLAS against oneDNN once per machine and
    use the faster), onednn, or aten (torch's default)."""
    cpu_allocator: str = "keep"
    """How glibc (Linux) treats freed CPU buffers: keep (reuse them: no page faults per step), system (glibc's
    defaults), or release (return large buffers to the OS: lower peak, slower; see docs/BENCHMARKS.md)."""
    check_fit: bool = True
    """Before loading the model, refuse a run whose predicted peak memory (see `slimtune estimate`) exceeds the
    device's memory; false starts it anyway."""

    def __post_init__(self):
        check_choice("runtime.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        check_choice("runtime.matmul", self.matmul, ("auto", "onednn", "aten"))
        check_choice("runtime.cpu_allocator", self.cpu_allocator, CPU_ALLOCATOR_MODES)
        if self.threads < 0:
            raise SlimtuneError(f"runtime.threads must be >= 0, got {self.threads}")


@dataclass
class TrainConfig:
    """Everything `slimtune train` needs. Keys are given as `key=value` on the command line or in a YAML file;
    keys of a section as `section.key=value` (or nested in YAML)."""

    model: str = "gpt"
    """`gpt` trains slimtune's GPT from scratch (data = a `slimtune prepare` folder; settings in gpt.*). Anything
    else fine-tunes a Hugging Face model (data = JSON/JSONL/txt/parquet files; settings in hf.* and dataset.*): a
    local model folder, a .gguf file, or the built-in name smollm2-135m."""
    data: str | list = ""
    """Training data: a folder written by `slimtune prepare` (model=gpt), or for Hugging Face models an Alpaca
    JSON/JSONL, chat JSONL (messages, or ShareGPT conversations), plain .txt, or classification JSONL file; a
    .parquet or .arrow file, a `datasets` save_to_disk folder or a folder of parquet shards (the datasets extra);
    or several as a list, data=[a.jsonl,b.parquet] (see dataset.weights). In YAML a list entry may also be a
    mapping {path: FILE, column_map: {...}, role_map: {...}} with that file's own maps."""
    method: str = "full"
    """What is trained and how it is stepped: full (AdamW on every parameter), badam, or another registered
    method (its settings are the section of the same name)."""
    strategy: str = "auto"
    """Where tensors live and how gradients meet: auto (ddp under torchrun, else cpu_shards where it applies, else
    single), single, ddp, cpu_shards."""
    lr: float = 1e-3
    """Peak learning rate, reached after optim.warmup_iters."""
    batch_size: int = 12
    """Sequences per micro-batch (per process under DDP)."""
    max_iters: int = 2000
    """Optimizer steps to train for (or give num_epochs instead)."""
    num_epochs: Optional[float] = None
    """Passes over the training data instead of max_iters: the run takes ceil(num_epochs * batches per epoch /
    optim.grad_accum) steps, and the schedule is computed for that length. Empty: use max_iters."""
    out_dir: str = "out"
    """Where checkpoints (step-NNNNNN/), metrics.jsonl and loss.png are written. A fresh run (resume=never, or no
    checkpoint) moves another run's results into out_dir/previous-runs/ first."""
    resume: str = "auto"
    """auto: continue from the newest intact checkpoint in out_dir if there is one; never: start fresh; must: fail
    if there is none; or a path to a step-NNNNNN folder."""
    seed: int = 1337
    """Seed for initialisation, data order and dropout."""

    gpt: GPTSection = field(default_factory=GPTSection)
    """slimtune's GPT architecture (model=gpt only)."""
    hf: HFSection = field(default_factory=HFSection)
    """Hugging Face models (model=PATH only)."""
    dataset: DatasetSection = field(default_factory=DatasetSection)
    """Fine-tuning data files (Hugging Face models only)."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer and learning-rate schedule."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Evaluation during training."""
    log: LogSection = field(default_factory=LogSection)
    """Logging."""
    ckpt: CkptSection = field(default_factory=CkptSection)
    """Checkpoints."""
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    """Device, precision, threads, compilation."""

    plugins: dict = field(default_factory=dict, metadata={"internal": True})
    """The chosen method's and strategy's own sections (filled by make_config; read them with `section(name)`)."""

    def __post_init__(self):
        for key in ("batch_size", "max_iters"):
            if getattr(self, key) <= 0:
                raise SlimtuneError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.lr <= 0:
            raise SlimtuneError(f"lr must be > 0, got {self.lr}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise SlimtuneError(f"num_epochs must be > 0, got {self.num_epochs}")
        files = len(self.data) if isinstance(self.data, list) else 1
        if self.dataset.weights and len(self.dataset.weights) != files:
            raise SlimtuneError(f"dataset.weights={self.dataset.weights} has {len(self.dataset.weights)} weights for "
                                f"{files} data file(s); give one weight per entry of data=")

    @property
    def is_gpt(self) -> bool:
        return self.model == "gpt"

    def __getattr__(self, name: str):
        # `cfg.badam` reads a plug-in's section like any other (only reached for names that are not fields).
        if name.startswith("_") or name == "plugins":
            raise AttributeError(name)
        if name in plugin_sections():
            return self.section(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def section(self, name: str):
        """The config section of a plug-in (method or strategy) by its registered name."""
        if name not in self.plugins:
            self.plugins[name] = plugin_sections()[name]()
        return self.plugins[name]


def plugin_sections() -> dict[str, type]:
    """Config dataclasses of every registered method and strategy, by the name that selects them."""
    from slimtune.registry import METHODS, STRATEGIES

    out = {}
    for registry in (METHODS, STRATEGIES):
        for name, cls in registry.classes().items():
            if getattr(cls, "config_cls", None) is not None:
                out[name] = cls.config_cls
    return out


# Keys renamed when the config got sections: the old name works for one release, with a warning.
RENAMED = {
    **{k: f"gpt.{k}" for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")},
    **{k: f"hf.{k}" for k in ("task", "weights_dtype", "gradient_checkpointing", "trust_remote_code")},
    **{k: f"dataset.{k}" for k in ("max_seq_len", "packing", "chat_template", "column_map", "val_data",
                                   "val_fraction")},
    **{k: f"optim.{k}" for k in ("grad_accum", "weight_decay", "decay_embeddings", "beta1", "beta2", "grad_clip",
                                 "min_lr", "warmup_iters", "lr_decay_iters", "decay_lr")},
    "eval_interval": "eval.interval", "eval_iters": "eval.iters",
    "log_interval": "log.interval", "progress": "log.progress", "plot": "log.plot",
    "save_interval": "ckpt.interval", "keep_last": "ckpt.keep_last",
    **{k: f"runtime.{k}" for k in ("device", "precision", "compile", "threads", "matmul", "cpu_allocator")},
}
REMOVED_IN = "slimtune 0.3"

# The names other trainers give these keys (Hugging Face Trainer's report_to, ...): accepted for good, no warning.
ALIASES = {"report_to": "log.report_to", "data_weights": "dataset.weights", "role_map": "dataset.role_map",
           "epochs": "num_epochs"}


def _rename_old_keys(values: dict, source: str) -> dict:
    """Old flat keys → their section (with a warning); `cpu_shards=N` → the cpu_shards strategy."""
    out: dict = {}
    for key, value in values.items():
        key = str(key)
        if key == "cpu_shards" and isinstance(value, int) and not isinstance(value, bool):
            new = {0: {}, 1: {"strategy": "single"}}.get(value, {"strategy": "cpu_shards", "cpu_shards": {"n": value}})
            print(f"warning: {source}: cpu_shards={value} is now {' '.join(_flat_items(new)) or 'strategy=auto'}; "
                  f"the old key is removed in {REMOVED_IN}", file=sys.stderr)
            _deep_merge(out, new)
            continue
        if key in ALIASES:
            target = ALIASES[key].split(".")
            _deep_merge(out, {target[0]: {target[1]: value}} if len(target) == 2 else {target[0]: value})
            continue
        if key in RENAMED:
            section, name = RENAMED[key].split(".")
            print(f"warning: {source}: key {key!r} is now {RENAMED[key]!r}; the old name is removed in {REMOVED_IN}",
                  file=sys.stderr)
            _deep_merge(out, {section: {name: value}})
            continue
        _deep_merge(out, {key: value})
    return out


def _flat_items(nested: dict, prefix: str = "") -> list[str]:
    items = []
    for k, v in nested.items():
        if isinstance(v, dict):
            items += _flat_items(v, f"{prefix}{k}.")
        else:
            items.append(f"{prefix}{k}={v}")
    return items


def _deep_merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def check_applicable(cfg: TrainConfig, given: set[str], source_of: dict[str, str]) -> None:
    """A key the user gave that does not apply to the chosen model, method or strategy is an error."""
    from slimtune.registry import METHODS, STRATEGIES

    methods, strategies = set(METHODS.names()), set(STRATEGIES.names())
    METHODS.get(cfg.method)  # unknown names are errors that list the registered ones
    if cfg.strategy != "auto":
        STRATEGIES.get(cfg.strategy)
    for key in sorted(given):
        section = key.split(".")[0]
        where = source_of.get(key, "command line")
        if section == "gpt" and not cfg.is_gpt:
            raise SlimtuneError(f"{where}: {key} sets slimtune's GPT architecture, but model={cfg.model} is a Hugging "
                                f"Face model whose architecture comes from its files; remove {key}")
        if section in ("hf", "dataset") and cfg.is_gpt:
            raise SlimtuneError(f"{where}: {key} applies to Hugging Face models, but model=gpt trains slimtune's GPT "
                                f"on a `slimtune prepare` folder; remove {key} or set model=PATH")
        if section in methods and section != cfg.method and section not in METHODS.get(cfg.method).also_reads:
            raise SlimtuneError(f"{where}: {key} applies to method={section}, but method={cfg.method}; remove it or "
                                f"set method={section}")
        if section in strategies and section != cfg.strategy:
            raise SlimtuneError(f"{where}: {key} applies to strategy={section}, but strategy={cfg.strategy}; remove "
                                f"it or set strategy={section}")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
        raise SlimtuneError(f"{key}={value!r} is not one of {', '.join(choices)}.{did_you_mean}")


# ---------------------------------------------------------------------------------------------------------------
# Generic machinery: field docs, YAML, overrides, type checks
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` (its bases' fields included) to the string literal written right below it
    in the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
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
        optional = " (or empty)" if type(None) in typing.get_args(tp) else ""
        return " or ".join(_type_name(a) for a in args) + optional
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
        for option in inner:  # e.g. data: one path, or a list of them; the first type that takes the value wins
            try:
                return _coerce(key, value, option, source)
            except SlimtuneError:
                continue
        raise SlimtuneError(f"{source}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}). "
                            f"Run `slimtune train --help` to see every key with its type.")
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


def _unknown_key(key: str, cls: type, prefix: str, source: str, extra: tuple[str, ...] = ()) -> SlimtuneError:
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    valid = [prefix + f.name for f in fields] + list(extra)
    hints = _resolved_types(cls)
    # At the top level, a section's key given without its section (report_to for log.report_to) is found as well.
    in_sections = [] if prefix else [f"{f.name}.{g.name}" for f in fields if dataclasses.is_dataclass(hints[f.name])
                                     for g in dataclasses.fields(hints[f.name])]
    hint = [k for k in in_sections if k.endswith("." + key)][:1] or difflib.get_close_matches(
        prefix + key, valid + in_sections, n=1, cutoff=0.5)
    if not hint and not prefix and key in RENAMED:
        hint = [RENAMED[key]]
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    return SlimtuneError(
        f"{source}: unknown config key {prefix + key!r}.{did_you_mean} Run `slimtune train --help` for all keys."
    )


def _apply(values: dict[str, Any], cls: type, current: dict[str, Any], prefix: str, source: str,
           given: dict[str, str] | None = None, plugins: dict[str, dict] | None = None) -> None:
    """Merge the nested mapping `values` into `current` (a dict of field values of `cls`), checking each key.
    `given` collects the dotted keys set (with their source); `plugins` holds the values of plug-in sections
    (top level only), keyed by plug-in name."""
    names = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = _resolved_types(cls)
    plugin_types = plugin_sections() if plugins is not None else {}
    for key, value in values.items():
        key = str(key)
        if key in plugin_types and key not in names:
            if not isinstance(value, dict):
                raise SlimtuneError(f"{source}: {key} is a section; give its keys as {key}.KEY=VALUE")
            _apply(value, plugin_types[key], plugins.setdefault(key, _defaults(plugin_types[key])), key + ".",
                   source, given)
            continue
        if key not in names:
            raise _unknown_key(key, cls, prefix, source, tuple(plugin_types))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise SlimtuneError(f"{source}: {prefix + key} is a section; give its keys as {prefix + key}.KEY=VALUE")
            _apply(value, tp, current[key], prefix + key + ".", source, given)
            continue
        coerced = _coerce(prefix + key, value, tp, source)
        if isinstance(coerced, dict) and isinstance(current.get(key), dict):
            current[key] = {**current[key], **coerced}  # column_map.a=x then column_map.b=y keeps both
        else:
            current[key] = coerced
        if given is not None:
            given[prefix + key] = source


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
    """Build a `cls` instance from defaults, an optional `base` mapping (a checkpoint's config), YAML files and
    `key=value` overrides. For `TrainConfig`, plug-in sections and renamed keys are handled, and keys that do not
    apply to the chosen model, method or strategy are errors."""
    train = cls is TrainConfig
    values = _defaults(cls)
    plugins: dict[str, dict] | None = {} if train else None
    given: dict[str, str] = {}
    sources: list[tuple[dict, str]] = []
    for path in yaml_files:
        sources.append((load_yaml(path), str(path)))
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        sources.append(({parts[0]: nested}, "command line"))
    if base:
        _apply(_rename_old_keys(base, "checkpoint config") if train else base, cls, values, "", "checkpoint config",
               None, plugins)
    for mapping, source in sources:
        _apply(_rename_old_keys(mapping, source) if train else mapping, cls, values, "", source, given, plugins)
    cfg = _build(cls, values)
    if train:
        types_ = plugin_sections()
        cfg.plugins = {name: _build(types_[name], v) for name, v in plugins.items()}
        check_applicable(cfg, set(given), given)
        if "num_epochs" in given and "max_iters" in given and cfg.num_epochs is not None:
            raise SlimtuneError(f"{given['num_epochs']}: num_epochs={cfg.num_epochs:g} and max_iters={cfg.max_iters} "
                                f"({given['max_iters']}) both set the length of the run; give only one of them")
        if "log.report_to" in given:
            from slimtune.train.trackers import check_installed

            check_installed(cfg.log.report_to)
    return cfg


def to_dict(cfg) -> dict[str, Any]:
    """The config as plain nested dicts (what checkpoints and metrics record). For `TrainConfig`, the sections of
    the chosen method and strategy are included (as top-level sections); sections that do not apply, and max_iters
    when num_epochs sets the length, are left out."""
    out = {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not f.metadata.get("internal")}
    if isinstance(cfg, TrainConfig):
        if cfg.num_epochs is not None:  # the run derives max_iters from num_epochs; recording both would give both
            out.pop("max_iters")
        if cfg.is_gpt:
            out.pop("hf"), out.pop("dataset")
        else:
            out.pop("gpt")
        for name in (cfg.method, cfg.strategy):
            if name in plugin_sections():
                out[name] = _plain(cfg.section(name))
    return out


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def help_text(cls: type, prefix: str = "") -> str:
    """One line per key: name, type, default, docstring — the body of `slimtune train --help`."""
    lines = []
    hints = _resolved_types(cls)
    docs = field_docs(cls)
    defaults = _defaults(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
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


def train_help_text() -> str:
    """`slimtune train --help`: the keys of TrainConfig, then each registered method's and strategy's section."""
    from slimtune.registry import METHODS, STRATEGIES

    lines = [help_text(TrainConfig)]
    for kind, registry in (("method", METHODS), ("strategy", STRATEGIES)):
        for name, plugin in registry.classes().items():
            if getattr(plugin, "config_cls", None) is None:
                continue
            doc = (plugin.config_cls.__doc__ or "").strip().splitlines()[0]
            lines += ["", f"  [{name}] ({kind}={name}) {doc}", help_text(plugin.config_cls, name + ".")]
    return "\n".join(lines)
