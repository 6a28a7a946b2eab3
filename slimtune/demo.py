"""`slimtune demo` / `make demo`: an end-to-end run on a built-in corpus that needs no download.

Writes Python's own documentation strings to a text file, prepares a character-level data set, trains a small GPT
from scratch (progress bar, evaluation, checkpoints), and samples from it.
"""

from __future__ import annotations

import time
from pathlib import Path

from slimtune.config import TrainConfig, make_config
from slimtune.data.corpus import write_python_docs
from slimtune.data.prepare import prepare
from slimtune.memory import format_bytes
from slimtune.sample import sample
from slimtune.train.loop import train


def run_demo(out_dir: str | Path = "out/demo", quick: bool = False) -> dict:
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    corpus = write_python_docs(out_dir / "python_docs.txt")
    meta = prepare([corpus], out_dir / "data", tokenizer="char")
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.2f} MB), {meta['train_tokens']:,} training tokens, "
          f"vocabulary {meta['vocab_size']}")
    overrides = [
        f"data={out_dir / 'data'}", f"out_dir={out_dir / 'run'}", "n_layer=4", "n_head=4", "n_embd=128",
        "block_size=64", "batch_size=12", "max_iters=40" if quick else "max_iters=1500", "warmup_iters=50",
        "lr=2e-3", "min_lr=2e-4", "eval_interval=500", "eval_iters=20", "log_interval=10", "resume=never",
    ]
    cfg: TrainConfig = make_config(TrainConfig, overrides=overrides)
    result = train(cfg)
    text = sample(result.checkpoint, prompt="Return the ", max_new_tokens=120 if not quick else 20,
                  temperature=0.8, top_k=50, seed=1)[0]
    elapsed = time.perf_counter() - t0
    print("\nsample from the trained model:\n" + text)
    print(f"\nfinal val loss {result.val_loss:.3f} (a uniform guess is {__import__('math').log(meta['vocab_size']):.2f}) "
          f"| peak memory {format_bytes(result.peak_memory_bytes)} | {elapsed:.0f} s")
    return {"val_loss": result.val_loss, "sample": text, "seconds": elapsed, "checkpoint": str(result.checkpoint)}
