"""The memory planner against real runs: predicted vs measured peak of `slimtune train` on SmolLM2-135M (CPU).

    .venv/bin/python benchmarks/memory_plan.py                        # full and badam, with and without checkpointing
    .venv/bin/python benchmarks/memory_plan.py --runs full,badam+ckpt --steps 2

Every run is one ``slimtune train model=smollm2-135m`` in its own process (a fresh process, so the peak resident
memory of one run never includes another's), on generated Alpaca-style data packed into full ``--seq`` sequences
(every batch is as long as the plan assumes), fp32 weights (``--precision bf16``: under bf16 autocast), 2 threads,
``--steps`` steps, no evaluation. The run itself logs the plan before step 1 and the measured peak (VmHWM, before
the final checkpoint is written) at the end; this script reads those two records from metrics.jsonl and prints a
Markdown table for docs/BENCHMARKS.md.

Run names: a method (``full``, ``badam``, or any registered method with an estimate, e.g. ``lora``), with
``+ckpt`` for ``hf.gradient_checkpointing=true``. BAdam runs train block 0 first (``badam.switch_mode=ascending``):
backward then runs through every layer, the worst case the plan assumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = "full,full+ckpt,badam,badam+ckpt"


def write_data(path: Path, n: int = 400) -> Path:
    """Alpaca records of ordinary words (enough tokens to pack many full sequences)."""
    words = ("memory planner predicts the peak of every training run before it starts and checks itself against "
             "the measured peak at the end").split()
    records = []
    for i in range(n):
        text = " ".join(words[(i + k) % len(words)] for k in range(40 + i % 30))
        records.append({"instruction": f"Repeat sentence {i}.", "input": "", "output": text})
    path.write_text(json.dumps(records))
    return path


def run_one(name: str, data: Path, out: Path, args) -> dict:
    method, *options = name.split("+")
    overrides = [f"model={args.model}", f"data={data}", f"out_dir={out}", f"method={method}",
                 f"batch_size={args.batch}", f"dataset.max_seq_len={args.seq}", "dataset.packing=true",
                 f"max_iters={args.steps}", "eval.interval=0", "ckpt.interval=0", "log.progress=false",
                 "log.plot=false", "optim.warmup_iters=1", f"runtime.threads={args.threads}", "resume=never",
                 "strategy=single", f"runtime.precision={args.precision}"]
    if "ckpt" in options:
        overrides.append("hf.gradient_checkpointing=true")
    if method == "badam":
        overrides.append("badam.switch_mode=ascending")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "slimtune", "train", *overrides], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plan = next(r for r in records if r["kind"] == "plan")
    peak = next(r for r in records if r["kind"] == "peak")
    return {"run": name, "plan": plan, "peak": peak, "seconds": time.time() - t0}


def table(results: list[dict]) -> str:
    mib = 2**20
    parts = ("weights", "gradients", "optimizer", "activations", "temporary", "baseline")
    head = ("| run | predicted MiB | measured MiB | measured / predicted | "
            + " | ".join(parts) + " (MiB, predicted) |")
    rows = [head, "|" + "---|" * (4 + len(parts))]
    for r in results:
        p = r["plan"]["parts"]
        rows.append(f"| {r['run']} | {r['plan']['predicted_peak_bytes'] / mib:.0f} | "
                    f"{r['peak']['measured_peak_bytes'] / mib:.0f} | {r['peak']['ratio']:.3f} | "
                    + " | ".join(f"{p[k] / mib:.0f}" for k in parts) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated run names (default {DEFAULT_RUNS})")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8,
                        help="steps per run: under runtime.cpu_allocator=keep the resident peak settles after ~6")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                        help="runtime.precision of every run (bf16: fp32 weights under bf16 autocast; default fp32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw records here")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data.json")
        for name in args.runs.split(","):
            result = run_one(name, data, Path(tmp) / name.replace("+", "_"), args)
            print(f"{name}: predicted {result['plan']['predicted_peak_bytes'] / 2**20:.0f} MiB, measured "
                  f"{result['peak']['measured_peak_bytes'] / 2**20:.0f} MiB, ratio {result['peak']['ratio']:.3f} "
                  f"({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
            results.append(result)
    from slimtune.host import cpu_class

    command = "python benchmarks/memory_plan.py " + " ".join(sys.argv[1:])
    print(f"host: {cpu_class()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; `{command.strip()}`; "
          f"model {args.model}, batch {args.batch} x {args.seq} tokens (packed), fp32 weights, precision "
          f"{args.precision}, {args.steps} steps, "
          f"{args.threads} threads\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
