"""slimtune train vs nanoGPT's own train.py, same machine, same model, same data, runs interleaved.

    python benchmarks/nanogpt_compare.py --nanogpt /path/to/nanoGPT [--iters 200] [--rounds 3]

nanoGPT is not a dependency: pass a checkout of https://github.com/karpathy/nanoGPT (read-only use; its data
preparation needs a download, so this script writes its data folder from slimtune's built-in corpus instead).
Both run the README's CPU configuration: n_layer=4 n_head=4 n_embd=128 block_size=64 batch_size=12 dropout=0,
fp32, no compile, eval_iters=20. The score is the median milliseconds per iteration, excluding iterations that
evaluated or checkpointed; both are wall-clock times from one iteration's log line to the next, logging included. Runs alternate (nanoGPT, slimtune, nanoGPT, ...) so background load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0)
# slimtune's keys for CONFIG (the GPT architecture lives in the gpt.* section).
SLIMTUNE_KEYS = {k: k if k == "batch_size" else f"gpt.{k}" for k in CONFIG}


def prepare_data(work: Path) -> Path:
    from slimtune.data.corpus import write_python_docs
    from slimtune.data.prepare import prepare

    data = work / "pydocs"
    meta = prepare([write_python_docs(work / "pydocs.txt")], data, progress=False)
    chars = meta["tokenizer"]["chars"]
    with open(data / "meta.pkl", "wb") as f:  # what nanoGPT's train.py reads for vocab_size
        pickle.dump({"vocab_size": meta["vocab_size"], "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return data


def run_nanogpt(nanogpt: Path, data: Path, iters: int, threads: int, compile: bool = False) -> list[float]:
    dataset = "slimtune_bench_pydocs"
    target = nanogpt / "data" / dataset
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(data, target)
    out = Path(tempfile.mkdtemp())
    args = [f"--{k}={v}" for k, v in CONFIG.items()] + [
        f"--dataset={dataset}", "--device=cpu", f"--compile={compile}", "--eval_iters=20", "--log_interval=1",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--out_dir={out}", "--eval_interval=250",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", *args], cwd=nanogpt,
                          capture_output=True, text=True, env=env, check=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    ms = [float(m.group(2)) for m in re.finditer(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", proc.stdout, re.M)
          if int(m.group(1)) % 250 != 0]  # iteration 0 (and every 250th) includes an evaluation
    return ms[5:]  # warm-up


def run_slimtune(data: Path, iters: int, threads: int, compile: bool = False) -> list[float]:
    out = Path(tempfile.mkdtemp())
    args = [f"{SLIMTUNE_KEYS[k]}={v}" for k, v in CONFIG.items()] + [
        f"data={data}", f"out_dir={out}", f"max_iters={iters}", "eval.iters=20", "eval.interval=250",
        "log.interval=1", "lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_iters=100", "optim.beta2=0.99",
        "log.progress=false", "log.plot=false", f"runtime.threads={threads}", "resume=never",
        f"runtime.compile={str(compile).lower()}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "slimtune", "train", *args], capture_output=True, text=True, env=env,
                   check=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    # Wall-clock time between consecutive steps' records, as nanoGPT measures (its time includes its logging);
    # a step is left out if an evaluation ran since the previous record.
    train = [r for r in records if r["kind"] == "train"]
    evaluated = {r["step"] for r in records if r["kind"] == "eval"}
    ms = [(b["time"] - a["time"]) * 1000 for a, b in zip(train, train[1:])
          if b["step"] == a["step"] + 1 and a["step"] not in evaluated]
    return ms[5:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also compare both with torch.compile")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    data = prepare_data(work)
    runs = {"nanoGPT train.py": lambda: run_nanogpt(args.nanogpt, data, args.iters, args.threads),
            "slimtune train": lambda: run_slimtune(data, args.iters, args.threads)}
    if args.compile:
        runs["nanoGPT train.py --compile=True"] = lambda: run_nanogpt(args.nanogpt, data, args.iters, args.threads, True)
        runs["slimtune train compile=true"] = lambda: run_slimtune(data, args.iters, args.threads, True)
    results: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            results[name].append(statistics.median(run()))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms/iter" for k, v in results.items()), flush=True)
    tokens = CONFIG["batch_size"] * CONFIG["block_size"]
    print("\n| trainer | median ms/iter | tokens/s | per-round medians (ms) |\n|---|---|---|---|")
    for name, values in results.items():
        ms = statistics.median(values)
        print(f"| {name} | {ms:.1f} | {tokens / ms * 1000:,.0f} | {', '.join(f'{v:.1f}' for v in values)} |")
    base = statistics.median(results["nanoGPT train.py"])
    for name, values in results.items():
        if name.startswith("slimtune"):
            print(f"{name} / nanoGPT train.py tokens/s: {base / statistics.median(values):.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
