"""`slimtune split`: profile a model's units and print the exact pipeline split beside the naive equal-layer one.

    slimtune split gpt.n_layer=12 gpt.n_embd=384 gpt.n_head=6 batch_size=8 --stages 4
    slimtune split path/to/hf-model --stages 2 --by both --memory-cap 2GiB --json

Per stage: its units, parameters, measured seconds (forward + backward of all its micro-batches), and peak bytes
(weights, gradients, optimizer state, and the activations of the micro-batches the schedule keeps in flight). Then
the bottleneck (the slowest stage, which sets the pipeline's pace), max/mean stage time, and the bubble fraction of
the schedule.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from slimtune.errors import SlimtuneError


def stage_report(costs, parts: list[range], schedule: str, microbatches: int) -> dict:
    """Per-stage figures of a split of profiled units (`slimtune.parallel.profile.UnitCosts`)."""
    from slimtune.parallel.partition import bubble_fraction

    n = len(parts)
    stages = []
    for s, part in enumerate(parts):
        in_flight = microbatches if schedule == "gpipe" else min(n - s, microbatches)
        seconds = sum(costs.seconds[i] for i in part) * microbatches
        stages.append({"units": [costs.names[i] for i in part], "first_unit": part.start, "last_unit": part.stop - 1,
                       "params": sum(costs.params[i] for i in part), "seconds": seconds,
                       "peak_bytes": sum(costs.state_bytes[i] + in_flight * costs.activation_bytes[i] for i in part)})
    times = [st["seconds"] for st in stages]
    slowest = max(range(n), key=times.__getitem__)
    virtual = 2 if schedule in ("interleaved1f1b", "zb") else 1
    bubble_schedule = {"zb": "interleaved1f1b"}.get(schedule, schedule)  # zero bubble: at most interleaved's
    return {"stages": stages, "bottleneck_stage": slowest, "bottleneck_seconds": times[slowest],
            "max_over_mean": times[slowest] / (sum(times) / n) if sum(times) else 1.0,
            "peak_bytes": max(st["peak_bytes"] for st in stages),
            "bubble_fraction": bubble_fraction(bubble_schedule, max(1, n // virtual), microbatches,
                                               virtual_stages=virtual)}


def plan_split(cfg, stages: int, by: str, memory_cap: int | None, repeats: int) -> dict:
    """Build the model of `cfg` (with its method), profile its units and return the exact and the equal split."""
    import torch

    from slimtune import methods
    from slimtune.families import family_of
    from slimtune.models.build import build_model
    from slimtune.parallel.partition import equal_layer_split
    from slimtune.parallel.pipeline import PipelineConfig, check_microbatches, plan_partition
    from slimtune.parallel.profile import profile_units
    from slimtune.parallel.units import cut_units

    options: PipelineConfig = cfg.section("pipeline")
    schedule = options.schedule
    microbatches = options.microbatches or stages
    method = methods.create(cfg)
    torch.manual_seed(cfg.seed)
    family = family_of(cfg)
    spec = family.spec_without_data()
    built = build_model(cfg, spec, method.load_options())
    model = method.prepare(built.model)
    units = cut_units(model, options.split_point_list())
    if stages > len(units):
        raise SlimtuneError(f"--stages {stages} is more than the {len(units)} units of the model "
                            f"({', '.join(units.names)}); use at most {len(units)}")
    check_microbatches(schedule, microbatches, stages, max(stages // options.stages_per_rank, 1))
    if cfg.batch_size % microbatches:
        raise SlimtuneError(f"batch_size={cfg.batch_size} does not divide into pipeline.microbatches={microbatches} "
                            f"micro-batches; make batch_size a multiple of it")
    rows = cfg.batch_size // microbatches
    seq = family.seq_len()
    costs = profile_units(units, units.example(rows, seq), repeats=repeats)
    balanced = plan_partition(costs, stages, schedule, microbatches, balance=by, memory_cap=memory_cap)
    equal = equal_layer_split(len(units), stages)
    return {"model": built.description, "method": method.name, "stages": stages, "by": by, "schedule": schedule,
            "microbatches": microbatches, "micro_batch": [rows, seq], "repeats": repeats, "memory_cap": memory_cap,
            "units": asdict(costs), "balanced": stage_report(costs, balanced, schedule, microbatches),
            "equal_layers": stage_report(costs, equal, schedule, microbatches)}


def cfg_vocab(cfg) -> int:
    """The vocabulary of a GPT config: its data folder's, else GPT-2's padded 50304."""
    if cfg.data:
        from slimtune.data.prepare import read_meta

        return read_meta(cfg.data)["vocab_size"]
    return 50304


def format_plan(plan: dict) -> str:
    from slimtune.memory import format_bytes

    lines = [f"{plan['model']}, method {plan['method']}: {plan['stages']} stages by {plan['by']}, {plan['schedule']}, "
             f"{plan['microbatches']} micro-batches of {plan['micro_batch'][0]} x {plan['micro_batch'][1]} tokens "
             f"(unit times: median of {plan['repeats']} forward+backward passes)"]
    header = f"{'stage':>5}  {'units':<34} {'params':>10} {'seconds':>9} {'peak':>11}"
    for title, key in (("exact split", "balanced"), ("equal-layer split", "equal_layers")):
        report = plan[key]
        lines += ["", f"{title}:", header]
        for s, st in enumerate(report["stages"]):
            units = st["units"][0] if len(st["units"]) == 1 else f"{st['units'][0]}..{st['units'][-1]}"
            lines.append(f"{s:>5}  {units:<34} {st['params']:>10,} {st['seconds']:>9.4f} "
                         f"{format_bytes(st['peak_bytes']):>11}")
        lines.append(f"bottleneck: stage {report['bottleneck_stage']}, {report['bottleneck_seconds']:.4f} s per step; "
                     f"max/mean stage time {report['max_over_mean']:.2f}; peak {format_bytes(report['peak_bytes'])}; "
                     f"bubble fraction {report['bubble_fraction']:.2f}")
    units = plan["units"]
    noisiest = max(range(len(units["spread"])), key=units["spread"].__getitem__)
    gain = plan["equal_layers"]["bottleneck_seconds"] / plan["balanced"]["bottleneck_seconds"]
    lines += ["", f"the exact split's slowest stage is {gain:.2f}x as fast as the equal-layer split's; unit times "
                  f"varied by up to {units['spread'][noisiest]:.0%} between repeats ({units['names'][noisiest]})"]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("split", help="profile a model's units and print the balanced pipeline split",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Measure every unit of a model (embedding, blocks, head; or the top-level modules "
                                   "of an fx-traceable model) on a batch shaped like the config's, and print the exact "
                                   "split into --stages pipeline stages beside the naive equal-layer split, e.g.\n"
                                   "  slimtune split gpt.n_layer=12 gpt.n_embd=384 gpt.n_head=6 --stages 4",
                       epilog="config keys: as for `slimtune train --help` (batch_size, gpt.*, dataset.max_seq_len, "
                              "method, pipeline.schedule, pipeline.microbatches, pipeline.split_points)")
    p.add_argument("config", nargs="*", help="a model folder, GGUF file or built-in name; YAML config files; "
                                             "key=value overrides")
    p.add_argument("--stages", type=int, required=True, help="pipeline stages")
    p.add_argument("--by", default="time", choices=["time", "memory", "both"], help="what to balance")
    p.add_argument("--memory-cap", default=None, help="most bytes one stage may hold, e.g. 2GiB or 2000000000")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per unit (the median counts)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args) -> int:
    from slimtune.config import TrainConfig, make_config
    from slimtune.plan.parts import parse_budget

    if args.stages < 1:
        raise SlimtuneError(f"--stages must be >= 1, got {args.stages}")
    if args.repeats < 1:
        raise SlimtuneError(f"--repeats must be >= 1, got {args.repeats}")
    files, overrides = [], []
    for item in args.config:
        if "=" in item:
            overrides.append(item)
        elif item.endswith((".yaml", ".yml")):
            files.append(item)
        else:
            overrides.append(f"model={item}")
    cfg = make_config(TrainConfig, files, ["strategy=pipeline", *overrides])
    cap = parse_budget(args.memory_cap) if args.memory_cap is not None else None
    plan = plan_split(cfg, args.stages, args.by, cap, args.repeats)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0
