"""BlockOptimizer with peft LoRA, an always-active classification head, the HF Trainer, and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from badam_helpers import batches, lm_step, tiny_bert_classifier, tiny_llama

from slimtune import BlockOptimizer
from slimtune.errors import SlimtuneError


def test_lora_trains_only_the_active_blocks_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    # AdamW over *all* parameters, as a user switching from full fine-tuning would write it
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), list(model.named_parameters()),
                         switch_block_every=2, switch_mode="ascending", verbose=0)
    assert opt.lora_only and opt.n_blocks == 4
    assert all("lora_" in n and ".layers.0." in n for n in opt.active_parameter_names)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    for tokens in batches(2):
        lm_step(model, opt, tokens)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert not p.requires_grad and torch.equal(p, base_before[n]), n
        elif "lora_B" in n:
            assert torch.equal(p, lora_b[n]) != (".layers.0." in n), n  # only layer 0's adapters moved
    assert all(".layers.1." in n for n in opt.active_parameter_names)


def test_classification_head_stays_active_through_switches():
    model = tiny_bert_classifier()
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), list(model.named_parameters()),
                         switch_block_every=1, switch_mode="ascending", active_modules=["classifier."], verbose=0)
    labels = torch.tensor([0, 2])
    previous = model.classifier.weight.detach().clone()
    for step, tokens in enumerate(batches(4)):
        assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
        assert f"bert.encoder.layer.{step % 3}." == opt.active_block_name
        model(input_ids=tokens, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(previous, model.classifier.weight)
        previous = model.classifier.weight.detach().clone()
    # the head's Adam moments survive block switches: it has taken 4 steps
    assert opt.state[model.classifier.weight]["step"].item() == 4


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.rows = torch.cat(batches(n // 2, batch=2, length=16))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_inside_hf_trainer_with_gradient_checkpointing(tmp_path, use_reentrant):
    transformers = pytest.importorskip("transformers")
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        # Reentrant checkpointing only backpropagates into a segment whose *inputs* require grad; the frozen
        # embedding gives none, so make its output require grad (documented in BlockOptimizer's docstring).
        model.enable_input_require_grads()
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), list(model.named_parameters()),
                         switch_block_every=2, switch_mode="ascending", verbose=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, max_grad_norm=1.0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, sched))
    trainer.train()
    moved = {n.split(".")[2] for n, p in model.named_parameters() if not torch.equal(p, before[n]) and ".layers." in n}
    assert moved == {"0", "1"}  # 4 steps, 2 per block, ascending
    assert opt.global_step == 4 and opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    assert all("loss" in row for row in trainer.state.log_history[:4])


# -- the real model ----------------------------------------------------------------------------------------------


def _smollm2():
    """SmolLM2-135M in fp32 through slimtune's own loader (the GGUF converted once per cache folder, shared with
    every other real-model test of the session)."""
    from slimtune.models.hf import builtin_gguf_path, load_causal_lm

    try:
        builtin_gguf_path("smollm2-135m")
    except SlimtuneError as exc:
        pytest.skip(str(exc))
    return load_causal_lm("smollm2-135m")[0].train()


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_badam_reduces_loss_on_smollm2():
    torch.set_num_threads(2)
    model = _smollm2()
    text = torch.tensor([[1, 504, 3458, 17, 2049, 314, 260, 1345, 282, 3510, 30, 378, 1345, 282, 4491, 30, 2]] * 2)
    # Start with the top layer: backward only runs through it and the head, which keeps this test fast.
    opt = BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=5e-4), list(model.named_parameters()),
                         switch_block_every=3, switch_mode="descending", verbose=0)
    losses = [lm_step(model, opt, text) for _ in range(6)]
    assert opt.active_block_name == "model.layers.27."
    assert losses[-1] < 0.8 * losses[0]
