"""The `slimtune` command: one verb per task, each mapped to one function (the map is guarded by a test).

Config-driven verbs (`train`, `bench`) take YAML files and `key=value` overrides; `slimtune train --help` lists
every key. Problems the user can fix are printed as one line starting with `error:` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from slimtune.errors import SlimtuneError


def _split_config_args(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate YAML files from key=value overrides (in the order given)."""
    files, overrides = [], []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif item.endswith((".yaml", ".yml")):
            files.append(item)
        else:
            raise SlimtuneError(f"unexpected argument {item!r}: give a config.yaml file or key=value (e.g. batch_size=8)")
    return files, overrides


def _train_config(items: list[str]):
    from slimtune.config import TrainConfig, make_config

    files, overrides = _split_config_args(items)
    return make_config(TrainConfig, files, overrides)


# ---------------------------------------------------------------------------------------------------------------
# verbs
# ---------------------------------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from slimtune.data.prepare import prepare

    inputs = list(args.inputs)
    if args.builtin == "python-docs":
        from slimtune.data.corpus import write_python_docs

        inputs.append(write_python_docs(Path(args.out).with_name(Path(args.out).name + "-source.txt")))
    if not inputs:
        raise SlimtuneError("give input text files, or --builtin python-docs for the built-in corpus")
    meta = prepare(inputs, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                   progress=not args.no_progress)
    print(f"wrote {args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']:,} ({meta['tokenizer']['kind']}), dtype {meta['dtype']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from slimtune.train.loop import dry_run, train

    if args.dry_run:
        print(dry_run(_train_config(args.config)))
        return 0
    result = train(_train_config(args.config))
    return 130 if result.stopped_by_signal else 0


def cmd_sample(args: argparse.Namespace) -> int:
    from slimtune.sample import sample

    if args.prompt is not None and args.prompt_file is not None:
        raise SlimtuneError("give either --prompt or --prompt-file, not both")
    prompt = args.prompt
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SlimtuneError(f"prompt file {path} does not exist")
        prompt = path.read_text(encoding="utf-8")
    texts = sample(args.checkpoint, prompt=prompt or "\n", num_samples=args.num_samples,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   seed=args.seed, device=args.device)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"---------- sample {i + 1}")
        print(text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from slimtune.bench import format_report, run_bench

    result = run_bench(_train_config(args.config), steps=args.steps, warmup=args.warmup, vocab_size=args.vocab_size)
    print(format_report(result))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from slimtune.finetune import open_causal_lm
    from slimtune.infer import chat_loop

    model, tokenizer = open_causal_lm(args.model, args.device, args.trust_remote_code)
    chat_loop(model, tokenizer, sys.stdin, sys.stdout, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k or None, seed=args.seed,
              template=args.chat_template, system_prompt=args.system)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from slimtune.finetune import open_causal_lm
    from slimtune.infer import generate, generate_jsonl

    if (args.prompt is None) == (args.input is None):
        raise SlimtuneError("give either --prompt TEXT or --input FILE.jsonl (with --output FILE.jsonl)")
    if args.input is not None and args.output is None:
        raise SlimtuneError("--input needs --output FILE.jsonl for the results")
    model, tokenizer = open_causal_lm(args.model, args.device, args.trust_remote_code)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                  seed=args.seed, chat=not args.raw, template=args.chat_template, batch_size=args.batch_size)
    if args.prompt is not None:
        print(generate(model, tokenizer, [args.prompt], **kwargs)[0])
    else:
        n = generate_jsonl(args.input, args.output, model, tokenizer, **kwargs)
        print(f"wrote {n} records to {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from slimtune.finetune import evaluate_file, open_causal_lm

    if not Path(args.data).is_file():
        raise SlimtuneError(f"data file {args.data} does not exist")
    model, tokenizer = open_causal_lm(args.model, args.device, args.trust_remote_code)
    report = evaluate_file(model, tokenizer, args.data, max_seq_len=args.max_seq_len, batch_size=args.batch_size,
                           accuracy=args.accuracy, max_new_tokens=args.max_new_tokens,
                           chat_template=args.chat_template, limit=args.limit)
    print(report.format())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from slimtune.finetune import export

    # Only the options given reach the method: one that has none (full, badam) refuses them by name.
    options = {k: v for k, v in (("merge", args.merge), ("quantize", args.quantize)) if v}
    out = export(args.source, args.out_dir, overwrite=args.overwrite, **options)
    if (out / "adapter_config.json").is_file():
        print(f"exported the adapter to {out}: load it with peft.PeftModel.from_pretrained(base_model, {str(out)!r})")
    else:
        print(f"exported to {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from slimtune.demo import run_finetune_demo, run_scratch_demo

    if args.scratch:
        run_scratch_demo(out_dir=args.out or "out/demo-scratch", quick=args.quick)
    else:
        run_finetune_demo(out_dir=args.out or "out/demo", model=args.model, steps=args.steps,
                          method=args.method, n_test=args.test_prompts)
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from slimtune.plan.cli import run

    return run(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    from slimtune.quant.cli import run

    return run(args)


def cmd_split(args: argparse.Namespace) -> int:
    from slimtune.parallel.split import run

    return run(args)


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "sample": cmd_sample,
    "bench": cmd_bench,
    "chat": cmd_chat,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "export": cmd_export,
    "demo": cmd_demo,
    "estimate": cmd_estimate,
    "quantize": cmd_quantize,
    "split": cmd_split,
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint folder or out_dir from slimtune train, a Hugging Face model folder, "
                                 "a .gguf file, or a built-in name (smollm2-135m)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--chat-template", default=None,
                   help="chat template when the tokenizer has none: chatml, alpaca, or a Jinja string")
    p.add_argument("--trust-remote-code", action="store_true", help="let the model folder run its own code")


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate per reply")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimtune",
        description="Train and fine-tune language models that do not fit the hardware you have.",
        epilog="Run `slimtune VERB --help` for the options of a verb.",
    )
    from slimtune import __version__

    parser.add_argument("--version", action="version", version=f"slimtune {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("prepare", help="tokenize text files into train.bin / val.bin token memmaps",
                       description="Tokenize text file(s) into OUT/train.bin, OUT/val.bin and OUT/meta.json.")
    p.add_argument("inputs", nargs="*", help="UTF-8 text files (concatenated in the order given)")
    p.add_argument("--builtin", choices=["python-docs"],
                   help="add a built-in corpus that needs no download (python-docs: the standard library's docstrings)")
    p.add_argument("--out", required=True, help="output folder (replaced if it is an existing data folder)")
    p.add_argument("--tokenizer", default="char",
                   help="'char' (a character vocabulary built from the text) or a Hugging Face tokenizer folder")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens (the last ones) for validation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    from slimtune.config import train_help_text

    config_help = "YAML config files and key=value overrides (section.key=value for sections)"
    p = sub.add_parser("train", help="train a model (from scratch, or fine-tune) with one of the methods",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train according to YAML files and key=value overrides, e.g.\n"
                                   "  slimtune train configs/char_gpt.yaml max_iters=500 batch_size=8",
                       epilog="config keys:\n" + train_help_text())
    p.add_argument("config", nargs="*", help=config_help)
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and check the config, data, model path, out_dir and resume target; print the "
                        "resolved config; train nothing")

    p = sub.add_parser("sample", help="generate text from a checkpoint",
                       description="Generate text from a step-NNNNNN checkpoint folder written by slimtune train.")
    p.add_argument("checkpoint", help="a step-NNNNNN folder, or an out_dir (its newest checkpoint is used)")
    p.add_argument("--prompt", help="text to continue (default: a newline)")
    p.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--num-samples", type=int, default=1, help="number of samples")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=int, default=200, help="sample only among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")

    p = sub.add_parser("bench", help="time forward+backward+step: tokens/s, FLOP/s, MFU, peak memory",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Benchmark one training step for a model config and batch (synthetic tokens), e.g.\n"
                                   "  slimtune bench gpt.n_layer=6 gpt.n_head=6 gpt.n_embd=384 gpt.block_size=256 batch_size=8",
                       epilog="config keys: the same as `slimtune train --help` (data is not needed)")
    p.add_argument("config", nargs="*", help=config_help)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--vocab-size", type=int, default=65, help="size of the synthetic vocabulary (random tokens)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")

    p = sub.add_parser("chat", help="chat interactively with a fine-tuned (or any) causal LM, streaming replies",
                       description="Chat with a model: one message per line, /reset clears history, /exit quits.")
    _add_model_args(p)
    _add_sampling_args(p, temperature=0.7)
    p.add_argument("--system", default=None, help="a system prompt")

    p = sub.add_parser("generate", help="generate replies for a prompt or a JSONL file of prompts",
                       description="Generate with a causal LM: --prompt TEXT, or --input in.jsonl (records with a "
                                   "'prompt' field) --output out.jsonl (the same records with an 'output' field).")
    _add_model_args(p)
    _add_sampling_args(p, temperature=0.0)
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--input", help="JSONL file of records with a 'prompt' field")
    p.add_argument("--output", help="JSONL file to write (records plus 'output')")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text (no chat template)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")

    p = sub.add_parser("eval", help="validation loss / perplexity, and exact-match accuracy, on a data file",
                       description="Evaluate a model on an instruction, chat or text file.")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="Alpaca JSON/JSONL, chat JSONL or .txt file")
    p.add_argument("--accuracy", action="store_true",
                   help="also greedy-decode each prompt and score exact matches against the known answer")
    p.add_argument("--max-seq-len", type=int, default=512, help="truncate sequences to this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer (with --accuracy)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")

    p = sub.add_parser("export", help="write a checkpoint as a folder transformers or peft load without slimtune",
                       description="Export a checkpoint to a folder other tools load without slimtune: a plain "
                                   "transformers folder (safetensors) for full, badam and qat checkpoints; the peft "
                                   "adapter folder for lora and qlora (--merge: the merged model instead); the packed "
                                   "ternary format of transformers' BitNet integration for bitnet.")
    p.add_argument("source", help="a checkpoint folder, an out_dir (newest checkpoint) or a model")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--merge", action="store_true",
                   help="adapter checkpoints (lora, qlora): write the base with the adapter merged in, in fp32 (a "
                        "4-bit base is dequantized, never re-quantized); without it the peft adapter folder alone")
    p.add_argument("--quantize", default=None, choices=["nf4", "fp4"],
                   help="with --merge: re-quantize the merged linear layers to 4 bits (bitsandbytes; can erase a "
                        "small fine-tune, so only on request)")

    p = sub.add_parser("demo", help="fine-tune SmolLM2-135M on a checkable task and show before/after accuracy",
                       description="Fine-tune SmolLM2-135M-Instruct on generated word-reversal data and print the "
                                   "base and fine-tuned exact-match accuracy on held-out prompts (2.5-6.5 minutes on "
                                   "a 2-core CPU, depending on the host). --scratch trains a small GPT from scratch instead.")
    p.add_argument("--out", default=None, help="output folder (default out/demo or out/demo-scratch)")
    p.add_argument("--model", default="smollm2-135m", help="the causal LM to fine-tune")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    p.add_argument("--method", default=None, help="a registered method (full, badam, lora, qlora, ...); default: "
                                                  "badam")
    p.add_argument("--test-prompts", type=int, default=30, help="held-out prompts scored before and after")
    p.add_argument("--scratch", action="store_true", help="train a small GPT from scratch on Python's docstrings")
    p.add_argument("--quick", action="store_true", help="with --scratch: a much shorter run (smoke test)")
    from slimtune.plan.cli import add_parser as add_estimate
    from slimtune.parallel.split import add_parser as add_split
    from slimtune.quant.cli import add_parser as add_quantize

    add_estimate(sub)
    add_quantize(sub)
    add_split(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.verb](args)
    except SlimtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: a user mistake is always a SlimtuneError, raised where it is detected
        path = _save_traceback(args)
        print(f"error: internal error ({type(exc).__name__}: {exc}). This is a bug in slimtune, not a mistake in "
              f"your input; the traceback is saved in {path}. Please report it with that file.", file=sys.stderr)
        return 1


def _save_traceback(args: argparse.Namespace) -> Path:
    """Write the current exception's traceback into the run's out_dir (train) or a temporary folder."""
    import tempfile
    import time
    import traceback

    folder = Path(tempfile.gettempdir())
    for item in getattr(args, "config", None) or []:
        if item.startswith("out_dir="):
            folder = Path(item.split("=", 1)[1])
    name = f"slimtune-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(f"slimtune {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    except OSError:
        path = Path(tempfile.gettempdir()) / name
        path.write_text(traceback.format_exc())
    return path


if __name__ == "__main__":
    raise SystemExit(main())
