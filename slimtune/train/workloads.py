"""What is trained on what: a model, its batches, its loss, and how it is saved.

The training loop is the same for every workload; only these few operations differ:

    LMWorkload          slimtune's GPT from scratch on `slimtune prepare` token memmaps (random windows)
    HFCausalLMWorkload  a Hugging Face causal LM fine-tuned on instruction/chat/text files (chat template, prompt
                        tokens masked, optional packing)
    HFClassifierWorkload  an encoder (BERT/RoBERTa-class) or decoder with a new classification head on JSONL labels

Every workload's data state (`state_dict`) is small and exact, so a resumed run sees exactly the batches that an
uninterrupted run would have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError


def decay_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """AdamW parameter groups: matrices decay; biases and norm weights (every tensor with < 2 dims) never do;
    embedding matrices decay only if `decay_embeddings`. Tied parameters appear once; frozen ones not at all."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        if p.dim() < 2 or (not decay_embeddings and id(p) in embedding_ids):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


class Workload:
    """Interface of a workload (see the module docstring). Attributes set by subclasses:

    model            the raw nn.Module being trained
    model_config     a JSON-able description of the architecture, compared on resume
    n_train_examples examples (windows, conversations) in one pass over the training data
    can_split_rows   whether `split_batch` works (cpu_shards)
    """

    model: nn.Module
    model_config: dict
    n_train_examples: int
    can_split_rows: bool = False

    def next_batch(self) -> Any:
        raise NotImplementedError

    def batch_tokens(self, batch) -> int:
        """Tokens in a micro-batch that the model really processes (padding excluded)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def split_batch(self, batch, n: int) -> list[tuple[Any, float]]:
        """`batch` as `n` row shards with weights such that sum(weight * loss(shard)) == loss(batch) (up to float
        rounding), for `cpu_shards`. Only where `can_split_rows`."""
        raise NotImplementedError

    def eval_batches(self, split: str, max_batches: int):
        """The same batches at every evaluation of `split` ("train" or "val"); empty if there is no such split."""
        raise NotImplementedError

    def flops_per_token(self) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def save_files(self, folder: Path) -> None:
        """Write what besides model.safetensors makes a checkpoint self-describing (config, tokenizer)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# GPT from scratch on token memmaps
# ---------------------------------------------------------------------------------------------------------------


class LMWorkload(Workload):
    can_split_rows = True

    def __init__(self, cfg: TrainConfig, rank: int, device: torch.device):
        from dataclasses import asdict

        from slimtune.data.prepare import read_meta
        from slimtune.data.windows import TokenWindows
        from slimtune.models.gpt import GPT, GPTConfig

        if not cfg.data:
            raise SlimtuneError("no data given: set data=FOLDER (a folder written by `slimtune prepare`)")
        self.data_dir = Path(cfg.data)
        meta = read_meta(self.data_dir)
        self.windows = TokenWindows(self.data_dir / "train.bin", meta["dtype"], cfg.block_size, cfg.batch_size,
                                    cfg.seed, rank, device)
        # Evaluation streams: their own generator (seed + 1) per rank, rewound before every evaluation.
        self._eval = {split: TokenWindows(self.data_dir / f"{split}.bin", meta["dtype"], cfg.block_size,
                                          cfg.batch_size, cfg.seed + 1, rank, device)
                      for split in ("train", "val")} if cfg.eval_interval > 0 else {}
        self.model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=meta["vocab_size"], n_layer=cfg.n_layer,
                                   n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
        self.model_config = asdict(self.model.config)
        self.n_train_examples = max(1, meta["train_tokens"] // cfg.block_size)
        self.cfg = cfg

    def next_batch(self):
        return self.windows.next_batch()

    def batch_tokens(self, batch) -> int:
        return batch[0].numel()

    def loss(self, model, batch):
        return model(*batch)[1]

    def split_batch(self, batch, n: int) -> list[tuple[Any, float]]:
        # Every row is a full window of block_size targets, so a shard's share of the mean loss is its share of rows.
        x, y = batch
        return [((xs, ys), xs.shape[0] / x.shape[0]) for xs, ys in zip(x.tensor_split(n), y.tensor_split(n))]

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

    def flops_per_token(self) -> float:
        return self.model.flops_per_token()

    def state_dict(self) -> dict:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state)

    def save_files(self, folder: Path) -> None:
        import shutil

        shutil.copy2(self.data_dir / "meta.json", folder / "meta.json")
        if (self.data_dir / "tokenizer").is_dir():
            shutil.copytree(self.data_dir / "tokenizer", folder / "tokenizer")

    def describe(self) -> str:
        c = self.cfg
        return f"GPT {c.n_layer}x{c.n_embd}, {self.model.num_params() / 1e6:.2f}M parameters"


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------------------------------


def _weights_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class _HFWorkload(Workload):
    """Shared by the causal-LM and classifier workloads: batches of padded dicts, HF losses, HF checkpoint files."""

    def _init_batches(self, cfg: TrainConfig, train, val, pad_id: int, rank: int, world_size: int, device):
        from slimtune.data.instruct import InstructionBatches

        self.cfg = cfg
        self.device = device
        self.train_set, self.val_set = train, val
        self.pad_id = pad_id
        self.batches = InstructionBatches(train, cfg.batch_size, cfg.seed, pad_id, rank=rank, world_size=world_size)
        self.n_train_examples = len(train)
        self.rank, self.world_size = rank, world_size

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def next_batch(self):
        return self._to_device(self.batches.next_batch())

    def batch_tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    def loss(self, model, batch):
        return model(**batch).loss

    def eval_batches(self, split: str, max_batches: int):
        from slimtune.data.instruct import collate

        dataset = self.val_set if split == "val" else self.train_set
        if dataset is None or len(dataset) == 0:
            return
        # Rank r takes every world_size-th batch of the fixed order, so ranks score disjoint examples.
        bs = self.cfg.batch_size
        starts = list(range(0, len(dataset), bs))[: max_batches * self.world_size]
        for start in starts[self.rank::self.world_size]:
            yield self._to_device(collate([dataset[i] for i in range(start, min(start + bs, len(dataset)))],
                                          self.pad_id))

    def flops_per_token(self) -> float:
        n = sum(p.numel() for p in self.model.parameters())
        c = self.model.config
        layers = getattr(c, "num_hidden_layers", 0)
        width = getattr(c, "hidden_size", 0)
        return 6 * n + 12 * layers * width * self.cfg.max_seq_len

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    def save_files(self, folder: Path) -> None:
        from slimtune.models.hf import write_hf_metadata

        write_hf_metadata(self.model, self.tokenizer, folder)

    def _describe_data(self) -> str:
        val = f", {len(self.val_set)} validation" if self.val_set is not None else ""
        return f"{len(self.train_set)} training sequences{val}"


class HFCausalLMWorkload(_HFWorkload):
    def loss(self, model, batch):
        from slimtune.train.loss import causal_lm_loss

        return causal_lm_loss(model, batch)


    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device):
        from slimtune.data.instruct import load_instruction_data
        from slimtune.models.hf import enable_checkpointing, load_causal_lm

        if not cfg.data:
            raise SlimtuneError("no data given: set data=FILE (Alpaca JSON/JSONL, chat JSONL or a .txt file)")
        self.model, self.tokenizer = load_causal_lm(cfg.model, dtype=_weights_dtype(cfg.weights_dtype),
                                                    trust_remote_code=cfg.trust_remote_code)
        train, val = load_instruction_data(
            cfg.data, self.tokenizer, cfg.max_seq_len, template=cfg.chat_template or None,
            column_map=dict(cfg.column_map) or None, pack=cfg.packing, val_fraction=cfg.val_fraction,
            val_path=cfg.val_data or None, seed=cfg.seed,
        )
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self._init_batches(cfg, train, val, pad_id, rank, world_size, device)
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.model_config = {"kind": "hf-causal-lm", "source": cfg.model, **_arch(self.model)}

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"{type(self.model).__name__} from {self.cfg.model}, {n / 1e6:.1f}M parameters; {self._describe_data()}"


class HFClassifierWorkload(_HFWorkload):
    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device):
        from slimtune.data.instruct import load_classification_data
        from slimtune.models.hf import load_sequence_classifier, load_tokenizer, resolve_model

        if not cfg.data:
            raise SlimtuneError("no data given: set data=FILE (JSONL with text, optional text_pair, and label)")
        tokenizer = load_tokenizer(resolve_model(cfg.model), cfg.trust_remote_code)
        train, val, label2id = load_classification_data(
            cfg.data, tokenizer, cfg.max_seq_len, column_map=dict(cfg.column_map) or None,
            val_fraction=cfg.val_fraction, val_path=cfg.val_data or None, seed=cfg.seed,
        )
        names = [name for name, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
        self.model, self.tokenizer = load_sequence_classifier(
            cfg.model, num_labels=len(names), label_names=names, dtype=_weights_dtype(cfg.weights_dtype),
            trust_remote_code=cfg.trust_remote_code)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._init_batches(cfg, train, val, pad_id, rank, world_size, device)
        self.label2id = label2id
        self.model_config = {"kind": "hf-classifier", "source": cfg.model, "labels": names, **_arch(self.model)}

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (f"{type(self.model).__name__} from {self.cfg.model}, {n / 1e6:.1f}M parameters, "
                f"{len(self.label2id)} labels; {self._describe_data()}")


def _arch(model: nn.Module) -> dict:
    c = model.config
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return {k: getattr(c, k, None) for k in keys}


def build_workload(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> Workload:
    if cfg.model == "gpt":
        return LMWorkload(cfg, rank, device)
    if cfg.task == "classify":
        return HFClassifierWorkload(cfg, rank, world_size, device)
    return HFCausalLMWorkload(cfg, rank, world_size, device)
