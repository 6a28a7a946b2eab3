"""What is trained on: data, batches, and the loss of a batch. The model itself is built by `slimtune.models.build`.

The training loop is the same for every workload; only these few operations differ:

    LMWorkload            slimtune's GPT from scratch on `slimtune prepare` token memmaps (random windows)
    HFCausalLMWorkload    a Hugging Face causal LM fine-tuned on instruction/chat/text files (chat template, prompt
                          tokens masked, optional packing)
    HFClassifierWorkload  an encoder (BERT/RoBERTa-class) or decoder with a new classification head on JSONL labels

Workloads register themselves in `slimtune.registry.WORKLOADS`; the run's model family (`slimtune.families`) names
the one that trains it, and `build_workload` builds that one and hands it the family (`workload.family`), so the
loop, the methods and the strategies ask the workload or its family rather than the config which kind of model runs.

The loss of a batch is a *sum* over its targets (`loss_sum`), and `count_targets` says how many there are without
running the model: a strategy divides by the targets of the whole optimizer step (all micro-batches, all ranks), so
gradient accumulation and data parallelism weigh every target token equally, however the tokens fall into
micro-batches. Every workload's data state (`state_dict`) is small and exact, so a resumed run sees exactly the
batches that an uninterrupted run would have seen. `batches_per_epoch` is the length of one pass over the data: it
turns num_epochs into steps and marks the epochs in the log.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.registry import WORKLOADS


class Workload:
    """Interface of a workload (see the module docstring). Attributes set by subclasses:

    n_train_examples  examples (windows, conversations) in one pass over the training data
    family            the run's `slimtune.families.ModelFamily` (set by `build_workload`)
    """

    n_train_examples: int
    family: Any = None

    def model_spec(self) -> dict:
        """What the model builder needs to know from the data (e.g. the vocabulary size, the labels)."""
        return {}

    def next_batch(self) -> Any:
        raise NotImplementedError

    def batch_tokens(self, batch) -> int:
        """Tokens in a micro-batch that the model really processes (padding excluded)."""
        raise NotImplementedError

    def count_targets(self, batch) -> int:
        """Targets (predicted tokens, or labelled examples) in a micro-batch: what `loss_sum` sums over."""
        raise NotImplementedError

    def loss_sum(self, model: nn.Module, batch) -> torch.Tensor:
        """Sum of the per-target losses of `batch` (a scalar tensor)."""
        raise NotImplementedError

    def eval_batches(self, split: str, max_batches: int) -> Iterator:
        """The same batches at every evaluation of `split` ("train" or "val"); empty if there is no such split.
        Under data parallelism each rank yields its own share."""
        raise NotImplementedError

    def forward_flops_per_token(self, model: nn.Module) -> float:
        """Forward FLOPs per token: 2 per weight of the matmuls plus attention's score and value products."""
        raise NotImplementedError

    def compile(self, model: nn.Module) -> None:
        """torch.compile what the loss really runs, in place (state-dict keys unchanged)."""
        model.compile()

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def save_files(self, folder: Path, model: nn.Module) -> None:
        """Write what besides the weights makes a checkpoint self-describing (config, tokenizer)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def batches_per_epoch(self) -> int:
        """Micro-batches (over all ranks together) in one pass over the training data."""
        raise NotImplementedError

    def steps_for_epochs(self, num_epochs: float, grad_accum: int) -> int:
        """Optimizer steps of `num_epochs` passes over the training data (the last step may run into the next)."""
        return max(1, math.ceil(num_epochs * self.batches_per_epoch() / grad_accum))

    def epoch_events(self, step: int, grad_accum: int) -> list[dict]:
        """An `epoch` record (with its terminal line) when the batches of `step` completed a pass over the data."""
        per_epoch = self.batches_per_epoch()
        done = step * grad_accum // per_epoch
        if done == (step - 1) * grad_accum // per_epoch:
            return []
        return [{"kind": "epoch", "step": step, "epoch": done,
                 "message": f"epoch {done} done at step {step} ({per_epoch} batches per epoch)"}]


# ---------------------------------------------------------------------------------------------------------------
# GPT from scratch on token memmaps
# ---------------------------------------------------------------------------------------------------------------


@WORKLOADS.register("gpt")
class LMWorkload(Workload):
    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, write_cache: bool = True):
        from slimtune.data.prepare import read_meta
        from slimtune.data.windows import TokenWindows

        if not cfg.data:
            raise SlimtuneError("no data given: set data=FOLDER (a folder written by `slimtune prepare`)")
        if not isinstance(cfg.data, str):
            raise SlimtuneError(f"data={cfg.data}: model=gpt trains on one folder written by `slimtune prepare`; "
                                "prepare several text files into one folder instead")
        self.data_dir = Path(cfg.data)
        meta = read_meta(self.data_dir)
        g = cfg.gpt

        def windows(split: str, seed: int) -> TokenWindows:
            return TokenWindows(self.data_dir / f"{split}.bin", meta["dtype"], g.block_size, cfg.batch_size, seed,
                                rank, device, world_size)

        self.windows = windows("train", cfg.seed)
        # Evaluation streams: their own generator (seed + 1), rewound before every evaluation.
        self._eval = {split: windows(split, cfg.seed + 1) for split in ("train", "val")} if cfg.eval.interval else {}
        self.vocab_size = meta["vocab_size"]
        self.n_train_examples = max(1, meta["train_tokens"] // g.block_size)
        self.global_batch = cfg.batch_size * world_size

    def model_spec(self) -> dict:
        return {"vocab_size": self.vocab_size}

    def next_batch(self):
        return self.windows.next_batch()

    def batch_tokens(self, batch) -> int:
        return batch[0].numel()

    def count_targets(self, batch) -> int:
        return batch[1].numel()

    def loss_sum(self, model, batch):
        return model(*batch, reduction="sum")[1]

    def eval_batches(self, split: str, max_batches: int):
        w = self._eval.get(split)
        if w is None:
            return
        start = w.state_dict()
        try:
            for _ in range(max_batches):
                yield w.next_batch()
        finally:
            w.load_state_dict(start)

    def forward_flops_per_token(self, model) -> float:
        return model.forward_flops_per_token()

    def state_dict(self) -> dict:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state)

    def save_files(self, folder: Path, model) -> None:
        import shutil

        shutil.copy2(self.data_dir / "meta.json", folder / "meta.json")
        if (self.data_dir / "tokenizer").is_dir():
            shutil.copytree(self.data_dir / "tokenizer", folder / "tokenizer")

    def describe(self) -> str:
        return f"{self.n_train_examples:,} training windows from {self.data_dir}"

    def batches_per_epoch(self) -> int:
        # Windows start at random offsets: an epoch is as many windows as the tokens fill end to end.
        return max(1, math.ceil(self.n_train_examples / self.global_batch))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------------------------------


class _HFWorkload(Workload):
    """Shared by the causal-LM and classifier workloads: batches of padded dicts, HF checkpoint files."""

    def _init_batches(self, cfg, train: list, val: list, pad_id: int, rank: int, world_size: int, device):
        """Batches over the training sets `train` (one per data file): mixed by dataset.weights when given, else
        all their examples once per epoch. `val` holds the validation sets (evaluated as one)."""
        from slimtune.data.batches import ConcatExamples, InstructionBatches, MixedBatches

        self.cfg = cfg
        self.device = device
        self.train_set = train[0] if len(train) == 1 else ConcatExamples(train)
        self.val_set = None if not val else val[0] if len(val) == 1 else ConcatExamples(val)
        self.pad_id = pad_id
        if cfg.dataset.weights and len(train) > 1:
            self.batches = MixedBatches(train, cfg.dataset.weights, cfg.batch_size, cfg.seed, pad_id, rank, world_size)
        else:
            self.batches = InstructionBatches(self.train_set, cfg.batch_size, cfg.seed, pad_id, rank=rank,
                                              world_size=world_size)
        self.n_train_examples = len(self.train_set)
        self.rank, self.world_size = rank, world_size

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def next_batch(self):
        return self._to_device(self.batches.next_batch())

    def batch_tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    def eval_batches(self, split: str, max_batches: int):
        from slimtune.data.batches import collate

        dataset = self.val_set if split == "val" else self.train_set
        if dataset is None or len(dataset) == 0:
            return
        # Rank r takes every world_size-th batch of the fixed order, so ranks score disjoint examples.
        bs = self.cfg.batch_size
        starts = list(range(0, len(dataset), bs))[: max_batches * self.world_size]
        for start in starts[self.rank::self.world_size]:
            yield self._to_device(collate([dataset[i] for i in range(start, min(start + bs, len(dataset)))],
                                          self.pad_id))

    def forward_flops_per_token(self, model) -> float:
        n = sum(p.numel() for p in model.parameters())
        c = model.config
        layers = getattr(c, "num_hidden_layers", 0)
        width = getattr(c, "hidden_size", 0)
        return 2 * n + 4 * layers * width * self.cfg.dataset.max_seq_len

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    def save_files(self, folder: Path, model) -> None:
        from slimtune.models.hf import write_hf_metadata

        write_hf_metadata(model, self.tokenizer, folder)

    def batches_per_epoch(self) -> int:
        return len(self.batches)

    def describe(self) -> str:
        val = f", {len(self.val_set)} validation" if self.val_set is not None else ""
        cached = f" (tokenized data read back from {self.cache.folder})" if self.from_cache else ""
        return f"{len(self.train_set)} training sequences{val}{cached}"


@WORKLOADS.register("hf-causal-lm")
class HFCausalLMWorkload(_HFWorkload):
    """Tokenized data is cached in out_dir/data-cache (`slimtune.data.cache`); `write_cache=False` only reads it."""

    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, write_cache: bool = True):
        from slimtune.data.cache import FOLDER, TokenCache
        from slimtune.data.instruct import data_sources, load_instruction_data
        from slimtune.models.hf import load_tokenizer, resolve_model

        if not cfg.data:
            raise SlimtuneError("no data given: set data=FILE (Alpaca JSON/JSONL, chat JSONL, a .txt file, parquet, "
                                "or a list of them)")
        d = cfg.dataset
        self.tokenizer = load_tokenizer(resolve_model(cfg.model), cfg.hf.trust_remote_code)
        self.cache = TokenCache(Path(cfg.out_dir) / FOLDER, write=write_cache)

        def load(path: str, column_map: dict, role_map: dict, val_fraction: float):
            return load_instruction_data(path, self.tokenizer, d.max_seq_len, template=d.chat_template or None,
                                         column_map=column_map or None, pack=d.packing, val_fraction=val_fraction,
                                         seed=cfg.seed, role_map=role_map or None, cache=self.cache)

        # Each file keeps its own held-out share; dataset.val_data replaces them all.
        parts = [load(s.path, s.column_map, s.role_map, 0.0 if d.val_data else d.held_out_fraction)
                 for s in data_sources(cfg.data, d.column_map, d.role_map)]
        train = [t for t, _ in parts]
        if d.val_data:
            val = [load(d.val_data, d.column_map, d.role_map, 0.0)[0]]
        else:
            val = [v for _, v in parts if v is not None]
        self.from_cache = [t.cached_in for t in train if t.cached_in is not None]
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._init_batches(cfg, train, val, pad_id, rank, world_size, device)

    def count_targets(self, batch) -> int:
        from slimtune.train.loss import count_causal_targets

        return count_causal_targets(batch)

    def loss_sum(self, model, batch):
        from slimtune.train.loss import causal_lm_loss

        return causal_lm_loss(model, batch, reduction="sum")

    def compile(self, model) -> None:
        from slimtune.train.loss import fused_head_backbone

        # The chunked loss runs the backbone and then the head inside the loss: compile the backbone, which is
        # what really runs, not the outer module whose forward is never called.
        (fused_head_backbone(model) or model).compile()


@WORKLOADS.register("hf-classifier")
class HFClassifierWorkload(_HFWorkload):
    """Tokenized data is cached as for the causal LM (`HFCausalLMWorkload`), the label ids with it."""

    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, write_cache: bool = True):
        from slimtune.data.cache import FOLDER, TokenCache
        from slimtune.data.classify import load_classification_data
        from slimtune.models.hf import load_tokenizer, resolve_model

        if not cfg.data:
            raise SlimtuneError("no data given: set data=FILE (JSONL with text, optional text_pair, and label)")
        if not isinstance(cfg.data, str):
            raise SlimtuneError(f"data={cfg.data}: hf.task=classify trains on one data file; join the files into one")
        d = cfg.dataset
        self.tokenizer = load_tokenizer(resolve_model(cfg.model), cfg.hf.trust_remote_code)
        self.cache = TokenCache(Path(cfg.out_dir) / FOLDER, write=write_cache)
        train, val, label2id = load_classification_data(
            cfg.data, self.tokenizer, d.max_seq_len, column_map=dict(d.column_map) or None,
            val_fraction=d.held_out_fraction, val_path=d.val_data or None, seed=cfg.seed, cache=self.cache,
        )
        self.from_cache = [train.cached_in] if train.cached_in is not None else []
        self.label_names = [name for name, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._init_batches(cfg, [train], [val] if val is not None else [], pad_id, rank, world_size, device)
        self.label2id = label2id

    def model_spec(self) -> dict:
        return {"label_names": self.label_names}

    def count_targets(self, batch) -> int:
        return int(batch["labels"].shape[0])

    def loss_sum(self, model, batch):
        return model(**batch).loss * batch["labels"].shape[0]  # the model's loss is the batch mean

    def describe(self) -> str:
        return f"{super().describe()}, {len(self.label2id)} labels"


def build_workload(cfg, rank: int, world_size: int, device: torch.device, write_cache: bool = True) -> Workload:
    """The workload of `cfg`'s model family; `write_cache=False` (a dry run) writes no tokenized-data cache."""
    from slimtune.families import family_of

    family = family_of(cfg)
    workload = WORKLOADS.get(family.workload)(cfg, rank, world_size, device, write_cache=write_cache)
    workload.family = family
    return workload
