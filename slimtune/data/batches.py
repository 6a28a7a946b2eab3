"""Batches of tokenized examples for training and evaluation: right-padded tensors, a shuffled endless stream that
resumes exactly (`InstructionBatches`), several datasets mixed by weight (`MixedBatches`), and one ordered pass."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from slimtune.data.examples import IGNORE_INDEX, Example
from slimtune.errors import SlimtuneError


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one. Returns int64 tensors:

    input_ids (B, T) padded with pad_id; attention_mask (B, T) 1 on tokens, 0 on padding; labels (B, T) padded with
    -100, or (B,) class ids for classification; position_ids (B, T) only when the examples are packed.
    """
    longest = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    token_labels = not isinstance(examples[0].labels, int)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long) if token_labels else torch.tensor(
        [e.labels for e in examples], dtype=torch.long)
    packed = examples[0].position_ids is not None
    position_ids = torch.zeros((batch, longest), dtype=torch.long) if packed else None
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        if token_labels:
            labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        if packed:
            position_ids[row, :n] = torch.tensor(e.position_ids, dtype=torch.long)
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if packed:
        out["position_ids"] = position_ids
    return out


class InstructionBatches:
    """Shuffled batches over a TokenizedDataset, endlessly, epoch after epoch; deterministic and exactly resumable.

    Epoch e visits the examples in the order of a permutation drawn from numpy's PCG64 seeded with (seed, e), so
    the order depends only on (seed, epoch), never on how many batches were drawn before. The state is therefore
    three numbers: the epoch, the position (examples of this epoch already handed out) and the seed.

    With `world_size > 1` every rank builds the same permutation and takes its own contiguous `batch_size` slice of
    each global batch of `batch_size * world_size` examples; the last incomplete global batch of an epoch is then
    skipped (as with `drop_last=True`), so all ranks always step together.
    """

    def __init__(self, dataset: Sequence[Example], batch_size: int, seed: int, pad_id: int, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise SlimtuneError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last or world_size > 1
        self.global_batch = batch_size * world_size
        if len(dataset) == 0 or (self.drop_last and len(dataset) < self.global_batch):
            raise SlimtuneError(f"{len(dataset)} examples cannot fill one batch of {self.global_batch}; "
                                "lower batch_size or add data")
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.dataset))

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch (see `collate` for the keys and shapes), moving on to the next epoch when one ends."""
        remaining = len(self.dataset) - self.position
        if remaining == 0 or (self.drop_last and remaining < self.global_batch):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        chunk = self._order[self.position:self.position + self.global_batch]
        self.position += len(chunk)
        mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return collate([self.dataset[int(i)] for i in mine], self.pad_id)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != len(self.dataset):
            raise SlimtuneError(f"cannot resume the data order: the checkpoint was taken on {state['num_examples']} "
                                f"examples, the data now has {len(self.dataset)}; use the same data and settings")
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation(self.epoch)


class ConcatExamples(Sequence):
    """Several datasets read as one, in order (the evaluation order of a mix; the plain concatenation of data files
    given without weights)."""

    def __init__(self, parts: Sequence[Sequence[Example]]):
        self.parts = list(parts)
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]


class MixedBatches:
    """Batches drawn from several datasets with mixing weights; deterministic and exactly resumable.

    Every example slot of a global batch picks its dataset at random with probability weight / sum(weights): slot k
    of the run (counted over all batches) uses the choices drawn from PCG64 seeded with (seed, k // CHOICE_BLOCK), so
    a choice depends only on (seed, k). Each dataset hands out its examples in its own shuffled order, epoch after
    epoch, as `InstructionBatches` does (permutation seeded with (seed, epoch, dataset index + 1)); a dataset drawn
    more often than its size simply starts its next epoch. The state is the slot count and each dataset's epoch and
    position. One epoch of the mix (`__len__`, what num_epochs counts) is as many examples as all datasets hold
    together. Under data parallelism every rank draws the same global batches and takes its own slice.
    """

    CHOICE_BLOCK = 4096

    def __init__(self, datasets: Sequence[Sequence[Example]], weights: Sequence[float], batch_size: int, seed: int,
                 pad_id: int, rank: int = 0, world_size: int = 1):
        if len(datasets) != len(weights):
            raise SlimtuneError(f"dataset.weights={list(weights)} has {len(weights)} weights for {len(datasets)} data "
                                f"files; give one weight per entry of data=")
        total = float(sum(weights))
        if total <= 0:
            raise SlimtuneError(f"dataset.weights={list(weights)} must sum to a positive number")
        self.datasets = list(datasets)
        self.probabilities = np.asarray(weights, dtype=np.float64) / total
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.slots = 0
        self.epochs = [0] * len(self.datasets)
        self.positions = [0] * len(self.datasets)
        self._orders = [self._permutation(i, 0) for i in range(len(self.datasets))]
        self._choices: tuple[int, np.ndarray] | None = None

    def _permutation(self, index: int, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch, index + 1]))
        return rng.permutation(len(self.datasets[index]))

    def _choice(self, slot: int) -> int:
        block = slot // self.CHOICE_BLOCK
        if self._choices is None or self._choices[0] != block:
            rng = np.random.Generator(np.random.PCG64([self.seed, block]))
            self._choices = (block, rng.choice(len(self.datasets), size=self.CHOICE_BLOCK, p=self.probabilities))
        return int(self._choices[1][slot % self.CHOICE_BLOCK])

    def _next_example(self, index: int) -> Example:
        if self.positions[index] == len(self.datasets[index]):
            self.epochs[index] += 1
            self.positions[index] = 0
            self._orders[index] = self._permutation(index, self.epochs[index])
        position = self.positions[index]
        self.positions[index] += 1
        return self.datasets[index][int(self._orders[index][position])]

    def __len__(self) -> int:
        """Batches per epoch of the mix."""
        return -(-sum(len(d) for d in self.datasets) // self.global_batch)

    def next_batch(self) -> dict[str, torch.Tensor]:
        chosen = [self._choice(self.slots + j) for j in range(self.global_batch)]
        self.slots += self.global_batch
        examples = [self._next_example(i) for i in chosen]  # every rank advances every dataset alike
        return collate(examples[self.rank * self.batch_size:(self.rank + 1) * self.batch_size], self.pad_id)

    def state_dict(self) -> dict:
        return {"slots": self.slots, "epochs": list(self.epochs), "positions": list(self.positions), "seed": self.seed,
                "num_examples": [len(d) for d in self.datasets], "probabilities": self.probabilities.tolist()}

    def load_state_dict(self, state: dict) -> None:
        now = {"num_examples": [len(d) for d in self.datasets], "probabilities": self.probabilities.tolist()}
        if "slots" not in state or any(state[k] != v for k, v in now.items()):
            raise SlimtuneError(f"cannot resume the data order: the checkpoint was taken on another mix of data "
                                f"({state.get('num_examples')} examples), the data now has "
                                f"{now['num_examples']} examples with shares {now['probabilities']}; use the same data "
                                f"and dataset.weights")
        self.seed, self.slots = state["seed"], state["slots"]
        self.epochs, self.positions = list(state["epochs"]), list(state["positions"])
        self._orders = [self._permutation(i, e) for i, e in enumerate(self.epochs)]


def eval_batches(dataset: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over `dataset` in order, in batches of `batch_size` (the last may be smaller)."""
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id)
