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
The reading, checking and help text are a generic engine over dataclasses (`slimtune.typed_config`); this module is
the schema and what is particular to it: plug-in sections, renamed keys, keys that do not apply.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from slimtune.errors import SlimtuneError
from slimtune.typed_config import (apply_values, build, check_choice, default_values, help_text, load_yaml,
                                   parse_override, plain)
from slimtune.typed_config import field_docs  # noqa: F401  (re-exported: part of this module's API)

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
    single), single, cpu_shards (one process: row shards of each batch on threads), ddp, fsdp, deepspeed or
    pipeline (several processes, under torchrun; their settings are the section of the same name)."""
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


def make_config(cls: type[TrainConfig], yaml_files: list[str] = (), overrides: list[str] = (),
                base: dict | None = None) -> TrainConfig:
    """Build a `TrainConfig` (`cls`) from defaults, an optional `base` mapping (a checkpoint's config), YAML files
    and `key=value` overrides: plug-in sections and renamed keys are handled, and keys that do not apply to the
    chosen model, method or strategy are errors."""
    values = default_values(cls)
    plugins: dict[str, dict] = {}
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
    types_ = plugin_sections()
    if base:
        apply_values(_rename_old_keys(base, "checkpoint config"), cls, values, "", "checkpoint config", None, plugins,
                     types_)
    for mapping, source in sources:
        apply_values(_rename_old_keys(mapping, source), cls, values, "", source, given, plugins, types_)
    cfg = build(cls, values)
    cfg.plugins = {name: build(types_[name], v) for name, v in plugins.items()}
    check_applicable(cfg, set(given), given)
    if "num_epochs" in given and "max_iters" in given and cfg.num_epochs is not None:
        raise SlimtuneError(f"{given['num_epochs']}: num_epochs={cfg.num_epochs:g} and max_iters={cfg.max_iters} "
                            f"({given['max_iters']}) both set the length of the run; give only one of them")
    if "log.report_to" in given:
        from slimtune.train.trackers import check_installed

        check_installed(cfg.log.report_to)
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain nested dicts (what checkpoints and metrics record): the sections of the chosen method and
    strategy are included (as top-level sections); sections that do not apply, and max_iters when num_epochs sets
    the length, are left out."""
    out = {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not f.metadata.get("internal")}
    if cfg.num_epochs is not None:  # the run derives max_iters from num_epochs; recording both would give both
        out.pop("max_iters")
    if cfg.is_gpt:
        out.pop("hf"), out.pop("dataset")
    else:
        out.pop("gpt")
    for name in (cfg.method, cfg.strategy):
        if name in plugin_sections():
            out[name] = plain(cfg.section(name))
    return out


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
