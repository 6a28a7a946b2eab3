"""strategy=cpu_shards: when auto picks it, what it refuses, that it gives the unsharded gradients, repeatably."""

import contextlib

import pytest
import torch

from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.methods.badam import BAdam
from slimtune.methods.full import Full
from slimtune.models.gpt import GPT, GPTConfig
from slimtune.parallel import finish_auto_choice, start_strategy
from slimtune.parallel.cpu_shards import AUTO_MAX_EXTRA_GRAD_BYTES, CpuShards, ShardedBackward, _split_rows

CPU = torch.device("cpu")


def cfg(*overrides):
    return make_config(TrainConfig, overrides=["batch_size=8", *overrides])


def auto(config, model, threads=2, method=Full, device=CPU):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return CpuShards.auto_applies(config, device, method(config), model)
    finally:
        torch.set_num_threads(before)


def test_auto_picks_shards_only_where_it_is_safe_and_small():
    small = torch.nn.Linear(4, 4)
    assert auto(cfg(), small)
    assert not auto(cfg(), small, threads=1)
    assert not auto(cfg("batch_size=1"), small)
    assert not auto(cfg(), small, device=torch.device("meta"))
    assert not auto(cfg("runtime.compile=true"), small)
    assert not auto(cfg("method=badam"), small, method=BAdam)
    assert not auto(cfg(), torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1)))
    limit = AUTO_MAX_EXTRA_GRAD_BYTES // 4  # fp32 parameters whose one extra gradient copy is exactly the limit
    assert auto(cfg(), torch.nn.Linear(1, limit, bias=False, device="meta"))
    assert not auto(cfg(), torch.nn.Linear(1, limit + 1, bias=False, device="meta"))


def test_strategy_auto_resolves_to_cpu_shards_for_a_tiny_gpt_and_single_otherwise():
    c = cfg()
    torch.set_num_threads(2)
    start = start_strategy(c, CPU)
    assert start.name == "single"
    tiny = GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16, block_size=8))
    assert finish_auto_choice(start, c, Full(c), tiny).name == "cpu_shards"
    explicit = cfg("strategy=single")
    assert finish_auto_choice(start_strategy(explicit, CPU), explicit, Full(explicit), tiny).name == "single"


@pytest.mark.parametrize("overrides, model, method, message", [
    (["method=badam"], torch.nn.Linear(2, 2), BAdam, "method=badam"),
    ([], torch.nn.Sequential(torch.nn.Dropout(0.2)), Full, r"dropout > 0 \(in 0\)"),
    (["runtime.compile=true"], torch.nn.Linear(2, 2), Full, "runtime.compile=true"),
])
def test_explicit_shards_that_cannot_work_are_refused(overrides, model, method, message):
    c = cfg("strategy=cpu_shards", *overrides)
    strategy = start_strategy(c, CPU)
    with pytest.raises(SlimtuneError, match=f"strategy=cpu_shards cannot be used with .*{message}"):
        strategy.check(method(c), model)


def test_more_shards_than_rows_is_refused():
    with pytest.raises(SlimtuneError, match="cpu_shards.n=3 is more than batch_size=2"):
        start_strategy(cfg("batch_size=2", "strategy=cpu_shards", "cpu_shards.n=3"), CPU)
    with pytest.raises(SlimtuneError, match="cpu_shards.n must be 0 .* or >= 2, got 1"):
        cfg("strategy=cpu_shards", "cpu_shards.n=1")


def test_split_rows_handles_tuples_and_dicts():
    x = torch.arange(10).view(5, 2)
    parts = _split_rows({"a": x, "b": (x, x + 1)}, 2)
    assert [p["a"].shape[0] for p in parts] == [3, 2]
    assert torch.equal(parts[1]["b"][1], x[3:] + 1)


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
