"""BlockOptimizer: one test per badam 1.4 defect (issue 4), equivalence with AdamW, exact resume, bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from badam_helpers import batches, lm_step, tiny_gpt2, tiny_llama
from torch import nn

from slimtune import BlockOptimizer, SlimtuneError
from slimtune.methods.badam import analytic_state_bytes


def make(model, switch_block_every=3, lr=1e-2, groups=None, **kwargs):
    base = torch.optim.AdamW(groups or model.parameters(), lr=lr, weight_decay=0.01)
    kwargs.setdefault("verbose", 0)
    return BlockOptimizer(base, list(model.named_parameters()), switch_block_every=switch_block_every, **kwargs)


def decay_groups(model, lr=1e-2):
    """Matrices decay at 0.1 with lr; 1-D weights (norms) in a no-decay group with half the lr."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": matrices, "weight_decay": 0.1, "lr": lr, "name": "decay"},
        {"params": vectors, "weight_decay": 0.0, "lr": lr / 2, "name": "no_decay"},
    ]


# -- equivalence --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("update_in_backward", [False, True])
def test_one_block_with_everything_equals_adamw(update_in_backward):
    reference, model = tiny_llama(), tiny_llama()
    adamw = torch.optim.AdamW(decay_groups(reference), lr=1e-2)
    opt = BlockOptimizer(torch.optim.AdamW(decay_groups(model), lr=1e-2), list(model.named_parameters()),
                         block_prefix_list=[[""]], switch_block_every=5, verbose=0,
                         update_in_backward=update_in_backward)
    for tokens in batches(20):
        assert lm_step(model, opt, tokens) == pytest.approx(lm_step(reference, adamw, tokens), abs=1e-6)
    diff = max((a - b).abs().max().item() for a, b in zip(reference.parameters(), model.parameters()))
    assert diff <= 1e-6


# -- defect: resume ---------------------------------------------------------------------------------------------


def _run(mode, dtype, steps, state=None, weights=None, accumulate=1):
    model = tiny_llama(dtype=dtype)
    if weights is not None:
        model.load_state_dict(weights)
    opt = make(model, switch_block_every=3, switch_mode=mode, seed=7, groups=decay_groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    if state is not None:
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    data = batches(20 * accumulate)
    start = 0 if state is None else state["step"]
    losses = []
    for step in range(start, start + steps):
        for micro in range(accumulate):
            tokens = data[step * accumulate + micro]
            loss = model(input_ids=tokens, labels=tokens).loss / accumulate
            loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    saved = {"opt": opt.state_dict(), "sched": sched.state_dict(), "step": start + steps}
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, saved, opt


@pytest.mark.parametrize("mode", ["random", "ascending", "descending", "fixed"])
def test_stop_mid_block_and_resume_is_bit_exact(mode):
    straight, _, _, opt = _run(mode, torch.float32, 20)
    first, weights, saved, _ = _run(mode, torch.float32, 7)
    assert saved["opt"]["step_in_block"] == 1  # 7 = 2 * 3 + 1: stopped inside a block
    second, _, _, resumed = _run(mode, torch.float32, 13, state=saved, weights=weights)
    assert first + second == straight
    assert resumed.active_block_name == opt.active_block_name


def test_bf16_resume_with_accumulation_is_bit_exact():
    # The fp32 master weights are part of the state: rebuilding them from the rounded bf16 weights would differ.
    straight, _, _, _ = _run("random", torch.bfloat16, 8, accumulate=2)
    first, weights, saved, _ = _run("random", torch.bfloat16, 4, accumulate=2)
    assert saved["opt"]["masters"]
    second, _, _, _ = _run("random", torch.bfloat16, 4, state=saved, weights=weights, accumulate=2)
    assert first + second == straight


def test_state_dict_is_keyed_by_parameter_name():
    model = tiny_llama()
    opt = make(model, switch_mode="ascending")
    lm_step(model, opt, batches(1)[0])
    state = opt.state_dict()
    assert set(state["state"]) == {n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")}
    assert state["current_block"] == 0 and state["step_in_block"] == 1 and state["global_step"] == 1


# -- defect: block order uses its own generator ------------------------------------------------------------------


def _block_sequence(seed, steps=24):
    model = tiny_llama()
    opt = make(model, switch_block_every=1, switch_mode="random", seed=seed)
    seq = []
    for _ in range(steps):
        seq.append(opt.current_block)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step()
    return seq


def test_block_order_never_touches_global_rng_and_is_reproducible():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    seq = _block_sequence(seed=3)
    after = torch.get_rng_state()
    model = tiny_llama()  # (tiny_llama seeds the global RNG itself, so compare around the optimizer only)
    before = torch.get_rng_state()
    opt = make(model, switch_block_every=1, switch_mode="random")
    for _ in range(10):
        opt.step()
    after = torch.get_rng_state()
    assert torch.equal(before, after)
    assert seq == _block_sequence(seed=3)
    assert seq != _block_sequence(seed=4)
    # random reshuffling: each pass of 4 steps visits every block once
    assert all(sorted(seq[i:i + 4]) == [0, 1, 2, 3] for i in range(0, 24, 4))


# -- defect: param groups --------------------------------------------------------------------------------------------


def test_user_param_groups_keep_weight_decay_lr_and_membership():
    model = tiny_llama()
    groups = decay_groups(model)
    vectors = {id(p) for p in groups[1]["params"]}
    opt = make(model, switch_block_every=1, groups=groups)
    for tokens in batches(5):
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        assert [g["lr"] for g in opt.param_groups] == [1e-2, 5e-3]
        assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
        assert opt.param_groups[1]["params"] and all(id(p) in vectors for p in opt.param_groups[1]["params"])
        assert not any(id(p) in vectors for p in opt.param_groups[0]["params"])
        lm_step(model, opt, tokens)


def test_lr_scheduler_changes_reach_the_update():
    model = tiny_llama()
    opt = make(model, switch_mode="ascending")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm_step(model, opt, batches(1)[0])
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0 and opt.base_optimizer.param_groups[0]["lr"] == 0.0
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.equal(moved["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    lm_step(model, opt, batches(2)[1])
    for n, p in model.named_parameters():
        assert torch.equal(p, moved[n]), n  # lr 0 (and decoupled decay times lr 0): nothing moves


# -- defect: GPT-2 naming ---------------------------------------------------------------------------------------------


def test_gpt2_gets_one_block_per_layer_and_trains():
    model = tiny_gpt2()
    opt = make(model, switch_block_every=2, switch_mode="ascending")
    assert opt.block_names == ["transformer.h.0.", "transformer.h.1.", "transformer.h.2."]
    losses = [lm_step(model, opt, t) for t in batches(6, seed=5) * 2]
    assert losses[-1] < losses[0]


# -- defect: a parameter without gradient ---------------------------------------------------------------------------


class TinyMoE(nn.Module):
    """Two layers with two experts each; the router always picks expert 0, so expert 1 never gets a gradient."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"experts": nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])}) for _ in range(2)
        )
        self.to(dtype)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["experts"][0](x)
        return x.float().pow(2).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unrouted_expert_is_skipped_not_a_crash(dtype):
    model = TinyMoE(dtype)
    opt = make(model, switch_block_every=2, switch_mode="ascending", granularity="layer")
    unused = model.layers[0]["experts"][1].weight.detach().clone()
    used = model.layers[0]["experts"][0].weight.detach().clone()
    for _ in range(4):
        model(torch.ones(4, 8, dtype=dtype)).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.layers[0]["experts"][1].weight, unused)
    assert not torch.equal(model.layers[0]["experts"][0].weight, used)


# -- defect: mixed precision -----------------------------------------------------------------------------------------


class Scalar(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=dtype))


def test_bf16_gradients_accumulate_in_fp32():
    # One micro-batch contributes 1.0, sixteen contribute 2**-9 each. In bf16 (8-bit mantissa) 1 + 2**-9 == 1, so a
    # bf16 running sum stays 1.0; the fp32 sum is 1 + 16 * 2**-9 = 1.03125.
    model = Scalar(torch.bfloat16)
    opt = make(model, block_prefix_list=[["w"]])
    (model.w * 1.0).sum().backward()
    for _ in range(16):
        (model.w * 2.0**-9).sum().backward()
    norm = opt.clip_grad_norm_(float("inf"))
    assert norm.item() == 1.03125
    assert model.w.grad is None  # the bf16 gradient is not kept around
    opt.step()
    assert model.w.dtype == torch.bfloat16
    master_state = opt.state[opt.param_groups[0]["params"][0]]
    assert opt.param_groups[0]["params"][0].dtype == torch.float32
    assert master_state["exp_avg"].dtype == torch.float32 and master_state["exp_avg_sq"].dtype == torch.float32


def test_bf16_weights_stay_bf16_and_train_through_fp32_masters():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = make(model, switch_mode="ascending", lr=1e-2)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    lm_step(model, opt, batches(1)[0])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    n_active = opt.active_numel()
    assert opt.optimizer_state_bytes() == pytest.approx(analytic_state_bytes(n_active, torch.bfloat16, False), rel=0.01)


def test_fp32_model_gets_no_extra_copy():
    model = tiny_llama()
    opt = make(model, switch_mode="ascending")
    params = {id(p) for p in model.parameters()}
    tokens = batches(1)[0]
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    assert all(id(t) in params for g in opt.param_groups for t in g["params"])  # the optimizer steps the weights
    assert all(id(t) in params for t in opt.state)
    # moments (8 bytes) + fp32 gradients (4 bytes) per active parameter, plus one 4-byte step counter per tensor
    n_tensors = len(opt.active_parameter_names)
    assert opt.optimizer_state_bytes() == analytic_state_bytes(opt.active_numel(), torch.float32) + 4 * n_tensors


def test_inactive_parameters_are_frozen_and_freed_on_switch():
    model = tiny_llama()
    opt = make(model, switch_block_every=1, switch_mode="ascending")
    lm_step_no_zero = batches(1)[0]
    model(input_ids=lm_step_no_zero, labels=lm_step_no_zero).loss.backward()
    opt.step()  # switches to layer 1; the gradients of layer 0 were not zeroed by the user
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith("model.layers.1."), name
        if name.startswith("model.layers.0."):
            assert p.grad is None and p not in opt.state


def test_backward_saves_no_activations_below_the_active_block():
    def saved_bytes(start_block):
        model = tiny_llama()
        make(model, switch_mode="fixed", start_block=start_block)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        tokens = batches(1)[0]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=tokens, labels=tokens).loss.backward()
        return total

    assert saved_bytes(3) < 0.6 * saved_bytes(0)


# -- defect: verbose and first-block length --------------------------------------------------------------------------


def test_verbose_0_is_silent_and_verbose_1_names_the_block(capsys, caplog):
    caplog.set_level(logging.DEBUG)
    model = tiny_llama()
    opt = make(model, switch_block_every=1, verbose=0)
    for tokens in batches(3):
        lm_step(model, opt, tokens)
    opt.load_state_dict(opt.state_dict())
    assert capsys.readouterr() == ("", "") and caplog.records == []

    messages = []
    opt = make(tiny_llama(), switch_block_every=1, switch_mode="ascending", verbose=1, log_fn=messages.append)
    opt.step()
    assert "model.layers.0." in messages[0] and "model.layers.1." in messages[1]


def test_first_block_gets_exactly_switch_block_every_steps():
    model = tiny_llama()
    opt = make(model, switch_block_every=3, switch_mode="ascending")
    seen = []
    for tokens in batches(7):
        seen.append(opt.active_block_name)
        lm_step(model, opt, tokens)
    assert seen == ["model.layers.0."] * 3 + ["model.layers.1."] * 3 + ["model.layers.2."]


@pytest.mark.parametrize("mode,start,expected", [("ascending", 2, [2, 3, 0, 1, 2]), ("descending", None, [3, 2, 1, 0, 3]),
                                                  ("fixed", 1, [1, 1, 1, 1, 1])])
def test_switch_modes_order(mode, start, expected):
    model = tiny_llama()
    opt = make(model, switch_block_every=1, switch_mode=mode, start_block=start)
    seen = []
    for _ in expected:
        seen.append(opt.current_block)
        opt.step()
    assert seen == expected


# -- helpers for the training loop ----------------------------------------------------------------------------------


def test_memory_helpers_and_names():
    model = tiny_llama()
    opt = make(model, switch_mode="ascending", include_embedding=True, include_lm_head=True)
    assert opt.n_blocks == 6 and opt.active_block_name == "model.embed_tokens."
    assert analytic_state_bytes(1000, torch.bfloat16) == 16_000
    assert analytic_state_bytes(1000, torch.float32) == 12_000
    assert analytic_state_bytes(1000, torch.float16, include_grads=False) == 12_000


def test_update_in_backward_rejects_gradient_accumulation():
    model = tiny_llama()
    _opt = make(model, update_in_backward=True, switch_mode="ascending")
    tokens = batches(1)[0]
    model(input_ids=tokens, labels=tokens).loss.backward()
    with pytest.raises(SlimtuneError, match="one backward per step"):
        model(input_ids=tokens, labels=tokens).loss.backward()


def test_warns_when_the_active_block_gets_no_gradient(caplog):
    model = tiny_llama()
    opt = make(model, verbose=1, log_fn=lambda m: None)
    with caplog.at_level(logging.WARNING, logger="slimtune.badam"):
        opt.step()
    assert "enable_input_require_grads" in caplog.text


# -- bad input -----------------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(SlimtuneError, match="switch_mode"):
        make(model, switch_mode="shuffle")
    with pytest.raises(SlimtuneError, match="switch_block_every"):
        make(model, switch_block_every=0)
    with pytest.raises(SlimtuneError, match="granularity"):
        make(model, granularity="rows")
    with pytest.raises(SlimtuneError, match="'model.layer.1.'.*matches no parameter"):
        make(model, block_prefix_list=[["model.layers.0."], ["model.layer.1."]])
    with pytest.raises(SlimtuneError, match="active_modules prefix 'head.'"):
        make(model, active_modules=["head."])
    with pytest.raises(SlimtuneError, match="start_block"):
        make(model, start_block=9)
    with pytest.raises(SlimtuneError, match="overlap"):
        make(model, block_prefix_list=[["model.layers."], ["model.layers.0."]])


def test_ds_zero3_enabled_points_to_the_deepspeed_strategy():
    with pytest.raises(SlimtuneError, match="ds_zero3_enabled=True .* method=badam strategy=deepspeed") as error:
        make(tiny_llama(), ds_zero3_enabled=True)
    assert "one process" not in str(error.value)


def test_block_list_leaving_nothing_trainable_is_an_error():
    model = tiny_llama()
    only_layer0 = [p for n, p in model.named_parameters() if n.startswith("model.layers.0.")]
    base = torch.optim.AdamW(only_layer0)
    with pytest.raises(SlimtuneError, match="no trainable parameter"):
        BlockOptimizer(base, list(model.named_parameters()), block_prefix_list=[["model.layers.1."]], verbose=0)
    with pytest.raises(SlimtuneError, match="no trainable parameter"):
        BlockOptimizer(torch.optim.AdamW(only_layer0), list(model.named_parameters()),
                       block_prefix_list=[["model.layers.0."], ["model.layers.1."]], verbose=0)


def test_loading_a_state_from_a_different_model_is_an_error():
    small, large = tiny_llama(layers=3), tiny_llama(layers=4)
    saved = make(small).state_dict()
    with pytest.raises(SlimtuneError, match="different model"):
        make(large).load_state_dict(saved)
    with pytest.raises(SlimtuneError, match="different model"):  # same layer count, other shapes
        make(tiny_gpt2(layers=3)).load_state_dict(saved)
