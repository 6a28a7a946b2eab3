"""CPU batch shards: when they are used, that they give the unsharded gradients, repeatably, and clean up."""

import contextlib

import pytest
import torch

from slimtune.config import TrainConfig
from slimtune.errors import SlimtuneError
from slimtune.models.gpt import GPT, GPTConfig
from slimtune.train.shards import AUTO_MAX_EXTRA_GRAD_BYTES, ShardedBackward, cpu_shards_for, resolve_cpu_shards

CPU = torch.device("cpu")


def resolve(requested, device=CPU, batch_size=8, threads=2, grad_bytes=1000, blockers=()):
    return resolve_cpu_shards(requested, device=device, batch_size=batch_size, threads=threads,
                              trainable_grad_bytes=grad_bytes, blockers=blockers)


def test_auto_uses_one_shard_per_thread_only_where_it_is_safe_and_small():
    assert resolve(0) == 2
    assert resolve(0, threads=4, batch_size=3) == 3  # never more shards than sequences
    assert resolve(0, threads=1) == 1
    assert resolve(0, batch_size=1) == 1
    assert resolve(0, device=torch.device("cuda")) == 1
    assert resolve(0, blockers=["dropout=0.1"]) == 1
    assert resolve(0, grad_bytes=AUTO_MAX_EXTRA_GRAD_BYTES) == 2
    assert resolve(0, grad_bytes=AUTO_MAX_EXTRA_GRAD_BYTES + 1) == 1
    assert resolve(1) == 1
    assert resolve(3, threads=2) == 3  # an explicit number is taken as given


@pytest.mark.parametrize("kwargs, message", [
    (dict(blockers=["dropout=0.1", "torchrun/DDP"]), "cpu_shards=2 cannot be used with dropout=0.1, torchrun/DDP"),
    (dict(batch_size=1), "cpu_shards=2 is more than batch_size=1"),
    (dict(device=torch.device("cuda")), "cpu_shards=2 applies to CPU training, but device is cuda"),
])
def test_explicit_shards_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(SlimtuneError, match=message):
        resolve(2, **kwargs)


def test_blockers_come_from_the_config():
    model = torch.nn.Linear(4, 4)
    ok = TrainConfig(batch_size=4, cpu_shards=2)
    assert cpu_shards_for(ok, CPU, model, distributed=False, can_split_rows=True) == 2
    bad = TrainConfig(batch_size=4, cpu_shards=2, dropout=0.1, method="badam", compile=True)
    with pytest.raises(SlimtuneError) as err:
        cpu_shards_for(bad, CPU, model, distributed=True, can_split_rows=False)
    for blocker in ("model=gpt (only model=gpt batches split by rows)", "method=badam", "dropout=0.1",
                    "compile=true", "torchrun/DDP"):
        assert blocker in str(err.value)


def test_negative_cpu_shards_is_a_config_error():
    with pytest.raises(SlimtuneError, match="cpu_shards must be >= 0, got -1"):
        TrainConfig(cpu_shards=-1)


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, bias=True))


def shard_rows(x, y, n):
    return [((a, b), a.shape[0] / x.shape[0]) for a, b in zip(x.tensor_split(n), y.tensor_split(n))]


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("n", [2, 3])
def test_sharded_gradients_equal_the_whole_batch_and_repeat_bit_for_bit(n):
    model = tiny_gpt()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 37, (5, 16), generator=g), torch.randint(0, 37, (5, 16), generator=g)
    whole_loss = model(x, y)[1]
    whole_loss.backward()
    whole = grads(model)
    params = list(model.parameters())

    runs = []
    with ShardedBackward(n, contextlib.nullcontext) as sharded:
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            loss = sharded(lambda b: model(*b)[1], shard_rows(x, y, n), 1.0, params)
            runs.append((loss, grads(model)))
    for loss, got in runs:
        assert torch.allclose(loss, whole_loss.detach(), rtol=1e-6, atol=0)
        for name, ref in whole.items():
            assert torch.allclose(got[name], ref, rtol=1e-4, atol=1e-6), name
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in whole)  # exact: resume depends on it


def test_sharded_micro_batches_accumulate_with_their_scale():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 37, (4, 16), generator=g), torch.randint(0, 37, (4, 16), generator=g)
    (model(x, y)[1] * 0.5).backward()
    (model(x, y)[1] * 0.5).backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    with ShardedBackward(2, contextlib.nullcontext) as sharded:
        for _ in range(2):  # grad_accum=2 on the same batch
            sharded(lambda b: model(*b)[1], shard_rows(x, y, 2), 0.5, list(model.parameters()))
    for name, got in grads(model).items():
        assert torch.allclose(got, ref[name], rtol=1e-4, atol=1e-6), name


def test_threads_are_single_inside_restored_after_and_on_demand():
    before = torch.get_num_threads()
    seen = []
    with ShardedBackward(2, contextlib.nullcontext) as sharded:
        assert torch.get_num_threads() == 1
        with sharded.all_cores():
            assert torch.get_num_threads() == before
        assert torch.get_num_threads() == 1
        w = torch.ones(3, requires_grad=True)

        def loss_fn(batch):
            seen.append(torch.get_num_threads())
            return (w * batch).sum()

        sharded(loss_fn, [(torch.ones(3), 1.0), (torch.ones(3), 1.0)], 1.0, [w])
        assert torch.equal(w.grad, torch.full((3,), 2.0))
    assert seen == [1, 1]
    assert torch.get_num_threads() == before
    assert not [t for t in __import__("threading").enumerate() if t.name.startswith("slimtune-shard-")]


def test_a_failing_shard_raises_in_the_caller_and_the_workers_keep_serving():
    w = torch.ones(2, requires_grad=True)

    def loss_fn(batch):
        if batch == "bad":
            raise ValueError("shard broke")
        return (w * 2).sum()

    with ShardedBackward(2, contextlib.nullcontext) as sharded:
        with pytest.raises(ValueError, match="shard broke"):
            sharded(loss_fn, [("ok", 1.0), ("bad", 1.0)], 1.0, [w])
        w.grad = None
        total = sharded(loss_fn, [("ok", 0.5), ("ok", 0.5)], 1.0, [w])
    assert float(total) == 4.0 and torch.equal(w.grad, torch.full((2,), 2.0))


def test_each_shard_runs_under_the_autocast_it_is_given():
    w = torch.ones(2, requires_grad=True)
    seen = []

    def loss_fn(batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return (w * batch).sum()

    with ShardedBackward(2, lambda: torch.autocast("cpu", dtype=torch.bfloat16)) as sharded:
        sharded(loss_fn, [(torch.ones(2), 1.0), (torch.ones(2), 1.0)], 1.0, [w])
    assert seen == [True, True]
