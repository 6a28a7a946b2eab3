"""`slimtune quantize MODEL --scheme sym|asym --granularity tensor|channel --out DIR`: post-training int8
quantization of a causal LM's linear layers, with a before/after report (perplexity, exact match, bytes).

The output folder loads in `slimtune eval|generate|chat` (its `slimtune_quantization.json` tells slimtune's loader
to rebuild the int8 layers). Symmetric weights without --activations (per channel or per tensor) are written in
torchao's int8 weight-only layout with slimtune's codes, so plain ``transformers.AutoModelForCausalLM
.from_pretrained`` (with torchao installed) loads that folder too (`slimtune.quant.torchao_int8`); asymmetric
weights and static int8 activations have no matching transformers format and load only in slimtune.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.errors import SlimtuneError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `quantize` verb to the CLI's subparsers; returns its parser."""
    p = subparsers.add_parser(
        "quantize", help="post-training int8 quantization of a model's linear layers, with a before/after report",
        description="Quantize every linear layer (but the output head) of a model to int8 codes with scales, write "
                    "a folder that slimtune eval/generate/chat load, and report perplexity and bytes before and "
                    "after. A method=qat checkpoint gets exactly the weights it trained against. With --scheme sym "
                    "and no --activations the folder is in torchao's int8 weight-only format, which plain "
                    "transformers (with torchao) loads too; asym and --activations folders load only in slimtune.")
    p.add_argument("model", help="a checkpoint folder or out_dir from slimtune train (also method=qat), a Hugging "
                                 "Face model folder, a .gguf file, or a built-in name (smollm2-135m)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--scheme", default="sym", help="sym: zero point 0, scale max|w|/127; asym: scale "
                                                   "(max-min)/255 with a zero point (default sym)")
    p.add_argument("--granularity", default="channel", help="channel: one scale per output channel; tensor: one "
                                                            "per weight matrix (default channel)")
    p.add_argument("--activations", action="store_true",
                   help="also quantize each linear layer's input to int8 with a static, calibrated range "
                        "(needs --calibration)")
    p.add_argument("--calibration", default=None, help="instruction, chat or .txt file whose first --samples "
                                                       "records calibrate the input ranges")
    p.add_argument("--samples", type=int, default=32, help="calibration records to use (default 32)")
    p.add_argument("--observer", default="minmax", help="minmax (extremes seen) or percentile (default minmax)")
    p.add_argument("--percentile", type=float, default=99.99, help="with --observer percentile (default 99.99)")
    p.add_argument("--eval", default=None, help="a data file to report perplexity on, before and after")
    p.add_argument("--accuracy", action="store_true", help="with --eval: also exact-match accuracy (greedy decoding "
                                                           "of every record with a known answer)")
    p.add_argument("--limit", type=int, default=None, help="with --eval: only the first N records")
    p.add_argument("--max-seq-len", type=int, default=512, help="truncate sequences to this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (calibration and eval)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--trust-remote-code", action="store_true", help="let the model folder run its own code")
    return p


@dataclass
class QuantizeReport:
    out_dir: Path
    layers: int
    weight_bytes_before: int
    """Bytes of the quantized layers' weights before (their floating-point dtype)."""
    weight_bytes_after: int
    """Bytes of their int8 codes, scales and zero points."""
    kernel: str
    """The product kernels the quantized layers ran on this machine (in the evaluation and for one decoded token):
    torch's int8 kernels, or dequantize + fp matmul."""
    loss: dict = field(default_factory=dict)
    """{"before": per-token loss, "after": ...} when evaluated."""
    accuracy: dict = field(default_factory=dict)
    loads_in: str = "slimtune eval/generate/chat"
    """Which loaders read the folder."""

    def format(self, settings_line: str) -> str:
        from slimtune.memory import format_bytes

        rows = [("", "before", "after")]
        if self.loss:
            rows.append(("perplexity", *(f"{math.exp(self.loss[k]):.3f}" for k in ("before", "after"))))
            rows.append(("loss per token", *(f"{self.loss[k]:.4f}" for k in ("before", "after"))))
        if self.accuracy:
            rows.append(("exact match", *(f"{self.accuracy[k]:.1%}" for k in ("before", "after"))))
        rows.append(("linear weight bytes", format_bytes(self.weight_bytes_before),
                     format_bytes(self.weight_bytes_after)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        return "\n".join([f"{settings_line}: {self.layers} linear layers (products: {self.kernel})", *table,
                          f"wrote {self.out_dir} (loads in {self.loads_in})"])


def quantize_to_folder(model_source: str, out_dir: str | Path, *, settings=None, calibration: str | None = None,
                       samples: int = 32, eval_file: str | None = None, accuracy: bool = False,
                       limit: int | None = None, max_seq_len: int = 512, batch_size: int = 8,
                       overwrite: bool = False, trust_remote_code: bool = False) -> QuantizeReport:
    """Quantize ``model_source`` (anything slimtune loads) into ``out_dir``; the report of what changed."""
    from slimtune.finetune import evaluate_file, open_causal_lm
    import torch

    from slimtune.quant.layers import linear_names, linear_weight_bytes
    from slimtune.quant.ptq import QuantizeSettings, quantize_model, save_quantized
    from slimtune.quant.torchao_int8 import transformers_loadable

    settings = settings or QuantizeSettings()
    if settings.activations and calibration is None:
        raise SlimtuneError("--activations needs calibration data: pass --calibration FILE (an instruction, chat or "
                            ".txt file) so each layer's input range can be measured")
    for label, path in (("calibration", calibration), ("eval", eval_file)):
        if path is not None and not Path(path).is_file():
            raise SlimtuneError(f"{label} file {path} does not exist")
    if samples < 1:
        raise SlimtuneError(f"--samples must be at least 1, got {samples}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise SlimtuneError(f"output folder {out_dir} already exists and is not empty; choose another folder or "
                            "pass --overwrite")

    model, tokenizer = open_causal_lm(model_source, "cpu", trust_remote_code)
    names = linear_names(model, settings.skip)
    before_bytes = sum(linear_weight_bytes(model.get_submodule(n)) for n in names)
    report_loss, report_acc = {}, {}

    def evaluate(stage: str) -> None:
        if eval_file is None:
            return
        r = evaluate_file(model, tokenizer, eval_file, max_seq_len=max_seq_len, batch_size=batch_size,
                          accuracy=accuracy, limit=limit)
        if r.loss is not None:
            report_loss[stage] = r.loss
        if r.accuracy is not None:
            report_acc[stage] = r.accuracy

    evaluate("before")
    batches = None
    if settings.activations:
        batches = _calibration_batches(tokenizer, calibration, samples, max_seq_len, batch_size)
    layers = quantize_model(model, settings, batches)
    after_bytes = sum(model.get_submodule(n).weight_bytes() for n in layers)
    evaluate("after")
    with torch.no_grad():  # one token through the model, as in decoding: the kernels may differ from a batch's
        model(input_ids=torch.zeros(1, 1, dtype=torch.long))
    kernels = ", ".join(sorted(set().union(*(model.get_submodule(n).kernels_used for n in layers))))
    save_quantized(model, tokenizer, out_dir, settings, layers, overwrite=overwrite, source=str(model_source))
    loads_in = "slimtune eval/generate/chat only (slimtune's own int8 format)"
    if transformers_loadable(settings.scheme, settings.granularity, settings.bits, settings.activations):
        loads_in = ("slimtune eval/generate/chat and plain transformers with torchao (torchao int8 weight-only "
                    "format)")
    return QuantizeReport(out_dir, len(layers), before_bytes, after_bytes, kernels,
                          report_loss if len(report_loss) == 2 else {}, report_acc if len(report_acc) == 2 else {},
                          loads_in)


def _calibration_batches(tokenizer, path: str, samples: int, max_seq_len: int, batch_size: int) -> list[dict]:
    from slimtune.data.batches import eval_batches
    from slimtune.data.instruct import load_instruction_data

    dataset, _ = load_instruction_data(path, tokenizer, max_seq_len)
    examples = list(dataset)[:samples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return list(eval_batches(examples, batch_size, pad_id))


def run(args: argparse.Namespace) -> int:
    """The `slimtune quantize` verb."""
    from slimtune.quant.ptq import QuantizeSettings

    settings = QuantizeSettings(scheme=args.scheme, granularity=args.granularity, activations=args.activations,
                                observer=args.observer, percentile=args.percentile)
    report = quantize_to_folder(args.model, args.out, settings=settings, calibration=args.calibration,
                                samples=args.samples, eval_file=args.eval, accuracy=args.accuracy, limit=args.limit,
                                max_seq_len=args.max_seq_len, batch_size=args.batch_size, overwrite=args.overwrite,
                                trust_remote_code=args.trust_remote_code)
    what = (f"int8 {settings.scheme} {settings.granularity} weights"
            f"{', static int8 inputs (' + settings.observer + ')' if settings.activations else ''}")
    print(report.format(what))
    return 0
