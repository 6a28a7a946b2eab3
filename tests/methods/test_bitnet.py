"""method=bitnet: a BitNet GPT from scratch learns, conversion warms quantization in, resume is exact, the packed
export loads in plain transformers with slimtune's logits, and bad inputs are refused by name."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from slimtune import cli
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.train.loop import train
from tests.conftest import TINY
from tests.tiny_hf import one_torch_thread, tiny_llama, tiny_tokenizer  # noqa: F401

FAST_HF = ["log.progress=false", "log.plot=false", "eval.iters=2", "optim.warmup_iters=2", "dataset.max_seq_len=64",
           "batch_size=4", "runtime.threads=1", "eval.interval=0", "log.interval=1", "dataset.val_fraction=0"]


def records(out, kind="train"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def gpt_config(char_data, out, *extra):
    return make_config(TrainConfig, overrides=[f"data={char_data}", f"out_dir={out}", *TINY, "log.interval=1",
                                               "eval.interval=0", "runtime.threads=1", "method=bitnet",
                                               "gpt.bias=false", *extra])



@pytest.fixture(scope="module")
def converted(llama_dir, chat_file, tmp_path_factory):
    """A tiny Llama converted to BitNet with a 4-step warm-up of the quantization strength, trained 6 steps."""
    out = tmp_path_factory.mktemp("bitnet") / "out"
    assert cli.main(["train", f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST_HF, "max_iters=6",
                     "ckpt.interval=2", "ckpt.keep_last=0", "method=bitnet", "bitnet.warmup_steps=4"]) == 0
    return out


def unigram_entropy(data_dir) -> float:
    """Entropy (nats per character) of the validation split's character frequencies."""
    meta = json.loads((data_dir / "meta.json").read_text())
    ids = np.fromfile(data_dir / "val.bin", dtype=np.dtype(meta["dtype"]))
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_bitnet_gpt_from_scratch_beats_the_unigram_entropy(char_data, tmp_path, capsys):
    out = tmp_path / "o"
    result = train(gpt_config(char_data, out, "batch_size=16", "max_iters=300", "gpt.n_embd=64", "gpt.n_head=4",
                              "gpt.block_size=64", "lr=3e-3", "optim.warmup_iters=20", "eval.interval=300",
                              "log.interval=50"))
    assert "8 BitLinear layers" in capsys.readouterr().out  # 4 projections x 2 blocks; the tied head stays fp
    entropy = unigram_entropy(char_data)
    assert result.val_loss < entropy - 0.3, (result.val_loss, entropy)


def test_bitnet_resume_is_exact_through_warmup_and_two_stages(char_data, tmp_path):
    run = ["max_iters=12", "optim.lr_decay_iters=12", "bitnet.warmup_steps=8", "bitnet.two_stage=true",
           "gpt.dropout=0.1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(gpt_config(char_data, straight, *run))
    train(gpt_config(char_data, stopped, *run, "ckpt.interval=5", "ckpt.keep_last=0"))
    expected = {r["step"]: r["loss"] for r in records(straight)}
    lams = {r["step"]: r["lam"] for r in records(straight)}
    assert lams[3] == 3 / 8 and lams[8] == lams[12] == 1.0
    stage2 = [r for r in records(straight, "bitnet") if r.get("stage") == 2]
    assert [r["step"] for r in stage2] == [6]
    groups = torch.load(straight / "step-000012" / "optimizer.pt", weights_only=False)["param_groups"]
    assert all(g["lr_scale"] == 0.5 and g["weight_decay"] == 0.0 for g in groups)

    # Stop mid-warm-up (step 5, lam 5/8, stage 1): keep only that checkpoint and resume.
    for step in (10, 12):
        shutil.rmtree(stopped / f"step-{step:06d}")
    train(gpt_config(char_data, stopped, *run, "ckpt.interval=5", "ckpt.keep_last=0"))
    assert {r["step"]: r["loss"] for r in records(stopped)} == expected
    # And after the stage switch (step 10).
    shutil.rmtree(stopped / "step-000012")
    train(gpt_config(char_data, stopped, *run, "ckpt.interval=5", "ckpt.keep_last=0"))
    assert {r["step"]: r["loss"] for r in records(stopped)} == expected


def test_bitnet_gpt_with_biases_is_refused_with_the_fix(char_data, tmp_path):
    with pytest.raises(SlimtuneError, match=r"have a bias.*transformer\.h\.0\.attn\.c_attn.*gpt\.bias=false"):
        train(gpt_config(char_data, tmp_path / "o", "gpt.bias=true", "max_iters=1"))


def test_hf_linears_with_biases_are_named_and_the_skip_key_suggested():
    from slimtune.methods.bitnet import BitnetConfig, bitnet_model

    model = tiny_llama(tiny_tokenizer())
    model.model.layers[1].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(32))
    with pytest.raises(SlimtuneError, match=r"model\.layers\.1\.self_attn\.q_proj.*bitnet\.skip"):
        bitnet_model(model, BitnetConfig())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # nothing was changed


def test_conversion_warms_quantization_in(converted):
    assert [r["lam"] for r in records(converted)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [r["step"] for r in records(converted, "bitnet")] == [4]


def test_export_loads_in_transformers_with_the_same_logits(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimtune.finetune import open_causal_lm
    from slimtune.quant.bitnet import PackedBitLinear
    from slimtune.quant.pack import unpack_ternary

    ckpt = converted / "step-000006"
    assert cli.main(["export", str(ckpt), str(tmp_path / "packed")]) == 0
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]

    ours, _ = open_causal_lm(str(ckpt), device="cpu")
    # transformers decorates its BitNet helpers with torch.compile; run them eagerly here (no compiler needed).
    with torch.compiler.set_stance("force_eager"):
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [3, 1, 4, 1, 5, 9, 2, 6]])
        with torch.no_grad():
            expected = ours(ids).logits
            assert (theirs(ids).logits - expected).abs().max().item() < 1e-3
    # The linear weights really are packed ternary codes (4 per byte), and they round-trip.
    q = theirs.model.layers[0].mlp.down_proj
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (32 // 4, 64)
    codes = unpack_ternary(q.weight, 32)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}

    # slimtune's own loader unpacks once and gives slimtune's training forward exactly.
    packed, _ = open_causal_lm(str(tmp_path / "packed"), device="cpu")
    assert isinstance(packed.model.layers[0].mlp.down_proj, PackedBitLinear)
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, expected)


def test_packed_export_is_at_most_a_fourteenth_of_fp32_linear_bytes(converted, tmp_path):
    from safetensors import safe_open

    assert cli.main(["export", str(converted / "step-000006"), str(tmp_path / "packed")]) == 0
    fp32 = packed = 0
    with safe_open(str(tmp_path / "packed" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.dtype == torch.uint8:
                packed += t.numel() + 4  # + the one scale
                fp32 += 4 * 4 * t.numel()  # 4 values per byte, 4 bytes each
    assert packed and packed <= fp32 / 14


def test_export_during_warmup_is_refused(converted, tmp_path):
    with pytest.raises(SlimtuneError, match="warming up quantization"):
        from slimtune.finetune import export

        export(str(converted / "step-000002"), str(tmp_path / "x"))


def test_export_refuses_an_output_size_the_packed_format_cannot_hold(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.methods.bitnet import BitnetConfig, bitnet_model, export_bitnet

    tok = tiny_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=66,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    bitnet_model(model, BitnetConfig())
    with pytest.raises(SlimtuneError, match=r"66.*model\.layers\.0\.mlp\.gate_proj.*multiple of 4"):
        export_bitnet(model, tok, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_slimtune_generate_and_eval_run_on_the_checkpoint_and_the_export(converted, chat_file, tmp_path, capsys):
    assert cli.main(["export", str(converted / "step-000006"), str(tmp_path / "packed")]) == 0
    for source in (converted / "step-000006", tmp_path / "packed"):
        capsys.readouterr()
        assert cli.main(["eval", str(source), "--data", str(chat_file), "--limit", "4", "--max-seq-len", "64"]) == 0
        loss = float(capsys.readouterr().out.split("loss")[1].split()[0])
        assert math.isfinite(loss)


def test_input_norm_layers_export_as_transformers_use_rms_norm(llama_dir, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimtune.finetune import open_causal_lm

    out = tmp_path / "out"
    assert cli.main(["train", f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", *FAST_HF, "max_iters=3",
                     "lr=1e-2", "method=bitnet", "bitnet.input_norm=true"]) == 0
    assert cli.main(["export", str(out), str(tmp_path / "packed")]) == 0
    qc = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert qc["use_rms_norm"] is True
    ours, _ = open_causal_lm(str(out), device="cpu")
    norm = ours.model.layers[0].self_attn.o_proj.rms_norm.weight
    assert not torch.equal(norm, torch.ones_like(norm))  # the trained norm weights were loaded, not fresh ones
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() < 1e-3


def test_layers_the_export_cannot_pack_are_named_before_training(char_data, tmp_path, capsys):
    train(gpt_config(char_data, tmp_path / "o", "gpt.n_embd=30", "max_iters=1"))
    out = capsys.readouterr().out
    assert "warning: 6 BitNet layers (transformer.h.0.attn.c_attn, transformer.h.0.attn.c_proj" in out
    assert "multiple of 4" in out and "bitnet.skip" in out
