"""method=qat: straight-through gradients through fake-quantized layers, training through the one loop, exact
resume, exports whose logits equal slimtune's, and bad scheme/granularity names refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from slimtune import cli
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.quant.arith import fake_quantize
from slimtune.quant.layers import FakeQuantLinear, QuantizedLinear
from slimtune.train.loop import train
from tests.conftest import TINY
from tests.tiny_hf import one_torch_thread, save_tiny_llama  # noqa: F401


def records(out, kind="train"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def gpt_config(char_data, out, *extra):
    return make_config(TrainConfig, overrides=[f"data={char_data}", f"out_dir={out}", *TINY, "log.interval=1",
                                               "eval.interval=0", "runtime.threads=1", "method=qat", *extra])


@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_gradients_flow_straight_through_fake_quant(scheme, granularity):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    layer = FakeQuantLinear.from_linear(linear, scheme=scheme, granularity=granularity, activations=True)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).square().sum().backward()

    # The same computation with the quantized values as plain leaves: STE passes their gradients on unchanged.
    wq = layer.quantized_weight().detach().requires_grad_()
    xq = fake_quantize(x.detach(), layer.scheme, "per_channel", 8).requires_grad_()  # a scale per token (row)
    F.linear(xq, wq, linear.bias.detach()).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.weight.grad, wq.grad)
    torch.testing.assert_close(x.grad, xq.grad)
    assert not torch.equal(wq, linear.weight)  # the forward really used quantized weights


def test_activation_quantization_does_not_mix_examples():
    """Per-token ranges: an outlier in one example (or padding) leaves the others' outputs unchanged."""
    torch.manual_seed(0)
    layer = FakeQuantLinear.from_linear(torch.nn.Linear(16, 8), activations=True)
    x = torch.randn(2, 3, 16)
    alone = layer(x[:1])
    x[1, 0] *= 100.0
    assert torch.equal(layer(x)[:1], alone)


def test_qat_gpt_trains_and_loss_falls(char_data, tmp_path, capsys):
    out = tmp_path / "o"
    train(gpt_config(char_data, out, "max_iters=40", "lr=1e-2", "qat.activations=true"))
    assert "8 linear layers fake-quantized" in capsys.readouterr().out
    losses = [r["loss"] for r in records(out)]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5


@pytest.mark.parametrize("extra", [(), ("qat.scheme=asym", "qat.granularity=tensor", "qat.activations=true")],
                         ids=["sym-channel", "asym-tensor-activations"])
def test_qat_resume_is_exact(char_data, tmp_path, extra):
    run = ["max_iters=10", "optim.lr_decay_iters=10", "gpt.dropout=0.1", *extra]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(gpt_config(char_data, straight, *run))
    train(gpt_config(char_data, stopped, *run, "ckpt.interval=4", "ckpt.keep_last=0"))
    for step in (8, 10):  # stopped after step 4: only that checkpoint is left
        shutil.rmtree(stopped / f"step-{step:06d}")
    train(gpt_config(char_data, stopped, *run, "ckpt.interval=4", "ckpt.keep_last=0"))
    a = {r["step"]: r["loss"] for r in records(straight)}
    assert sorted(a) == list(range(1, 11)) and {r["step"]: r["loss"] for r in records(stopped)} == a


@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fake_quant_forward_equals_the_int8_layer(scheme, granularity):
    """What QAT trains against is exactly what `slimtune quantize` stores (weights only)."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(24, 12)
    fake = FakeQuantLinear.from_linear(linear, scheme=scheme, granularity=granularity)
    real = QuantizedLinear.from_linear(linear, scheme=scheme, granularity=granularity)
    x = torch.randn(3, 24)
    real.use_int8_kernels = False
    assert torch.equal(fake(x), real(x))
    real.use_int8_kernels = True  # torch's int8 kernel (symmetric weights) computes the same product
    torch.testing.assert_close(real(x), fake(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key,value", [("qat.scheme", "int4"), ("qat.granularity", "row")])
def test_unknown_scheme_or_granularity_is_refused(char_data, tmp_path, key, value):
    with pytest.raises(SlimtuneError, match=rf"unknown quantization.*{value}"):
        gpt_config(char_data, tmp_path / "o", f"{key}={value}")


def test_model_without_linear_layers_is_refused():
    from slimtune.methods.qat import QatConfig, fake_quant_model

    with pytest.raises(SlimtuneError, match="no linear layer"):
        fake_quant_model(torch.nn.Sequential(torch.nn.Embedding(4, 4), torch.nn.LayerNorm(4)), QatConfig())


def test_hf_qat_checkpoint_exports_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from slimtune.finetune import open_causal_lm
    from slimtune.tasks import make_examples, write_jsonl

    llama = save_tiny_llama(tmp_path / "llama")
    chat = write_jsonl(make_examples(16, seed=0), tmp_path / "chat.jsonl")
    out = tmp_path / "out"
    assert cli.main(["train", f"model={llama}", f"data={chat}", f"out_dir={out}", "method=qat", "max_iters=3",
                     "batch_size=4", "dataset.max_seq_len=64", "log.progress=false", "log.plot=false",
                     "eval.interval=0", "runtime.threads=1", "dataset.val_fraction=0"]) == 0
    ours, _ = open_causal_lm(str(out), device="cpu")
    assert isinstance(ours.model.layers[0].mlp.up_proj, FakeQuantLinear)
    assert cli.main(["export", str(out), str(tmp_path / "exported")]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["qat", "bitnet"])
def test_memory_estimate_is_full_adam_plus_the_quantized_weight_copies(name):
    from slimtune import methods
    from slimtune.plan.estimate import ModelSpec
    from slimtune.plan.settings import RunSettings

    spec, run = ModelSpec.preset("smollm2-135m"), RunSettings(batch=2, seq=128, weight_dtype="fp32", device="cpu")
    full = methods.create(make_config(TrainConfig, overrides=["method=full"])).estimate_memory(spec, run)
    plan = methods.create(make_config(TrainConfig, overrides=[f"method={name}"])).estimate_memory(spec, run)
    for part in ("weights", "gradients", "optimizer", "activations"):
        assert plan.parts[part] == full.parts[part], part
    block_linears = spec.n_layers * sum(lin.in_features * lin.out_features for lin in spec.linears)
    assert plan.parts["temporary"] - full.parts["temporary"] == 4 * block_linears  # one fp32 copy per weight
