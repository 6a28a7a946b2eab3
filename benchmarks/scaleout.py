"""Scale-out: per-rank peak memory and seconds per step of every distributed strategy, against one process.

For method=full and method=badam on SmolLM2-135M (`model=smollm2-135m`), each contender is one real training run in
its own process group (`slimtune train`, or `torchrun --nproc_per_node=N -m slimtune train`):

- single: one process (strategy=single), the reference;
- ddp, fsdp (FSDP2), deepspeed ZeRO-2 and ZeRO-3, and the CPU-offload variants (fsdp.offload,
  deepspeed.offload_optimizer / offload_params), each with 2 processes (`--processes 1,2` adds one-process runs,
  which show each engine's overhead alone).

A contender the machine or the installation cannot run (deepspeed not installed or not registered, offload on a
machine without an accelerator, a refused method) is listed with the reason instead of numbers.

Per contender: the largest and smallest per-rank peak (the run's `peak` record: CUDA max_memory_allocated, or the
CPU resident high-water mark, which includes the interpreter and libraries), the median seconds per step after the
first, and both as a ratio to the single-process run. Every run uses the same glibc allocator mode
(`--allocator`, default release: freed buffers go back to the OS, so the resident high-water mark follows what is
live; with `keep`, the buffers the sharded engines gather and scatter fragment the heap and the peaks mostly show
that). Each rank reads batch_size sequences, so N processes do N
times the work of one per step. For BAdam the table also gives the rule (2M + 16M/D)/N bytes per device for ZeRO-3
(M = parameters in billions, giving GB; D = blocks; N = devices).

    .venv/bin/python benchmarks/scaleout.py --steps 3             # full and BAdam, single + 2 processes
    .venv/bin/python benchmarks/scaleout.py --methods full --steps 3 --only single,fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimtune.host import cpu_class  # noqa: E402

MODEL = "smollm2-135m"
BLOCKS = 30  # SmolLM2-135M's transformer layers: BAdam's blocks


def contenders(processes: list[int]) -> list[tuple[str, int, list[str]]]:
    """(name, processes, strategy keys) of every run, the single-process reference first."""
    out = [("single", 1, ["strategy=single"])]
    for n in processes:
        out += [(f"ddp x{n}", n, ["strategy=ddp"]),
                (f"fsdp x{n}", n, ["strategy=fsdp"]),
                (f"fsdp+offload x{n}", n, ["strategy=fsdp", "fsdp.offload=true"]),
                (f"zero2 x{n}", n, ["strategy=deepspeed", "deepspeed.stage=2"]),
                (f"zero2+offload x{n}", n, ["strategy=deepspeed", "deepspeed.stage=2",
                                            "deepspeed.offload_optimizer=true"]),
                (f"zero3 x{n}", n, ["strategy=deepspeed", "deepspeed.stage=3"]),
                (f"zero3+offload x{n}", n, ["strategy=deepspeed", "deepspeed.stage=3",
                                            "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"])]
    return out


def deepspeed_missing() -> str | None:
    """Why the deepspeed contenders cannot run here, or None."""
    from slimtune.registry import STRATEGIES

    if "deepspeed" not in STRATEGIES.names():
        return "strategy=deepspeed is not registered in this slimtune"
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        return f"deepspeed does not import ({exc}); pip install 'slimtune[deepspeed]'"
    return None


def run(name: str, nproc: int, keys: list[str], common: list[str], out: Path, timeout: float) -> dict:
    """One training run; its per-rank peaks and seconds per step, or {"skipped": reason}."""
    if nproc == 1 and "strategy=single" in keys:
        cmd = [sys.executable, "-m", "slimtune", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", "-m",
               "slimtune", "train"]
    cmd += [*common, *keys, f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish in {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
        return {"skipped": errors[0][len("error: "):] if errors else f"exit code {proc.returncode}"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["dt_s"] for r in records if r["kind"] == "train"][1:]  # the first step warms up
    (peak,) = [r for r in records if r["kind"] == "peak"]
    ranks = peak.get("per_rank_peak_bytes") or [peak["measured_peak_bytes"]]
    return {"max_peak": max(ranks), "min_peak": min(ranks), "s_per_step": statistics.median(steps),
            "predicted": peak.get("predicted_peak_bytes"), "wall_s": wall, "cmd": cmd}


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="full,badam")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--seq", type=int, default=64, help="dataset.max_seq_len")
    parser.add_argument("--only", default="", help="comma-separated name prefixes of the contenders to run")
    parser.add_argument("--processes", default="2", help="comma-separated process counts of the distributed runs")
    parser.add_argument("--allocator", default="release", help="runtime.cpu_allocator of every run")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    args = parser.parse_args()

    import torch

    from slimtune.tasks import make_examples, write_jsonl

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="scaleout-"))
    data = write_jsonl(make_examples(64, seed=0), work / "reverse.jsonl")
    ds_reason = deepspeed_missing()
    only = [p for p in args.only.split(",") if p]
    load = os.getloadavg()
    gpu = f", CUDA {torch.cuda.get_device_name()}" if cuda else ""
    print(f"host: {cpu_class()}, {os.cpu_count()} logical CPUs{gpu}; "
          f"torch {torch.__version__}; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"model {MODEL}; batch_size=1 per rank, dataset.max_seq_len={args.seq}, {args.steps} steps "
          f"(median s/step of steps 2..{args.steps}); OMP_NUM_THREADS=1, runtime.cpu_allocator={args.allocator}")

    for method in args.methods.split(","):
        common = [f"model={MODEL}", f"data={data}", f"method={method}", f"max_iters={args.steps}", "batch_size=1",
                  f"dataset.max_seq_len={args.seq}", "log.interval=1", "log.progress=false", "log.plot=false",
                  "eval.interval=0", "optim.warmup_iters=0", "runtime.threads=1",
                  f"runtime.cpu_allocator={args.allocator}"]
        if method == "badam":
            common += [f"badam.switch_every={args.steps}"]  # one block for the whole run: steps are comparable
        print(f"\nmethod={method}")
        print(f"{'contender':<18} {'peak/rank MiB (max, min)':>25} {'x single':>9} {'s/step':>8} {'x single':>9}"
              + ("  rule (2M+16M/D)/N" if method == "badam" else ""))
        reference = None
        for name, nproc, keys in contenders([int(n) for n in args.processes.split(",")]):
            if only and not any(name.startswith(p) for p in only):
                continue
            if "strategy=deepspeed" in keys and ds_reason:
                result = {"skipped": ds_reason}
            else:
                out = work / f"{method}-{name.replace(' ', '').replace('+', '-')}"
                result = run(name, nproc, keys, common, out, args.timeout)
                shutil.rmtree(out, ignore_errors=True)  # checkpoints of a 135M model add up
            if "skipped" in result:
                print(f"{name:<18} skipped: {result['skipped']}")
                continue
            if name == "single":
                reference = result
            ratio_mem = f"{result['max_peak'] / reference['max_peak']:.2f}" if reference else "-"
            ratio_time = f"{result['s_per_step'] / reference['s_per_step']:.2f}" if reference else "-"
            rule = ""
            if method == "badam":
                m = 0.1345  # SmolLM2-135M: 134.5M parameters
                rule = f"  {(2 * m + 16 * m / BLOCKS) / nproc * 1e9 / 2**20:,.0f} MiB (bf16, ZeRO-3)"
            print(f"{name:<18} {mib(result['max_peak']):>12}, {mib(result['min_peak']):>10} {ratio_mem:>9} "
                  f"{result['s_per_step']:>8.2f} {ratio_time:>9}{rule}")
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
