"""The pipeline engine on two CPU processes (gloo): slimtune's GPT, a tiny Hugging Face Llama with tied embeddings and
a CNN with a skip connection train exactly like the unsplit model, with GPipe, 1F1B and the interleaved schedules."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from slimtune.parallel.partition import equal_layer_split
from slimtune.parallel.units import cut_units
from tests.conftest import free_port

SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved1f1b": 2}  # schedule -> stages per process


class ResidualCNN(nn.Module):
    """A small CNN whose skip connection spans two convolutions (and so, split into units, a stage boundary)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        skip = x
        x = self.conv2(torch.relu(self.conv1(x))) + skip
        return self.head(self.pool(x).flatten(1))


def _gpt():
    from slimtune.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=48, n_layer=3, n_head=2, n_embd=16))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 48, (4, 17), generator=g)
        batches.append((ids[:, :-1], ids[:, 1:]))
    return model, batches, (lambda m, b: m(*b, reduction="sum")[1]), (lambda b: b[1].numel())


def _llama():
    from slimtune.train.loss import causal_lm_loss, count_causal_targets
    from tests.tiny_hf import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=0, tie=True).train()
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        ids = torch.randint(10, len(tokenizer), (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # right padding in one row: the mask travels between the stages
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100  # a prompt without targets
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return (model, batches, (lambda m, b: causal_lm_loss(m, b, reduction="sum")), count_causal_targets)


def _cnn():
    torch.manual_seed(0)
    model = ResidualCNN()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    loss = nn.CrossEntropyLoss(reduction="sum")
    return model, batches, (lambda m, b: loss(m(b[0]), b[1])), (lambda b: b[1].numel())


MODELS = {"gpt": _gpt, "llama": _llama, "cnn": _cnn}


CASES = [("gpt", "1f1b"), ("gpt", "gpipe"), ("llama", "1f1b"), ("cnn", "gpipe"), ("cnn", "interleaved1f1b")]


def _optimizer(params):
    # SGD with momentum, not Adam: Adam divides by the root of the squared gradients, so a gradient that is zero up to
    # float rounding (GPT's attention key bias) takes a full learning-rate step in the direction of the rounding
    # noise, and two exact computations summed in different orders end up 1e-3 apart.
    return torch.optim.SGD(list(params), lr=0.05, momentum=0.9)


def _microbatches(schedule: str) -> int:
    return 2 if schedule == "gpipe" else 4


def _train_pipelined(rank: int, world: int, port: int, out):
    """Every case of CASES, three optimizer steps each, in one pair of processes."""
    import torch.distributed as dist

    from slimtune.parallel.pipeline import PipelineRunner, _tensor_names

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for model_name, schedule in CASES:
            model, batches, _, count = MODELS[model_name]()
            names = _tensor_names(model)
            units = cut_units(model)
            parts = equal_layer_split(len(units), world * SCHEDULES[schedule])
            runner = PipelineRunner(units, parts, schedule, _microbatches(schedule), torch.device("cpu"))
            optimizer = _optimizer(runner.parameters())
            losses = []
            for batch in batches:
                runner.step(batch, 1.0 / count(batch))
                runner.sum_tied_grads()
                optimizer.step()
                optimizer.zero_grad()
                losses.append([float(x) for x in runner.losses])
            params = {name: p.detach().clone().numpy() for p in runner.parameters() for name in names[id(p)]}
            out[(model_name, schedule, rank)] = {"losses": losses if runner.is_last else None, "params": params}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def pipelined():
    """(model, schedule, rank) -> that rank's losses (last stage) and parameters after three steps."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_train_pipelined, args=(2, free_port(), out), nprocs=2, start_method="spawn")
        return dict(out)


def train_unsplit(model_name: str, microbatches: int):
    model, batches, loss_sum, count = MODELS[model_name]()
    optimizer = _optimizer(model.parameters())
    losses = []
    for batch in batches:
        scale = 1.0 / count(batch)
        step = []
        for micro in _split(batch, microbatches):
            loss = loss_sum(model, micro)
            (loss * scale).backward()
            step.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step)
    return losses, {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}


def _split(batch, n: int):
    if isinstance(batch, dict):
        parts = {k: v.tensor_split(n) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(n)]
    parts = [v.tensor_split(n) for v in batch]
    return [tuple(p[i] for p in parts) for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("model_name,schedule", CASES)
def test_pipelined_training_equals_unsplit(pipelined, model_name, schedule):
    ranks = [pipelined[(model_name, schedule, rank)] for rank in (0, 1)]
    losses, params = train_unsplit(model_name, _microbatches(schedule))
    got = ranks[1]["losses"]  # the last stage is on rank 1 (round robin over an even stage count)
    assert len(got) == 3 and all(len(step) == _microbatches(schedule) for step in got)
    for step_got, step_want in zip(got, losses):  # per micro-batch, every step
        assert step_got == pytest.approx(step_want, abs=1e-5, rel=1e-6)
    seen = set()
    for rank in ranks:
        for name, value in rank["params"].items():
            assert torch.allclose(torch.from_numpy(value), params[name], atol=1e-6, rtol=0), name
            seen.add(name)
    assert seen == set(params)  # every parameter lives on some stage


@pytest.mark.slow
@pytest.mark.parametrize("model_name,embedding,head,last_only", [
    ("gpt", "transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"),
    ("llama", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")])
def test_tied_embedding_and_head_stay_equal_across_stages(pipelined, model_name, embedding, head, last_only):
    first, last = pipelined[(model_name, "1f1b", 0)]["params"], pipelined[(model_name, "1f1b", 1)]["params"]
    assert embedding in first and last_only in last and last_only not in first  # embedding and head: two stages
    assert (first[embedding] == last[head]).all()
