"""Strategies do not assume BAdam: a second method whose trainable set changes (`toy_block_method.ToyHalves`, the
halves of the blocks in turn, with no BlockOptimizer) trains and resumes exactly in one process and under DDP, FSDP2
and DeepSpeed, through the Method hooks and capabilities alone; a `torchrun` process finds it through
SLIMTUNE_PLUGINS.

Each distributed run is compared with the one-process run on the whole batch (these strategies equal one process,
see tests/e2e), and its resume from a mid-phase checkpoint with its own uninterrupted run, bit for bit."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from slimtune import cli
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.methods import create
from slimtune.methods.base import Method, OptimizerContext
from slimtune.registry import METHODS, PLUGINS_ENV, STRATEGIES
from tests.conftest import TINY
from tests.train import toy_block_method
from tests.train.toy_block_method import NAME, PLUGIN

STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def toy():
    toy_block_method.register()
    yield
    METHODS.unregister(NAME)


def common(char_data: Path) -> list[str]:
    # Halves switch after steps 2 and 4 (half 0, 1, 0); a checkpoint after every step, an evaluation at the end.
    return [f"data={char_data}", *TINY, f"method={NAME}", f"{NAME}.switch_every=2", f"max_iters={STEPS}",
            f"eval.interval={STEPS}", "log.interval=1", "runtime.threads=1", "runtime.precision=fp32",
            "ckpt.interval=1", "ckpt.keep_last=0", f"optim.lr_decay_iters={STEPS}"]


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out = load_file(ckpt / "model.safetensors")
    if "lm_head.weight" in out:  # the tied head, stored once under either name
        out["transformer.wte.weight"] = out.pop("lm_head.weight")
    return out


def step_dir(out: Path, step: int) -> Path:
    return out / f"step-{step:06d}"


@pytest.fixture(scope="module")
def one_process(char_data, tmp_path_factory) -> Path:
    """The uninterrupted one-process run on the whole batch (4 sequences per step)."""
    out = tmp_path_factory.mktemp("toy") / "one"
    assert cli.main(["train", *common(char_data), f"out_dir={out}", "batch_size=4", "strategy=single"]) == 0
    return out


def test_halves_train_in_turn_and_resume_exactly_in_one_process(one_process, char_data, tmp_path):
    assert [(r["step"], r["half"]) for r in records(one_process, "toy_switch")] == [(2, 1), (4, 0), (6, 1)]
    state = torch.load(step_dir(one_process, 3) / "trainer.pt", weights_only=True)
    assert state["method"] == {"active": 1}

    def changed(a: int, b: int) -> set[str]:
        x, y = weights(step_dir(one_process, a)), weights(step_dir(one_process, b))
        return {name for name in x if not torch.equal(x[name], y[name])}

    half0 = {n for n in weights(step_dir(one_process, 1)) if n.startswith("transformer.h.0.")}
    half1 = {n for n in weights(step_dir(one_process, 1)) if n.startswith("transformer.h.1.")}
    assert changed(2, 4) == half1 and changed(4, 6) == half0 and changed(1, 2) == half0

    # Mid-phase (step 3: half 1 with one step of moments) and right after a switch (step 4: no moments at all).
    for start in (3, 4):
        resumed = tmp_path / f"from-{start}"
        assert cli.main(["train", *common(char_data), f"out_dir={resumed}", "batch_size=4", "strategy=single",
                         f"resume={step_dir(one_process, start)}"]) == 0
        ours, theirs = records(resumed, "train"), records(one_process, "train")[start:]
        assert [r["step"] for r in ours] == list(range(start + 1, STEPS + 1))
        assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]
        final, reference = weights(step_dir(resumed, STEPS)), weights(step_dir(one_process, STEPS))
        assert all(torch.equal(final[name], reference[name]) for name in reference)


# -- the seams, in one process ----------------------------------------------------------------------------------


class Recorder(Method):
    """A plain-AdamW method whose trainable set changes and that records the engine hooks it gets."""

    name = "recorder"
    fixed_trainable_set = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = []

    def hand_updates_to_engine(self, optimizer):
        self.calls.append(("hand_updates_to_engine", optimizer))

    def count_engine_step(self, optimizer):
        self.calls.append(("count_engine_step", optimizer))


def test_deepspeed_drives_a_changing_trainable_set_through_the_method_hooks():
    """A torch AdamW has no `hand_updates_to_engine` or `count_step`: the strategy asks the method, not the
    optimizer (no engine is built here)."""
    strategy = STRATEGIES.get("deepspeed")(make_config(TrainConfig, overrides=["strategy=deepspeed"]))
    strategy.world_size, strategy.device, strategy._device = 2, torch.device("cpu"), torch.device("cpu")
    method, model = Recorder(strategy.cfg), torch.nn.Linear(2, 2)
    strategy.check(method, model)
    strategy._initialize = lambda: None
    ctx = OptimizerContext(torch.device("cpu"), 8, 4, 0, False)
    optimizer = strategy.build_optimizer(method, model, ctx)
    assert type(optimizer) is torch.optim.AdamW and method.calls == [("hand_updates_to_engine", optimizer)]

    strategy.engine = SimpleNamespace(step=lambda: None, get_global_grad_norm=lambda: 0.0)
    strategy._client = optimizer
    strategy.optimizer_step(optimizer, None, None)
    assert method.calls[1:] == [("count_engine_step", optimizer)]
    assert strategy.optimizer_state_dict(model, optimizer) == optimizer.state_dict()  # kept in optimizer.pt

    fixed = Recorder(strategy.cfg)
    fixed.fixed_trainable_set = True
    strategy.check(fixed, model)
    assert strategy.optimizer_state_dict(model, optimizer)["format"] == "deepspeed"  # the engine's shards
    assert fixed.calls == []


def test_methods_declare_their_optimizer_state_format_and_fsdp_follows_it():
    def method(*overrides):
        return create(make_config(TrainConfig, overrides=list(overrides)))

    assert method().torch_optimizer_state and method("method=lora").torch_optimizer_state
    assert not method("method=badam").torch_optimizer_state
    badam_lora = method("method=lora", "lora.badam=true")
    assert not badam_lora.torch_optimizer_state and not badam_lora.fixed_trainable_set
    assert method(f"method={NAME}").torch_optimizer_state  # the toy's plain AdamW

    strategy = STRATEGIES.get("fsdp")(make_config(TrainConfig, overrides=["strategy=fsdp"]))
    strategy.world_size, strategy.device = 2, torch.device("cpu")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    strategy.check(method("method=badam"), model)
    assert strategy.optimizer_state_dict(model, optimizer) == optimizer.state_dict()  # gathered into optimizer.pt
    strategy.check(method(f"method={NAME}"), model)
    assert strategy.optimizer_state_dict(model, optimizer)["format"] == "torch.distributed.checkpoint"


def test_a_strategy_declares_whether_it_follows_a_changing_trainable_set():
    assert all(STRATEGIES.get(name).follows_trainable_changes for name in ("single", "ddp", "fsdp", "deepspeed"))
    assert not STRATEGIES.get("pipeline").follows_trainable_changes
    ddp = STRATEGIES.get("ddp")

    class Fixed(ddp):  # wraps the model in something that cannot be re-wrapped after a change
        follows_trainable_changes = False

    cfg = make_config(TrainConfig, overrides=["strategy=ddp"])
    changing = Recorder(cfg)
    ddp(cfg).check(changing, torch.nn.Linear(2, 2))  # re-wrapped after each change
    Fixed.name = "fixed"
    with pytest.raises(SlimtuneError, match=f"method={changing.name} cannot run under strategy=fixed: it changes "
                                            "which parameters train"):
        Fixed(cfg).check(changing, torch.nn.Linear(2, 2))


# -- SLIMTUNE_PLUGINS -------------------------------------------------------------------------------------------


def test_slimtune_plugins_imports_modules_before_a_registry_is_first_read(tmp_path, monkeypatch):
    (tmp_path / "probe_plugin_module.py").write_text(
        "from slimtune.parallel.base import Strategy\nfrom slimtune.registry import STRATEGIES\n\n\n"
        "@STRATEGIES.register('probe_plugin')\nclass Probe(Strategy):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(PLUGINS_ENV, " probe_plugin_module , ")
    monkeypatch.setattr(STRATEGIES, "_loaded", False)  # as in a fresh process
    monkeypatch.delitem(sys.modules, "probe_plugin_module", raising=False)
    try:
        assert "probe_plugin" in STRATEGIES.names() and "ddp" in STRATEGIES.names()
        assert make_config(TrainConfig, overrides=["strategy=probe_plugin"]).strategy == "probe_plugin"
    finally:
        STRATEGIES.unregister("probe_plugin")

    # The module the torchrun tests below name registers the toy method.
    METHODS.unregister(NAME)
    monkeypatch.setenv(PLUGINS_ENV, PLUGIN)
    monkeypatch.setattr(METHODS, "_loaded", False)
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    assert NAME in METHODS.names()

    monkeypatch.setenv(PLUGINS_ENV, "no_such_plugin_module")
    monkeypatch.setattr(STRATEGIES, "_loaded", False)
    with pytest.raises(SlimtuneError, match=f"{PLUGINS_ENV} names the module 'no_such_plugin_module', which cannot be "
                                            f"imported .*remove it from {PLUGINS_ENV}"):
        STRATEGIES.names()


# -- two processes ----------------------------------------------------------------------------------------------


def strategy_args(kind: str) -> list[str]:
    return {"ddp": ["strategy=ddp"], "fsdp": ["strategy=fsdp"], "deepspeed": ["strategy=deepspeed"]}[kind]


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install 'slimtune[deepspeed]')")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp", pytest.param("deepspeed", marks=needs_deepspeed)])
def test_halves_under_a_strategy_equal_one_process_and_resume_exactly(kind, one_process, char_data, tmp_path,
                                                                      monkeypatch):
    from tests.e2e.test_ddp import assert_same_losses, torchrun

    monkeypatch.setenv(PLUGINS_ENV, PLUGIN)  # the workers register the toy method before reading their config
    out = tmp_path / kind
    log = torchrun(*common(char_data), f"out_dir={out}", "batch_size=2", *strategy_args(kind))
    assert "step 2: toy_halves trains half 1" in log and "step 4: toy_halves trains half 0" in log
    assert_same_losses(out, one_process, STEPS)  # 2 ranks x 2 sequences: the one process's 4 rows per step
    final, reference = weights(step_dir(out, STEPS)), weights(step_dir(one_process, STEPS))
    assert final.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], atol=1e-5, rtol=0)

    # Resume mid-phase (half 1, one step of moments): the same losses and weights, bit for bit.
    resumed = tmp_path / "resumed"
    torchrun(*common(char_data), f"out_dir={resumed}", "batch_size=2", *strategy_args(kind),
             f"resume={step_dir(out, 3)}")
    assert [r["loss"] for r in records(resumed, "train")] == [r["loss"] for r in records(out, "train")[3:]]
    again = weights(step_dir(resumed, STEPS))
    assert all(torch.equal(again[name], final[name]) for name in final)
