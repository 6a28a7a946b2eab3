import math

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.models.gpt import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_forward_shapes_and_initial_loss():
    model = tiny()
    idx = torch.randint(0, 50, (3, 16))
    targets = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50)
    # At initialisation the model is close to a uniform guess over the vocabulary.
    assert abs(loss.item() - math.log(50)) < 0.3
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50) and loss is None


def test_targets_may_be_a_slice_of_the_same_window():
    model = tiny()
    window = torch.randint(0, 50, (3, 17))
    _, loss_from_slices = model(window[:, :-1], window[:, 1:])  # neither slice is contiguous
    _, loss = model(window[:, :-1].contiguous(), window[:, 1:].contiguous())
    assert torch.equal(loss_from_slices, loss)


def test_tied_embeddings_and_param_count():
    model = tiny(bias=False)
    assert model.lm_head.weight is model.transformer.wte.weight
    C, V, L, T = 32, 50, 2, 16
    per_block = 2 * C + (C * 3 * C) + (C * C) + (C * 4 * C) + (4 * C * C)  # 2 LayerNorms without bias + matrices
    expected = V * C + L * per_block + C  # tied wte/lm_head once, blocks, ln_f
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + T * C


def test_causal_attention_future_tokens_do_not_leak():
    model = tiny().eval()
    a = torch.randint(0, 50, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 50
    la, _ = model(a, a)
    lb, _ = model(b, b)
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_param_groups_never_decay_biases_or_norms():
    from slimtune.methods.base import decay_groups

    model = tiny()
    decay, no_decay = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # every parameter exactly once (tied weight once)
    decay2, no_decay2 = decay_groups(model, 0.1, decay_embeddings=False)
    ids = {id(p) for p in no_decay2["params"]}
    assert id(model.transformer.wte.weight) in ids and id(model.transformer.wpe.weight) in ids


def test_generate_greedy_is_deterministic_and_topk_limits_choices():
    model = tiny().eval()
    start = torch.zeros((2, 1), dtype=torch.long)
    out1 = model.generate(start, 20, temperature=0)
    out2 = model.generate(start, 20, temperature=0)
    assert out1.shape == (2, 21) and torch.equal(out1, out2)
    g = torch.Generator().manual_seed(0)
    out = model.generate(start, 30, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(out, model.generate(start, 30, temperature=0))  # top-1 sampling is greedy


def test_crop_block_size_and_too_long_input():
    model = tiny()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    with pytest.raises(SlimtuneError, match="exceeds block_size=8"):
        model(torch.zeros((1, 9), dtype=torch.long))
    with pytest.raises(SlimtuneError, match="cannot grow"):
        model.crop_block_size(32)


def test_forward_flops_are_two_per_weight_plus_attention_and_the_step_count_builds_on_them():
    from slimtune.train.flops import step_flops_per_token

    model = tiny()
    fwd = model.forward_flops_per_token()
    assert fwd == 2 * model.num_params() + 4 * 2 * 32 * 16
    # Everything trains: the forward, the same again for the input gradients, 2 per weight for the weight gradients.
    n_all = sum(p.numel() for p in model.parameters())
    assert step_flops_per_token(model, fwd) == pytest.approx(2 * fwd + 2 * n_all)


def test_bad_head_count():
    with pytest.raises(SlimtuneError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
