import pytest
import torch

from slimtune.train.loss import causal_lm_loss, count_causal_targets, linear_cross_entropy
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


# --- low precision: bf16 autocast and/or bf16 weights ----------------------------------------------------------

# (weights dtype, autocast on): fp32 weights under bf16 autocast, bf16 weights alone, bf16 weights under autocast.
BF16_CASES = [(torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)]
BF16_IDS = ["fp32-weights+autocast", "bf16-weights", "bf16-weights+autocast"]


def bf16_context(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


def assert_close_bf16(got, ref, msg=None):
    """Equal up to bf16 rounding (8 bits of mantissa), relative to the tensor's scale."""
    assert got.dtype == ref.dtype, msg
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(got.float(), ref.float(), rtol=3e-2, atol=3e-2 * scale + 1e-6, msg=msg)


@pytest.mark.parametrize("chunk", [3, 256])
@pytest.mark.parametrize("dtype,autocast_on", BF16_CASES, ids=BF16_IDS)
def test_linear_cross_entropy_in_bf16_matches_cross_entropy(dtype, autocast_on, chunk):
    g = torch.Generator().manual_seed(0)
    h1 = torch.randn(10, 16, generator=g).to(dtype).requires_grad_()
    w1 = torch.randn(50, 16, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, 50, (10,), generator=g)
    t[[0, 4]] = -100
    h2, w2 = h1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    with bf16_context(autocast_on):
        ref = torch.nn.functional.cross_entropy((h1 @ w1.t()).float(), t)  # what the full logits give
        got = linear_cross_entropy(h2, w2, t, chunk=chunk)
    assert got.dtype == torch.float32  # the loss sums in fp32 whatever the matmul dtype
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    (ref * 3).backward()
    (got * 3).backward()
    assert h2.grad.dtype == dtype and w2.grad.dtype == dtype  # gradients in the dtypes of the inputs
    assert_close_bf16(h2.grad, h1.grad)
    assert_close_bf16(w2.grad, w1.grad)
    assert h2.grad[0].abs().sum() == 0


@pytest.mark.parametrize("chunk", [7, 256])
def test_bf16_loss_is_summed_in_fp32(chunk):
    # The logits are bf16 (the matmul's output), but log-sum-exp over a 4000-token vocabulary in bf16 would be off
    # by ~1e-3; in fp32 the loss matches the float64 cross-entropy of the same bf16 logits.
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 64, generator=g).bfloat16()
    w = (torch.randn(4000, 64, generator=g) / 4).bfloat16()
    t = torch.randint(0, 4000, (64,), generator=g)
    ref = torch.nn.functional.cross_entropy((h @ w.t()).double(), t)
    got = linear_cross_entropy(h, w, t, chunk=chunk)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def lm_batch(tok, seed=1):
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels[1, 9:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("dtype,autocast_on", BF16_CASES, ids=BF16_IDS)
def test_causal_lm_loss_in_bf16_equals_the_models_own(dtype, autocast_on):
    tok = tiny_tokenizer()
    a, b = tiny_llama(tok).to(dtype).train(), tiny_llama(tok).to(dtype).train()
    batch = lm_batch(tok)
    with bf16_context(autocast_on):
        ref = a(**batch).loss  # full bf16 logits, cross-entropy in fp32
        got = causal_lm_loss(b, batch, chunk=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), rtol=1e-2, atol=1e-2)
    ref.backward()
    got.backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pb.grad.dtype == pa.dtype == dtype, name
        assert_close_bf16(pb.grad, pa.grad, msg=name)


# --- reduction="sum" ---------------------------------------------------------------------------------------------


class Wrapped(torch.nn.Module):
    """A model without `.config` (like a DDP or compiled wrapper): causal_lm_loss must use its own forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        return self.inner(**batch)


def test_count_causal_targets_counts_shifted_labels():
    labels = torch.tensor([[3, -100, 4, 5], [-100, -100, -100, 6]])
    assert count_causal_targets({"labels": labels}) == 3  # labels[:, 0] is never a target
    assert isinstance(count_causal_targets({"labels": labels}), int)


@pytest.mark.parametrize("fused", [True, False])
def test_causal_lm_loss_sum_is_mean_times_targets(fused):
    tok = tiny_tokenizer()
    batch = lm_batch(tok)
    n = count_causal_targets(batch)
    assert n == 7 + 4
    a, b = tiny_llama(tok).train(), tiny_llama(tok).train()
    mean = a(**batch).loss
    total = causal_lm_loss(b if fused else Wrapped(b), batch, reduction="sum")
    torch.testing.assert_close(total, mean * n)
    (mean * n).backward()
    total.backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("fused", [True, False])
def test_causal_lm_loss_sum_over_no_targets_is_zero(fused):
    tok = tiny_tokenizer()
    batch = lm_batch(tok)
    batch["labels"][:, 1:] = -100
    model = tiny_llama(tok).train()
    total = causal_lm_loss(model if fused else Wrapped(model), batch, reduction="sum")
    assert total.item() == 0.0
    total.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())
