"""`slimtune estimate`: the peak memory of a training run per device, before starting it.

    slimtune estimate --preset llama-3-8b --method badam --budget 24GB
    slimtune estimate --model path/to/hf-folder --method lora lora.r=16 --batch 4 --seq 2048 --checkpointing
    slimtune estimate --model gpt gpt.n_layer=12 gpt.n_embd=768 --devices 4 --strategy zero3 --json

The method and strategy give their own estimates (`Method.estimate_memory`, `Strategy.estimate_memory`); a method's
options are its config keys (``badam.granularity=matrix``), exactly as for ``slimtune train``. ``--budget`` says
whether the run fits and lists the methods and settings that do, best first.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.plan.estimate import ModelSpec, Plan, baseline_plan, format_bytes, parse_budget
from slimtune.plan.settings import OPTIMIZERS, NoEstimate, RunSettings
from slimtune.plan.spec import PRESETS

DTYPES = ("bf16", "fp16", "fp32")
DEVICE_KINDS = ("cuda", "cpu", "mps")
OFFLOAD = ("none", "optimizer", "params")
GPT_VOCAB = 50304  # GPT-2's vocabulary padded to a multiple of 64, as nanoGPT does


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``estimate`` verb to the ``slimtune`` command's subparsers."""
    p = subparsers.add_parser(
        "estimate", help="predict the peak memory of a training run per device; --budget lists what fits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict the peak memory of a training run per device: weights, gradients, optimizer state, "
                    "activations,\ntemporary buffers and the framework baseline. e.g.\n"
                    "  slimtune estimate --preset llama-3-8b --method badam --budget 24GB\n"
                    "  slimtune estimate --model smollm2-135m --method full --batch 8 --seq 512 --json",
        epilog="presets: " + ", ".join(PRESETS))
    p.add_argument("config", nargs="*",
                   help="method/strategy options and GPT settings as for slimtune train (badam.granularity=matrix, "
                        "gpt.n_layer=12), or YAML files")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", help="a model from published shapes: " + ", ".join(PRESETS))
    model.add_argument("--model", help="a Hugging Face folder or config.json, a .gguf file, smollm2-135m, or gpt "
                                       "(slimtune's GPT, set by gpt.* keys)")
    p.add_argument("--vocab", type=int, default=GPT_VOCAB, help="vocabulary of --model gpt")
    p.add_argument("--method", default="full", help="a registered method: full, badam, lora, qlora, qat, bitnet")
    p.add_argument("--precision", choices=DTYPES, default="bf16", help="compute (activation) dtype")
    p.add_argument("--storage-dtype", choices=DTYPES, default=None, help="weights' dtype (default: --precision)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="adamw, or adamw8bit (8-bit moments)")
    p.add_argument("--master-weights", action="store_true",
                   help="keep fp32 master weights for 16-bit weights (DeepSpeed / HF mixed precision); slimtune's "
                        "full method updates the stored weights directly")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch per device")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; gpt: gpt.block_size)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (pipeline: in flight)")
    ckpt = p.add_mutually_exclusive_group()
    ckpt.add_argument("--checkpointing", dest="checkpointing", action="store_true", default=None,
                      help="gradient checkpointing per block (default: off, or with --budget whatever fits)")
    ckpt.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--attention", choices=("flash", "eager"), default="flash", help="SDPA/flash, or eager")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="positions per chunk of the fused head + loss (0: full logits; default: slimtune's choice "
                        "for the model, 256 for Llama-like models)")
    p.add_argument("--devices", type=int, default=1, help="number of devices")
    p.add_argument("--strategy", default=None,
                   help="single, cpu_shards, ddp, fsdp, deepspeed, zero2, zero3, pipeline (default: single, or ddp on "
                        "several devices)")
    p.add_argument("--offload", choices=OFFLOAD, default="none",
                   help="move the optimizer state and fp32 gradients (optimizer), and the weights too (params), "
                        "to host memory")
    p.add_argument("--device-kind", choices=DEVICE_KINDS, default="cuda",
                   help="device kind (framework baseline, dropout masks)")
    p.add_argument("--budget", default=None, help="memory per device, e.g. 24GB, 24GiB, 80G")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def spec_from_gguf(path: str | Path) -> ModelSpec:
    """The shape of a GGUF model: its conversion cache's config.json if slimtune converted it already, else the
    file's metadata (read with the ``gguf`` package; no tensor is loaded)."""
    from slimtune.models.hf import check_gguf_file, gguf_cache_path

    path = check_gguf_file(path)
    cached = gguf_cache_path(path) / "config.json"
    if cached.is_file():
        return ModelSpec.from_hf_config(cached)
    import gguf

    reader = gguf.GGUFReader(str(path))

    def value(key: str, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = value("general.architecture")
    if arch is None:
        raise SlimtuneError(f"{path}: no general.architecture in the GGUF metadata")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = value(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    if arch == "gpt2":
        cfg = {"model_type": "gpt2", "vocab_size": vocab, "n_embd": value("gpt2.embedding_length"),
               "n_layer": value("gpt2.block_count"), "n_head": value("gpt2.attention.head_count"),
               "n_inner": value("gpt2.feed_forward_length"), "n_positions": value("gpt2.context_length")}
    else:
        cfg = {"model_type": arch, "vocab_size": vocab, "hidden_size": value(f"{arch}.embedding_length"),
               "num_hidden_layers": value(f"{arch}.block_count"),
               "num_attention_heads": value(f"{arch}.attention.head_count"),
               "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
               "intermediate_size": value(f"{arch}.feed_forward_length"),
               "head_dim": value(f"{arch}.attention.key_length"), "tie_word_embeddings": tied}
    try:
        return ModelSpec.from_hf_config(cfg)
    except SlimtuneError as exc:
        raise SlimtuneError(f"{path} (GGUF, architecture {arch!r}): {exc}") from None


def resolve_spec(args, cfg) -> ModelSpec:
    """The model's shape from --preset or --model."""
    if args.preset:
        return ModelSpec.preset(args.preset)
    if not args.model:
        raise SlimtuneError(f"give a model: --preset NAME ({', '.join(PRESETS)}), or --model with a Hugging Face "
                            f"folder, config.json, .gguf file, smollm2-135m or gpt")
    if args.model == "gpt":
        return ModelSpec.from_gpt(vocab_size=args.vocab, **asdict(cfg.gpt))
    from slimtune.models.hf import BUILTIN_MODELS, builtin_gguf_path

    if args.model in BUILTIN_MODELS:
        return spec_from_gguf(builtin_gguf_path(args.model))
    path = Path(args.model)
    if path.suffix.lower() == ".gguf":
        return spec_from_gguf(path)
    return ModelSpec.from_hf_config(path)


def _train_config(items: list[str], method: str, extra: list[str] = ()):
    from slimtune.config import TrainConfig, make_config

    files = [item for item in items if "=" not in item]
    for item in files:
        if not item.endswith((".yaml", ".yml")):
            raise SlimtuneError(f"unexpected argument {item!r}: give config settings such as "
                                f"badam.granularity=matrix, or a YAML file")
    overrides = [item for item in items if "=" in item]
    return make_config(TrainConfig, files, [*overrides, f"method={method}", *extra])


def _settings(args, spec: ModelSpec, cfg, checkpointing: bool) -> RunSettings:
    from slimtune.families import family_of

    family = family_of(cfg, model=args.model or "")  # a --preset is a Hugging Face causal LM's shape
    seq = args.seq or family.estimate_seq_len()
    if args.loss_chunk is not None:
        chunk = args.loss_chunk or None
    else:  # slimtune's fused head + loss runs for Llama-like models (SwiGLU + RMSNorm); its GPT has full logits
        chunk = 256 if spec.mlp == "swiglu" and spec.norm == "rmsnorm" else None
    return RunSettings(batch=args.batch, seq=seq, weight_dtype=args.storage_dtype or args.precision,
                       act_dtype=args.precision, checkpointing=checkpointing, optimizer=args.optimizer,
                       master_weights=args.master_weights, device=args.device_kind, world_size=args.devices,
                       grad_accum=args.grad_accum, attention=args.attention, loss_chunk=chunk,
                       logits_fp32=family.logits_fp32)


# ----------------------------------------------------------------------------------------------------------------
# Planning one setting
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """One method and setting: a plan per device."""

    method: str
    checkpointing: bool
    devices: list[Plan]

    @property
    def peak_bytes(self) -> int:
        """The largest device's peak."""
        return max(plan.peak_bytes for plan in self.devices)

    @property
    def trainable_params(self) -> int:
        return sum(plan.trainable_params for plan in self.devices[:1])

    def label(self) -> str:
        return f"{self.method}{', gradient checkpointing' if self.checkpointing else ''}"


def _strategy_name(args) -> str:
    return args.strategy or ("single" if args.devices == 1 else "ddp")


def plan_setting(args, spec: ModelSpec, method_name: str, checkpointing: bool, items: list[str]) -> Estimate:
    """Plan ``method_name`` with these settings on every device; raises the refusal the trainer would give."""
    import torch

    from slimtune import methods
    from slimtune.plan.strategies import PLANNED_STRATEGIES, cpu_offload
    from slimtune.registry import STRATEGIES

    name = _strategy_name(args)
    registered = name in STRATEGIES.names() and name != "auto"
    if not registered and name not in PLANNED_STRATEGIES:
        known = sorted(set(STRATEGIES.names()) - {"auto"} | set(PLANNED_STRATEGIES))
        raise SlimtuneError(f"unknown strategy {name!r}; choose one of {', '.join(known)}")
    cfg = _train_config(items, method_name, [f"strategy={name}"] if registered else [])
    run = _settings(args, spec, cfg, checkpointing)
    method = methods.create(cfg)
    if registered:
        strategy = STRATEGIES.get(name)(cfg)
        if args.devices > 1 and name in ("single", "cpu_shards"):
            raise SlimtuneError(f"strategy={name} runs in one process on one device; use --devices 1, or ddp, "
                                f"fsdp, zero2, zero3 or pipeline for {args.devices} devices")
        strategy.device = torch.device(args.device_kind)
        strategy.world_size = args.devices
        strategy.check(method, torch.nn.Module())  # the trainer's own refusal (model-specific checks pass)
        per_device = strategy.estimate_per_device(method.estimate_memory(spec, run), spec, run)
    else:
        per_device = PLANNED_STRATEGIES[name](method.estimate_memory(spec, run), spec, run)
    if args.offload != "none":
        per_device = [cpu_offload(plan, params=args.offload == "params") for plan in per_device]
    from slimtune.plan.run import allocator_plan

    base = baseline_plan(args.device_kind)
    return Estimate(method_name, checkpointing,
                    [plan + allocator_plan(args.device_kind, plan) + base for plan in per_device])


def _items_for(items: list[str], method_name: str) -> list[str]:
    """The config items without the keys of other methods' sections (for trying every method)."""
    from slimtune.registry import METHODS

    others = set(METHODS.names()) - {method_name}
    return [item for item in items if "=" not in item or item.split("=", 1)[0].split(".", 1)[0] not in others]


def fitting_settings(args, spec: ModelSpec, items: list[str], budget: int) -> list[Estimate]:
    """Every registered method, without and with gradient checkpointing (or as --checkpointing says), that fits
    ``budget`` bytes per device, best first: the most parameters trained per step; then weights kept at full size
    (quantizing them changes the model, recomputing only costs time); then no recomputation; then the smaller peak.
    Methods without an estimate, or refused by the strategy, are left out."""
    from slimtune.registry import METHODS

    choices = (False, True) if args.checkpointing is None else (args.checkpointing,)
    found = []
    for name in METHODS.names():
        for checkpointing in choices:
            try:
                est = plan_setting(args, spec, name, checkpointing, _items_for(items, name))
            except (NoEstimate, SlimtuneError):
                continue  # this method has no estimate, or cannot run with these settings
            if est.peak_bytes <= budget:
                found.append(est)
    return sorted(found, key=lambda e: (-e.trainable_params, -e.devices[0].parts["weights"], e.checkpointing,
                                        e.peak_bytes))


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def _table(est: Estimate) -> list[str]:
    from slimtune.plan.parts import PARTS

    same = all(plan.to_dict() == est.devices[0].to_dict() for plan in est.devices)
    columns = est.devices[:1] if same else est.devices
    heads = [f"each of {len(est.devices)} devices" if len(est.devices) > 1 else "device 0"] if same else \
        [f"device {i}" for i in range(len(columns))]
    width = max(14, *(len(h) + 2 for h in heads))
    lines = [f"  {'':<12}" + "".join(f"{h:>{width}}" for h in heads)]
    for key in PARTS:
        lines.append(f"  {key:<12}" + "".join(f"{format_bytes(p.parts[key]):>{width}}" for p in columns))
    lines.append(f"  {'peak':<12}" + "".join(f"{format_bytes(p.peak_bytes):>{width}}" for p in columns))
    if any(p.host_bytes for p in columns):
        lines.append(f"  {'(host)':<12}" + "".join(f"{format_bytes(p.host_bytes):>{width}}" for p in columns))
    return lines


def _describe_run(args, spec: ModelSpec, run: RunSettings) -> str:
    chunk = f"chunked loss {run.loss_chunk}" if run.loss_chunk else "full logits"
    return (f"method {args.method}, strategy {_strategy_name(args)} on {args.devices} {args.device_kind} device(s)"
            f"{', offload ' + args.offload if args.offload != 'none' else ''}; batch {run.batch} x seq {run.seq}, "
            f"{run.weight_dtype} weights, {run.act_dtype} activations, {run.optimizer}, "
            f"checkpointing {'on' if run.checkpointing else 'off'}, {chunk}")


def _device_json(plan: Plan, index: int) -> dict:
    return {"device": index, **plan.to_dict()}


def run(args) -> int:
    """``slimtune estimate``: print the plan (a table, or JSON with --json); 0 unless the input is wrong."""
    items = list(args.config)
    for key in ("batch", "devices", "grad_accum"):
        if getattr(args, key) < 1:
            raise SlimtuneError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    budget = parse_budget(args.budget) if args.budget is not None else None
    spec = resolve_spec(args, _train_config(_items_for(items, args.method), args.method))

    fitting = fitting_settings(args, spec, items, budget) if budget is not None else []
    checkpointing = bool(args.checkpointing)
    if args.checkpointing is None and budget is not None:
        # Without a choice: no recomputation if that fits, else checkpointing.
        own = [e for e in fitting if e.method == args.method]
        checkpointing = bool(own) and own[0].checkpointing
        if not own:
            checkpointing = True
    est = plan_setting(args, spec, args.method, checkpointing, items)
    settings = _settings(args, spec, _train_config(_items_for(items, args.method), args.method), checkpointing)
    fits = None if budget is None else est.peak_bytes <= budget

    if args.json:
        out = {"model": spec.name, "params": spec.n_params, "method": args.method,
               "strategy": _strategy_name(args), "devices": args.devices, "settings": asdict(settings),
               "peak_bytes": est.peak_bytes,
               "per_device": [_device_json(plan, i) for i, plan in enumerate(est.devices)]}
        if budget is not None:
            out.update(budget_bytes=budget, fits=fits,
                       fitting=[{"method": e.method, "checkpointing": e.checkpointing, "peak_bytes": e.peak_bytes,
                                 "trainable_params": e.trainable_params} for e in fitting])
        print(json.dumps(out, indent=2))
        return 0

    lines = [spec.describe(), _describe_run(args, spec, settings), *_table(est)]
    notes = dict.fromkeys(note for plan in est.devices for note in plan.notes)
    lines += ["notes:"] + [f"  - {note}" for note in notes]
    if budget is not None:
        lines.append("")
        chosen = " with gradient checkpointing (chosen: without it, it does not fit)" \
            if args.checkpointing is None and checkpointing else ""
        if fits:
            lines.append(f"fits{chosen}: {format_bytes(est.peak_bytes)} of the {args.budget} budget "
                         f"({format_bytes(budget)}) per device, {format_bytes(budget - est.peak_bytes)} to spare")
        else:
            lines.append(f"does not fit: needs {format_bytes(est.peak_bytes)} per device, the budget is {args.budget} "
                         f"({format_bytes(budget)})")
        if fitting:
            lines.append(f"what fits in {args.budget} per device, best first:")
            lines += [f"  {e.label():<40}{format_bytes(e.peak_bytes):>12}" for e in fitting]
        else:
            lines.append(f"nothing fits in {args.budget} with batch {args.batch} x seq {settings.seq}: try a smaller "
                         f"batch or sequence, more devices with --strategy zero3 or fsdp, or --offload optimizer")
    print("\n".join(lines))
    return 0
