import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune import kernels
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.host import cpu_identity
from slimtune.kernels import OneDNNLinear, choose_matmul, onednn_available, onednn_linear, use_onednn_linear
from slimtune.models.gpt import GPT, GPTConfig

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def _pair(bias: bool, weight_grad: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=g)
    w = torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    leaves = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        wi = w.clone().requires_grad_(weight_grad)
        bi = b.clone().requires_grad_() if bias else None
        leaves.append((xi, wi, bi))
    return leaves


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_f_linear(bias):
    (x1, w1, b1), (x2, w2, b2) = _pair(bias)
    y1, y2 = onednn_linear(x1, w1, b1), F.linear(x2, w2, b2)
    assert y1.shape == (3, 5, 40)
    assert y1.grad_fn.name() == "_OneDNNLinearBackward"  # really the oneDNN path, not the fallback
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)
    assert w1.grad.is_contiguous()
    if bias:
        torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_frozen_weight_keeps_no_input_for_backward():
    (x1, w1, _), (x2, w2, _) = _pair(bias=False, weight_grad=False)
    y1 = onednn_linear(x1, w1)
    saved_input, saved_weight = y1.grad_fn.saved_tensors
    assert saved_input is None and saved_weight is w1  # no activation stored for a frozen layer
    y1.sum().backward()
    F.linear(x2, w2).sum().backward()
    assert w1.grad is None
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_ineligible_inputs_use_f_linear():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    y = onednn_linear(x, w)
    assert y.grad_fn.name() != "_OneDNNLinearBackward"
    assert torch.equal(y, F.linear(x, w))
    v = torch.randn(8)  # 1-D input
    assert torch.equal(onednn_linear(v, w.float()), F.linear(v, w.float()))


@needs_onednn
def test_use_onednn_linear_swaps_plain_linears_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    reference = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())

    class Custom(nn.Linear):
        pass

    model.extra = Custom(4, 4)
    assert use_onednn_linear(model) == n_linear == 2 * 4 + 1  # 4 per block + head
    assert type(model.extra) is Custom  # subclasses keep their own forward
    del model.extra
    assert list(model.state_dict()) == keys
    assert all(isinstance(m, nn.Linear) for m in model.modules() if isinstance(m, OneDNNLinear))
    # Same training trajectory as the aten model, to float rounding.
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, reference)]
    for _ in range(5):
        losses = []
        for m, opt in zip((model, reference), opts):
            _, loss = m(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_choose_matmul_settings_and_errors():
    cpu = torch.device("cpu")
    assert choose_matmul("aten", cpu) == "aten"
    with pytest.raises(SlimtuneError, match="runtime.matmul='mkl' is not one of auto, onednn, aten"):
        choose_matmul("mkl", cpu)
    with pytest.raises(SlimtuneError, match="runtime.matmul=onednn is a CPU kernel, but device is cuda"):
        choose_matmul("onednn", torch.device("cuda"))
    assert choose_matmul("auto", torch.device("cuda")) == "aten"
    assert choose_matmul("auto", cpu, compile=True) == "aten"  # inductor cannot lower the oneDNN linear
    with pytest.raises(SlimtuneError, match="runtime.matmul=onednn cannot be combined with runtime.compile=true"):
        choose_matmul("onednn", cpu, compile=True)
    with pytest.raises(SlimtuneError, match=r"runtime.matmul='onedn' is not one of .*Did you mean 'onednn'"):
        make_config(TrainConfig, overrides=["runtime.matmul=onedn"])


@needs_onednn
@pytest.mark.parametrize("onednn_s, aten_s, expected", [(1.0, 2.0, "onednn"), (1.0, 1.05, "aten"), (2.0, 1.0, "aten")])
def test_auto_picks_the_measured_faster_kernel(tmp_path, monkeypatch, onednn_s, aten_s, expected):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    key = f"{cpu_identity()}|threads={torch.get_num_threads()}"
    (tmp_path / "matmul_backend.json").write_text(json.dumps({key: {"aten": aten_s, "onednn": onednn_s}}))
    assert choose_matmul("auto", torch.device("cpu")) == expected  # oneDNN only when >= 10 % faster


@needs_onednn
def test_auto_measures_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(kernels, "time_backends", lambda: calls.append(1) or {"aten": 3.0, "onednn": 1.0})
    state = torch.random.get_rng_state()
    assert choose_matmul("auto", torch.device("cpu")) == "onednn"
    assert choose_matmul("auto", torch.device("cpu")) == "onednn"
    assert len(calls) == 1
    assert torch.equal(state, torch.random.get_rng_state())
    real = json.loads((tmp_path / "matmul_backend.json").read_text())
    assert list(real.values()) == [{"aten": 3.0, "onednn": 1.0}]


@needs_onednn
def test_time_backends_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    times = kernels.time_backends(shape=(32, 16, 24), seconds=0.01)
    assert set(times) == {"aten", "onednn"} and all(t > 0 for t in times.values())
    assert torch.equal(state, torch.random.get_rng_state())


@needs_onednn
def test_a_quantized_tensor_subclass_weight_keeps_its_own_linear():
    """torchao's NF4 weight (qlora.backend=torchao) under runtime.matmul=onednn: its own linear, not oneDNN's."""
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    layer = torch.nn.Linear(128, 64, bias=False)
    layer.weight = torch.nn.Parameter(nf4.to_nf4(layer.weight.detach(), block_size=64, scaler_block_size=128),
                                      requires_grad=False)
    use_onednn_linear(layer)
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.allclose(y, x.detach() @ layer.weight.get_original_weight().t(), atol=1e-5)
