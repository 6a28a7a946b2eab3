"""A model family and its workload plug in without touching the loop, a method or a strategy: a toy family (a
next-token bigram model) and the workload that feeds it, registered here in the test file, train, checkpoint and
resume exactly through `slimtune.train` with method=full."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimtune.train  # the package itself is callable: slimtune.train(cfg)
from slimtune.config import TrainConfig, make_config
from slimtune.families import ModelFamily, family_of
from slimtune.models.build import BuiltModel
from slimtune.registry import FAMILIES, WORKLOADS
from slimtune.train.workloads import Workload, build_workload

VOCAB, SEQ = 11, 8


class Bigram(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, vocab)

    def forward(self, x):
        return self.head(self.embed(x))


class ToyFamily(ModelFamily):
    """Toy family: model=toy, a bigram model built from scratch, stored in fp32."""

    workload = "toy-tokens"
    checkpoint_kind = "toy"
    logits_fp32 = False
    loads_pretrained = False

    @classmethod
    def claims(cls, model, cfg):
        return model == "toy"

    def seq_len(self):
        return SEQ

    def build_model(self, spec, load_options):
        return BuiltModel(Bigram(spec["vocab_size"]), {"kind": "toy", "vocab_size": spec["vocab_size"]},
                          "toy bigram model")


class ToyTokens(Workload):
    """Toy workload: random tokens whose next token is always the token plus one, drawn afresh per batch."""

    def __init__(self, cfg, rank, world_size, device, write_cache=True):
        self.cfg, self.device, self.drawn = cfg, device, 0
        self.n_train_examples = 64

    def model_spec(self):
        return {"vocab_size": VOCAB}

    def next_batch(self):
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.drawn)
        self.drawn += 1
        x = torch.randint(0, VOCAB, (self.cfg.batch_size, SEQ), generator=g)
        return x.to(self.device), ((x + 1) % VOCAB).to(self.device)

    def batch_tokens(self, batch):
        return batch[0].numel()

    def count_targets(self, batch):
        return batch[1].numel()

    def loss_sum(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")

    def eval_batches(self, split, max_batches):
        return iter(())

    def forward_flops_per_token(self, model):
        return 2.0 * sum(p.numel() for p in model.parameters())

    def state_dict(self):
        return {"drawn": self.drawn}

    def load_state_dict(self, state):
        self.drawn = state["drawn"]

    def save_files(self, folder, model):
        (folder / "toy.json").write_text(json.dumps({"vocab_size": VOCAB}))

    def describe(self):
        return f"toy tokens ({self.family.name} family)"

    def batches_per_epoch(self):
        return max(1, self.n_train_examples // self.cfg.batch_size)


@pytest.fixture
def toy():
    FAMILIES.register("toy")(ToyFamily)
    WORKLOADS.register("toy-tokens")(ToyTokens)
    yield
    FAMILIES.unregister("toy")
    WORKLOADS.unregister("toy-tokens")


def _cfg(out, *extra):
    return make_config(TrainConfig, overrides=["model=toy", f"out_dir={out}", "batch_size=4", "lr=0.05",
                                               "log.interval=1", "eval.interval=0", "optim.warmup_iters=1",
                                               "optim.lr_decay_iters=6", "runtime.threads=1", "log.progress=false",
                                               "log.plot=false", *extra])


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_the_config_picks_the_toy_family_and_its_workload(toy, tmp_path):
    cfg = _cfg(tmp_path)
    family = family_of(cfg)
    assert isinstance(family, ToyFamily) and family.seq_len() == SEQ
    workload = build_workload(cfg, 0, 1, torch.device("cpu"))
    assert isinstance(workload, ToyTokens) and isinstance(workload.family, ToyFamily)
    assert type(family_of(_cfg(tmp_path, "model=gpt"))).__name__ == "GPTFamily"


def test_toy_workload_trains_checkpoints_and_resumes_exactly(toy, tmp_path, capsys):
    straight = tmp_path / "straight"
    result = slimtune.train(_cfg(straight, "max_iters=6"))
    assert result.step == 6
    out = capsys.readouterr().out
    assert "model: toy bigram model; toy tokens (toy family)" in out
    assert "memory plan: none" in out  # the planner has no estimate for a family that does not give one
    a = _losses(straight)
    assert a[6] < a[1]
    assert (straight / "step-000006" / "toy.json").is_file()
    assert json.loads((straight / "step-000006" / "model_config.json").read_text())["kind"] == "toy"

    resumed = tmp_path / "resumed"
    slimtune.train(_cfg(resumed, "max_iters=3"))
    slimtune.train(_cfg(resumed, "max_iters=6"))  # resume=auto from step 3
    assert _losses(resumed) == a  # bit-identical losses
