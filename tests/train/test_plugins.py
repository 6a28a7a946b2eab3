"""Methods and strategies plug in without touching the loop: a toy method and a toy strategy, registered here in
the test file, train, checkpoint and resume exactly through `slimtune.train`."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import slimtune.train  # the package itself is callable: slimtune.train(cfg)
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.methods.base import Method
from slimtune.parallel.base import Strategy
from slimtune.registry import METHODS, STRATEGIES
from tests.conftest import TINY


@dataclass
class HeadOnlyConfig:
    """Toy method: momentum SGD on the last transformer block only."""

    momentum: float = 0.9
    """SGD momentum."""


class HeadOnly(Method):
    config_cls = HeadOnlyConfig

    def prepare(self, model):
        last = f"transformer.h.{len(model.transformer.h) - 1}."
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(last))
        self.steps_seen = 0
        return model

    def build_optimizer(self, model, ctx):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.options.momentum)

    def after_step(self, step, optimizer):
        self.steps_seen += 1
        return [{"kind": "toy", "step": step, "message": f"toy event {step}"}] if step == 2 else []

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]


class Halves(Strategy):
    """Toy strategy: every micro-batch runs as two half-batches, one after the other."""

    def forward_backward(self, model, workload, batches, precision):
        halves = [half for x, y in batches for half in zip(x.chunk(2), y.chunk(2))]
        return super().forward_backward(model, workload, halves, precision)


@pytest.fixture
def toys():
    METHODS.register("head_only")(HeadOnly)
    STRATEGIES.register("halves")(Halves)
    yield
    METHODS.unregister("head_only")
    STRATEGIES.unregister("halves")


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}, records


def _cfg(char_data, out, *extra):
    return make_config(TrainConfig, overrides=[f"data={char_data}", f"out_dir={out}", *TINY, "log.interval=1",
                                               "eval.interval=0", "optim.lr_decay_iters=8", "runtime.threads=1",
                                               *extra])


def test_toy_method_and_strategy_train_checkpoint_and_resume_exactly(toys, char_data, tmp_path, capsys):
    toy = ["method=head_only", "head_only.momentum=0.5", "strategy=halves"]
    straight = tmp_path / "straight"
    result = slimtune.train(_cfg(char_data, straight, *toy, "max_iters=8"))
    assert result.step == 8
    out = capsys.readouterr().out
    assert "toy event 2" in out and "strategy halves" in out
    a, records = _losses(straight)
    assert [r for r in records if r["kind"] == "toy"] == [{"kind": "toy", "step": 2}]

    # Only the last block changed; the method's own state went into the checkpoint.
    from safetensors.torch import load_file
    first = load_file(straight / "step-000008" / "model.safetensors")
    init = make_config(TrainConfig, overrides=[f"data={char_data}", *TINY])
    torch.manual_seed(init.seed)
    from slimtune.models.gpt import GPT, GPTConfig
    from dataclasses import asdict
    vocab = json.loads((char_data / "meta.json").read_text())["vocab_size"]
    fresh = GPT(GPTConfig(vocab_size=vocab, **asdict(init.gpt))).state_dict()
    for name, value in first.items():
        changed = not torch.equal(value, fresh[name])
        assert changed == name.startswith("transformer.h.1."), name
    trainer = torch.load(straight / "step-000008" / "trainer.pt", weights_only=True)
    assert trainer["method"] == {"steps_seen": 8} and trainer["strategy"] == "halves"

    resumed = tmp_path / "resumed"
    slimtune.train(_cfg(char_data, resumed, *toy, "max_iters=4"))
    slimtune.train(_cfg(char_data, resumed, *toy, "max_iters=8"))  # resume=auto from step 4
    b, _ = _losses(resumed)
    assert a == b  # bit-identical losses


def test_plugin_sections_are_checked(toys, char_data, tmp_path):
    with pytest.raises(SlimtuneError, match=r"head_only.momentum applies to method=head_only, but method=full"):
        _cfg(char_data, tmp_path, "head_only.momentum=0.5")
    with pytest.raises(SlimtuneError, match=r"head_only.momentm.*Did you mean 'head_only.momentum'"):
        _cfg(char_data, tmp_path, "method=head_only", "head_only.momentm=0.5")
    with pytest.raises(SlimtuneError, match=r"strategy='halvs' is not one of .*halves.*Did you mean 'halves'"):
        _cfg(char_data, tmp_path, "strategy=halvs")


def test_help_lists_registered_sections(toys):
    from slimtune.config import train_help_text

    text = train_help_text()
    assert "[head_only] (method=head_only) Toy method" in text and "head_only.momentum  (float, default 0.9)" in text
    assert "[badam] (method=badam)" in text and "[cpu_shards] (strategy=cpu_shards)" in text
    assert "[gpt] slimtune's GPT" in text and "gpt.n_layer  (int, default 6)" in text
