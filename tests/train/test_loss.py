import pytest
import torch

from slimtune.train.loss import causal_lm_loss, linear_cross_entropy
from tests.tiny_hf import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize("chunk", [3, 256])
def test_linear_cross_entropy_matches_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    h1 = torch.randn(10, 8, generator=g, requires_grad=True)
    w1 = torch.randn(50, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (10,), generator=g)
    t[[0, 4]] = -100
    h2, w2 = h1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h1 @ w1.t(), t, ignore_index=-100)
    got = linear_cross_entropy(h2, w2, t, chunk=chunk)
    torch.testing.assert_close(got, ref)
    (ref * 3).backward()
    (got * 3).backward()
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)
    assert h2.grad[0].abs().sum() == 0  # an ignored position gets no gradient


@pytest.mark.parametrize("tie", [True, False])
def test_causal_lm_loss_equals_the_models_own(tie):
    tok = tiny_tokenizer()
    a, b = tiny_llama(tok, tie=tie).train(), tiny_llama(tok, tie=tie).train()
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels[1, 9:] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    ref = a(**batch).loss
    got = causal_lm_loss(b, batch)
    torch.testing.assert_close(got, ref)
    ref.backward()
    got.backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-4, msg=name)
