"""Adapters that start at the 4-bit base's rounding error (LoftQ initialisation, one alternation), for method=qlora.

A QLoRA run starts from the rounded model: on SmolLM2-135M, NF4 rounding raises the demo task's validation loss
from 4.25 to 4.35 before any training, and the adapters spend their first steps undoing it (docs/BENCHMARKS.md
section 8). LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization") starts the adapters instead at
the best rank-r approximation of what rounding lost, ``W - dequantize(quantize(W))``, so base + adapters begin
next to the full-precision model.

Only the first alternation of LoftQ is done here: the base is ``quantize(W)``, exactly what method=qlora stores
without it, so an adapter-only checkpoint still rebuilds the model from the original weights, and the adapter
loads into peft over a base quantized the same way. (LoftQ's further alternations quantize ``W - BA`` instead, a
base that only a saved copy could rebuild; peft's own helper for it runs on CUDA only.) The adapters' rank-r
factors come from a randomized SVD (`torch.svd_lowrank`) under a fixed seed, in a forked RNG so that the run's own
random stream is left as it was.

The original weights are read one tensor at a time from the model folder's safetensors files, so the extra memory
is a few copies of the largest linear weight.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from slimtune.errors import SlimtuneError

OVERSAMPLE = 8
"""Extra columns of the randomized SVD's sketch beyond the rank (its error falls off quickly with them)."""
POWER_ITERATIONS = 4
"""Subspace iterations of the randomized SVD: quantization error has a flat spectrum, which needs a few."""


@torch.no_grad()
def low_rank_factors(residual: torch.Tensor, rank: int, scaling: float, seed: int = 0) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A), ``B: out x rank`` and ``A: rank x in``, with ``scaling * B @ A`` the best rank-`rank` approximation
    of `residual` (to the randomized SVD's accuracy); the singular values are split evenly between B and A."""
    if residual.dim() != 2:
        raise ValueError(f"residual must be a matrix, got shape {tuple(residual.shape)}")
    rank = min(rank, *residual.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(residual.float(), q=min(rank + OVERSAMPLE, *residual.shape),
                                    niter=POWER_ITERATIONS)
    root = (s[:rank] / scaling).sqrt()
    return u[:, :rank] * root, (v[:, :rank] * root).T.contiguous()


class SourceWeights:
    """Tensors of a model folder's safetensors files (one file, or shards listed in model.safetensors.index.json),
    read one at a time by name. Use as a context manager."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self._files = {name: self.folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").is_file():
            self._files = None
        else:
            raise SlimtuneError(f"qlora.init=loftq reads the original weights from the model's safetensors files; "
                                f"{self.folder} has none (no model.safetensors or model.safetensors.index.json): "
                                f"convert the model to safetensors, or use qlora.init=default")
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def __enter__(self) -> "SourceWeights":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _handle(self, file: Path):
        if file not in self._open:
            from safetensors import safe_open

            self._open[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
        return self._open[file]

    def names(self) -> set[str]:
        if self._files is not None:
            return set(self._files)
        return set(self._handle(self.folder / "model.safetensors").keys())

    def get(self, name: str) -> torch.Tensor:
        file = self.folder / "model.safetensors" if self._files is None else self._files.get(name)
        if file is None or name not in self._handle(file).keys():
            raise KeyError(name)
        return self._handle(file).get_tensor(name)

    def find(self, module_name: str, prefixes: tuple[str, ...] = ()) -> torch.Tensor:
        """The weight of the linear layer `module_name`, also looked up with each of `prefixes` removed or added
        (a classifier built from a causal LM's checkpoint names the trunk differently)."""
        key = f"{module_name}.weight"
        candidates = [key]
        for prefix in prefixes:
            candidates += [key.removeprefix(f"{prefix}."), f"{prefix}.{key}"]
        for name in candidates:
            try:
                return self.get(name)
            except KeyError:
                continue
        raise SlimtuneError(f"qlora.init=loftq: no tensor {key!r} in {self.folder}'s safetensors files (tried "
                            f"{', '.join(dict.fromkeys(candidates))}): the files do not name the layers as the loaded "
                            f"model does; use qlora.init=default")
