"""`slimtune sample`: generate text from a checkpoint folder written by `slimtune train`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimtune.data.tokenizer import load_tokenizer
from slimtune.errors import SlimtuneError
from slimtune.hardware import pick_device
from slimtune.models.gpt import GPT, GPTConfig
from slimtune.train import checkpoint as ckpt_io


def find_checkpoint(path: str | Path) -> Path:
    """A step-NNNNNN folder as given, or the newest complete one inside an out_dir."""
    path = Path(path)
    if not path.exists():
        raise SlimtuneError(f"checkpoint {path} does not exist")
    if (path / "model_config.json").is_file():
        return path
    latest = ckpt_io.latest_checkpoint(path)
    if latest is None:
        raise SlimtuneError(f"{path} is neither a checkpoint folder nor an out_dir containing step-NNNNNN checkpoints")
    return latest


def load_gpt_checkpoint(path: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, tokenizer, checkpoint folder) from a checkpoint or out_dir."""
    ckpt = find_checkpoint(path)
    from slimtune.finetune import checkpoint_method

    # The method that trained it rebuilds its layers (qat, bitnet) and state (bitnet's quantization strength)
    # before the weights load.
    method = checkpoint_method(str(ckpt))
    model = method.prepare(GPT(GPTConfig(**ckpt_io.read_model_config(ckpt))))
    method.load_state_dict(ckpt_io.load_state(ckpt, "trainer.pt").get("method", {}))
    method.load_weights(model, ckpt)
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        raise SlimtuneError(f"{ckpt} has no meta.json (tokenizer description); it was not written by slimtune train")
    tokenizer = load_tokenizer(json.loads(meta_path.read_text(encoding="utf-8")), ckpt)
    return model.to(device).eval(), tokenizer, ckpt


def sample(checkpoint: str | Path, prompt: str = "\n", num_samples: int = 1, max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: int | None = 200, seed: int = 1337, device: str = "auto") -> list[str]:
    """Generate `num_samples` continuations of `prompt` (returned with the prompt included)."""
    if num_samples < 1 or max_new_tokens < 1:
        raise SlimtuneError("num_samples and max_new_tokens must be at least 1")
    if temperature < 0:
        raise SlimtuneError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    dev = pick_device(device)
    model, tokenizer, _ = load_gpt_checkpoint(checkpoint, dev)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise SlimtuneError("the prompt encodes to no tokens; give a non-empty --prompt")
    generator = torch.Generator(device=dev).manual_seed(seed)
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    out = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, generator=generator)
    return [tokenizer.decode(row.tolist()) for row in out]
