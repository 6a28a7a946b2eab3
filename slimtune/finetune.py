"""What the fine-tuning verbs share: opening a model or checkpoint for inference, evaluating it, exporting it.

`slimtune chat|generate|eval|export` accept any of: a checkpoint folder written by `slimtune train` on a Hugging Face
model (`out/step-000200`), an out_dir (its newest checkpoint), a Hugging Face model folder, a .gguf file, or a
built-in model name (`smollm2-135m`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune.errors import SlimtuneError
from slimtune.train import checkpoint as ckpt_io


def resolve_source(name_or_path: str) -> str:
    """A checkpoint folder for an out_dir (its newest checkpoint); anything else unchanged. GPT checkpoints are
    refused with the verb that handles them."""
    gpt = _gpt_checkpoint(name_or_path)
    if gpt is not None:
        raise SlimtuneError(f"{gpt} is a checkpoint of slimtune's GPT; use `slimtune sample {gpt}` for it")
    path = _checkpoint_folder(name_or_path)
    return str(path) if (path / "model_config.json").is_file() else name_or_path


def _checkpoint_folder(name_or_path: str) -> Path:
    """`name_or_path` itself, or the newest checkpoint of an out_dir."""
    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "model_config.json").is_file():
        latest = ckpt_io.latest_checkpoint(path)
        if latest is not None:
            path = latest
    return path


def _gpt_checkpoint(name_or_path: str) -> Path | None:
    """The checkpoint folder when `name_or_path` is a checkpoint (or out_dir) of slimtune's GPT, else None."""
    path = _checkpoint_folder(name_or_path)
    if (path / "model_config.json").is_file() and ckpt_io.read_model_config(path).get("kind", "gpt") == "gpt":
        return path
    return None


def open_causal_lm(name_or_path: str, device: str = "auto", trust_remote_code: bool = False):
    """(model in eval mode on the device, tokenizer) for inference."""
    from slimtune.hardware import pick_device

    resolved = resolve_source(name_or_path)
    model, tokenizer = checkpoint_method(resolved).load_for_inference(Path(resolved), trust_remote_code)
    return model.to(pick_device(device)).eval(), tokenizer


@dataclass
class EvalReport:
    examples: int
    loss: float | None
    perplexity: float | None
    scored: int
    accuracy: float | None
    samples: list[tuple[str, str, str]]
    """(prompt, expected, predicted) for the first few scored examples."""

    def format(self) -> str:
        lines = [f"examples     {self.examples}"]
        if self.loss is not None:
            lines.append(f"loss         {self.loss:.4f} (per target token)")
            lines.append(f"perplexity   {self.perplexity:.2f}")
        if self.accuracy is not None:
            lines.append(f"exact match  {self.accuracy:.1%} of {self.scored}")
            for prompt, expected, predicted in self.samples:
                mark = "ok  " if expected.split() == predicted.split() else "MISS"
                lines.append(f"  {mark} {prompt[:60]!r} -> {predicted[:60]!r} (expected {expected[:60]!r})")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_file(model, tokenizer, data: str, max_seq_len: int = 512, batch_size: int = 8, accuracy: bool = False,
                  max_new_tokens: int = 64, chat_template: str | None = None, column_map: dict | None = None,
                  limit: int | None = None, show: int = 5) -> EvalReport:
    """Loss and perplexity over every target token of `data`; with `accuracy`, greedy-decode the prompt of every
    record with a known answer (Alpaca `output`, the last assistant message of a chat) and score exact matches
    (whitespace-normalised)."""
    from slimtune.data.batches import eval_batches
    from slimtune.data.instruct import load_instruction_data
    from slimtune.data.records import read_samples
    from slimtune.infer import generate
    from slimtune.tasks import exact_match

    dataset, _ = load_instruction_data(data, tokenizer, max_seq_len, template=chat_template, column_map=column_map)
    examples = list(dataset)[:limit] if limit else list(dataset)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in eval_batches(examples, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())  # HF shifts labels: position 0 is never a target
        if n:
            total_loss += model(**batch).loss.item() * n
            total_tokens += n
    loss = total_loss / total_tokens if total_tokens else None
    acc, scored, shown = None, 0, []
    if accuracy:
        samples = [s for s in read_samples(data, column_map) if s.messages and s.messages[-1]["role"] == "assistant"]
        samples = samples[:limit] if limit else samples
        if not samples:
            raise SlimtuneError(f"{data}: no record has a known answer (an Alpaca output or a final assistant "
                                f"message), so exact-match accuracy cannot be computed")
        prompts = [s.messages[:-1] for s in samples]
        answers = [s.messages[-1]["content"] for s in samples]
        predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                               template=chat_template, batch_size=batch_size)
        hits = [exact_match(p, a) for p, a in zip(predictions, answers)]
        acc, scored = sum(hits) / len(hits), len(hits)
        shown = [(s.messages[-2]["content"], a, p) for s, a, p in zip(samples, answers, predictions)][:show]
    model.train(was_training)
    return EvalReport(len(examples), loss, math.exp(loss) if loss is not None else None, scored, acc, shown)


def checkpoint_method(source: str):
    """The method that wrote `source` (a checkpoint folder: from its config.yaml), or the `full` method for any other
    model (a Hugging Face folder, a GGUF file, a built-in name): export and inference go through its hooks."""
    import yaml

    from slimtune import methods
    from slimtune.config import TrainConfig, make_config

    config = Path(source) / "config.yaml"
    base = yaml.safe_load(config.read_text()) if config.is_file() and (Path(source) / "trainer.pt").is_file() else None
    return methods.create(make_config(TrainConfig, base=base or {"model": str(source)}))


def export(source: str, out_dir: str, overwrite: bool = False, **options) -> Path:
    """Write `source` (a checkpoint, out_dir or model) as a folder other tools load without slimtune; how is the
    method's business (`Method.export_checkpoint`; `options` are its export options, e.g. merge). A checkpoint of
    slimtune's GPT goes to a method that declares `exports_gpt` (bitnet: as transformers' GPTBigCode with BitNet
    layers); the others refuse it."""
    from slimtune.atomic import check_new_folder

    check_new_folder(out_dir, overwrite)
    gpt = _gpt_checkpoint(source)
    if gpt is not None:
        method = checkpoint_method(str(gpt))
        if not getattr(method, "exports_gpt", False):
            raise SlimtuneError(f"{gpt} is a checkpoint of slimtune's GPT trained with method={method.name}, which "
                                f"has no export; method=bitnet GPTs export (as transformers' GPTBigCode). Use "
                                f"`slimtune sample {gpt}` for this one")
        return method.export_checkpoint(gpt, Path(out_dir), overwrite=overwrite, **options)
    resolved = resolve_source(source)
    return checkpoint_method(resolved).export_checkpoint(Path(resolved), Path(out_dir), overwrite=overwrite,
                                                         **options)
