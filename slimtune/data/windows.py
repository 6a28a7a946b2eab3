"""Random token windows from a `slimtune prepare` memmap, with a seeded generator that resumes exactly.

Each global batch draws `batch_size x world_size` start offsets uniformly; inputs are tokens [i, i+T) and targets
[i+1, i+T+1). Every DDP rank runs the same generator (numpy's PCG64 seeded by (seed, 0)) and takes its own
contiguous `batch_size` rows of each global batch, so N processes see exactly the rows one process with
batch_size N x B would see. The generator state is a small dict saved in checkpoints, so a resumed run continues
with exactly the batches it would have seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimtune.errors import SlimtuneError


class TokenWindows:
    def __init__(self, path: str | Path, dtype: str, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 device: torch.device | str = "cpu", world_size: int = 1):
        self.path = Path(path)
        if not self.path.is_file():
            raise SlimtuneError(f"token file {self.path} is missing; re-run `slimtune prepare` for this folder")
        self.dtype = np.dtype(dtype)
        self.n_tokens = self.path.stat().st_size // self.dtype.itemsize
        if self.n_tokens < block_size + 1:
            raise SlimtuneError(
                f"{self.path} holds {self.n_tokens} tokens, fewer than gpt.block_size+1 = {block_size + 1} needed "
                f"for one training window; use a smaller gpt.block_size or more text"
            )
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.Generator(np.random.PCG64([seed, 0]))
        self._offsets = np.arange(block_size + 1, dtype=np.int64)  # (T+1,)
        # Opened once and read with one gather per batch. The pages touched are file-backed, so the OS can drop
        # them under pressure; they are not private memory of the training process.
        self._data = np.memmap(self.path, dtype=self.dtype, mode="r")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, block_size) int64 on the target device."""
        starts = self.rng.integers(0, self.n_tokens - self.block_size, size=self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]  # (B,) this rank's rows
        rows = torch.from_numpy(self._data[starts[:, None] + self._offsets].astype(np.int64))  # (B, T+1)
        x, y = rows[:, :-1], rows[:, 1:]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.contiguous().to(self.device), y.contiguous().to(self.device)

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
