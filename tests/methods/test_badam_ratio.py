"""BlockOptimizerRatio: compact state, tied embeddings, unused parameters, exact resume, bad input."""

from __future__ import annotations

import pytest
import torch
from badam_helpers import batches, lm_step, tiny_gpt2, tiny_llama
from torch import nn

from slimtune import BlockOptimizerRatio, SlimtuneError


def make(model, named=None, **kwargs):
    kwargs = {"switch_every": 3, "update_ratio": 0.25, "lr": 1e-2, "verbose": 0, **kwargs}
    return BlockOptimizerRatio(model.parameters(), named or list(model.named_parameters()), **kwargs)


@pytest.mark.parametrize("mask_mode", ["adjacent", "scatter"])
def test_only_the_blocks_fraction_of_each_matrix_moves(mask_mode):
    model = tiny_llama()
    opt = make(model, mask_mode=mask_mode)
    w = model.model.layers[1].mlp.up_proj.weight
    before = w.detach().clone()
    lm_step(model, opt, batches(1)[0])
    changed = (w != before).float().mean().item()
    assert 0.15 < changed <= 0.25
    if mask_mode == "adjacent":  # whole rows
        rows = (w != before).any(dim=1)
        assert (w != before)[rows].float().mean().item() > 0.9


def test_adam_state_is_compact():
    model = tiny_llama()
    opt = make(model, update_ratio=0.1)
    lm_step(model, opt, batches(1)[0])
    trained = sum(p.numel() for g in opt.param_groups for p in g["params"])
    # two fp32 moments for ~10% of the entries (parts are whole rows, so tiny matrices round up; norms below
    # preserve_threshold are whole), instead of 8 bytes for every entry
    assert opt.optimizer_state_bytes() < 0.15 * trained * 8
    assert all(p.grad is None for p in model.parameters())  # dense gradients were dropped in the hooks


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings_are_one_parameter(tie):
    model = tiny_llama(tie=tie)
    named = list(model.named_parameters(remove_duplicate=False))  # lm_head.weight listed too when tied
    opt = make(model, named=named, include_embedding=True)
    before = model.model.embed_tokens.weight.detach().clone()
    for tokens in batches(4):
        lm_step(model, opt, tokens)
    assert not torch.equal(before, model.model.embed_tokens.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight or not tie
    gpt2 = tiny_gpt2()
    opt = make(gpt2, named=list(gpt2.named_parameters(remove_duplicate=False)), include_embedding=True)
    lm_step(gpt2, opt, batches(1)[0])


def test_parameter_without_gradient_is_skipped():
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    opt = make(model, update_ratio=0.5)
    unused = model["unused"].weight.detach().clone()
    model["used"](torch.ones(2, 4)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(unused, model["unused"].weight)


def test_bf16_weights_keep_fp32_state_for_the_block():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = make(model)
    lm_step(model, opt, batches(1)[0])
    p = model.model.layers[0].mlp.up_proj.weight
    assert p.dtype == torch.bfloat16
    assert opt.state[p]["master"].dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == torch.float32


def _run(mask_mode, steps, state=None, weights=None):
    model = tiny_llama()
    if weights is not None:
        model.load_state_dict(weights)
    opt = make(model, mask_mode=mask_mode, seed=5)
    if state is not None:
        opt.load_state_dict(state)
    start = 0 if state is None else opt.global_step
    losses = [lm_step(model, opt, t) for t in batches(20)[start:start + steps]]
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()


@pytest.mark.parametrize("mask_mode", ["adjacent", "scatter"])
def test_resume_mid_block_is_bit_exact(mask_mode):
    straight, _, _ = _run(mask_mode, 20)
    first, weights, state = _run(mask_mode, 7)
    second, _, _ = _run(mask_mode, 13, state, weights)
    assert first + second == straight


def test_bad_input():
    model = tiny_llama()
    with pytest.raises(SlimtuneError, match="mask_mode"):
        make(model, mask_mode="rows")
    with pytest.raises(SlimtuneError, match="update_ratio"):
        make(model, update_ratio=0.0)
    with pytest.raises(SlimtuneError, match="switch_every"):
        make(model, switch_every=0)
    with pytest.raises(SlimtuneError, match="different model"):
        make(tiny_llama(layers=3)).load_state_dict(make(model).state_dict())
