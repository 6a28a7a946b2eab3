"""`slimtune export` of a BitNet GPT (model=gpt method=bitnet): a transformers GPTBigCode folder that plain
`AutoModelForCausalLM.from_pretrained` runs with slimtune's logits, a tokenizer that encodes as slimtune's, packed
bytes, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from slimtune import cli
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from slimtune.train.loop import train

pytest.importorskip("accelerate")  # transformers' BitNet quantizer requires it

# head_dim 24 and 32: 1/sqrt(head_dim) is not a power of two, the case where the order of the attention scaling
# shows in the last float digit (see slimtune.quant.gpt_export)
SHAPE = ["gpt.n_layer=2", "gpt.n_head=4", "gpt.n_embd=96", "gpt.block_size=32", "gpt.bias=false"]


def _train(char_data, out, *extra):
    return train(make_config(TrainConfig, overrides=[
        f"data={char_data}", f"out_dir={out}", *SHAPE, "method=bitnet", "batch_size=4", "max_iters=2",
        "optim.warmup_iters=1", "eval.interval=0", "log.progress=false", "log.plot=false", "runtime.threads=1",
        "resume=never", *extra]))


@pytest.fixture(scope="module")
def bitnet_gpt(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bitnet-gpt") / "out"
    _train(char_data, out)
    return out


def _load_hf(folder):
    from transformers import AutoModelForCausalLM

    # transformers decorates its BitNet helpers with torch.compile; run them eagerly (no compiler needed).
    with torch.compiler.set_stance("force_eager"):
        return AutoModelForCausalLM.from_pretrained(folder).eval()


def _logits(model, ids):
    from slimtune.models.gpt import GPT

    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        if isinstance(model, GPT):
            return model(ids, targets=ids)[0]  # with targets it returns every position's logits
        return model(ids).logits


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (3, 32), generator=torch.Generator().manual_seed(seed))


def test_slimtune_export_loads_in_plain_transformers_with_the_same_logits(bitnet_gpt, tmp_path, capsys):
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    from slimtune.sample import load_gpt_checkpoint

    assert cli.main(["export", str(bitnet_gpt), str(tmp_path / "hf")]) == 0  # an out_dir: its newest checkpoint
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt_bigcode" and config["quantization_config"]["quant_method"] == "bitnet"
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]

    ours, tokenizer, _ = load_gpt_checkpoint(bitnet_gpt)
    theirs = _load_hf(tmp_path / "hf")
    c_attn = theirs.transformer.h[0].attn.c_attn
    assert type(c_attn) is HFBitLinear and c_attn.weight.dtype == torch.uint8 and c_attn.weight.shape == (72, 96)
    ids = _ids(ours.config.vocab_size)
    # The issue asks for 1e-3; the export computes in the GPT's order, so in fp32 it is exact.
    assert torch.equal(_logits(theirs, ids), _logits(ours, ids))
    # slimtune's own inference path (chat, generate, eval) loads the folder too, zero biases and all, alike.
    from slimtune.quant.load import load_quantized_causal_lm

    mine = load_quantized_causal_lm(tmp_path / "hf")
    assert mine.transformer.h[0].attn.c_attn.bias is not None
    assert (_logits(mine, ids) - _logits(ours, ids)).abs().max() < 1e-3


def test_the_exported_tokenizer_encodes_and_decodes_as_slimtune(bitnet_gpt, corpus_file, tmp_path):
    from transformers import AutoTokenizer

    from slimtune.sample import load_gpt_checkpoint

    assert cli.main(["export", str(bitnet_gpt), str(tmp_path / "hf")]) == 0
    _, ours, _ = load_gpt_checkpoint(bitnet_gpt)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = corpus_file.read_text(encoding="utf-8")[:2000]
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text)  # no special tokens added
    assert theirs.decode(ids) == text
    model = _load_hf(tmp_path / "hf")
    with torch.compiler.set_stance("force_eager"):
        out = model.generate(torch.tensor([ids[:8]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)  # no EOS to stop at: runs for max_new_tokens


def test_packed_block_linears_are_at_most_a_fourteenth_of_fp32(bitnet_gpt, tmp_path):
    from safetensors import safe_open

    assert cli.main(["export", str(bitnet_gpt), str(tmp_path / "hf")]) == 0
    packed = fp32 = 0
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = {k.rsplit(".", 1)[0] for k in f.keys() if f.get_tensor(k).dtype == torch.uint8}
        assert len(names) == 8  # c_attn, c_proj, c_fc, c_proj of two blocks
        for name in names:
            codes = f.get_tensor(f"{name}.weight")
            fp32 += 4 * codes.shape[0] * 4 * codes.shape[1]  # 4 rows per byte, 4 bytes per fp32 weight
            # everything these layers store: codes, scale and GPTBigCode's zero bias
            packed += sum(f.get_tensor(f"{name}.{k}").nbytes for k in ("weight", "weight_scale", "bias"))
            assert not f.get_tensor(f"{name}.bias").any()
    assert packed <= fp32 / 14


def _gpt(seed=0, scale=5.0, **shape):
    """A random GPT with larger than initial weights (large enough that any difference in the order of float
    operations would move some 8-bit activation code)."""
    from slimtune.models.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{"vocab_size": 65, "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32,
                             "bias": False, **shape}))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def _chars():
    from slimtune.data.tokenizer import CharTokenizer

    return CharTokenizer([chr(c) for c in range(32, 97)])  # 65 characters


@pytest.mark.parametrize("input_norm", [False, True])
def test_random_bitnet_gpts_export_exactly(tmp_path, input_norm):
    from slimtune.methods.bitnet import BitnetConfig, bitnet_model, export_bitnet

    for seed in range(3):
        model = _gpt(seed)
        bitnet_model(model, BitnetConfig(input_norm=input_norm))
        if input_norm:
            for m in model.modules():
                if hasattr(m, "rms_norm") and m.rms_norm is not None:
                    torch.nn.init.uniform_(m.rms_norm.weight, 0.5, 1.5)
        folder = export_bitnet(model, _chars(), tmp_path / f"{seed}")
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qc["use_rms_norm"] is input_norm
        ids = _ids(65, seed)
        assert torch.equal(_logits(_load_hf(folder), ids), _logits(model, ids))


def test_layers_kept_in_high_precision_stay_plain_linears(tmp_path):
    from slimtune.methods.bitnet import BitnetConfig, bitnet_model, export_bitnet

    model = _gpt()
    bitnet_model(model, BitnetConfig(skip=["lm_head", "c_fc"]))
    folder = export_bitnet(model, _chars(), tmp_path / "hf")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["lm_head", r"transformer\.h\.0\.mlp\.c_fc", r"transformer\.h\.1\.mlp\.c_fc"]
    theirs = _load_hf(folder)
    assert type(theirs.transformer.h[1].mlp.c_fc) is torch.nn.Linear
    ids = _ids(65)
    assert torch.equal(_logits(theirs, ids), _logits(model, ids))


def test_fp32_gpt_with_biases_exports_as_a_plain_folder(tmp_path):
    from slimtune.quant.gpt_export import export_gpt

    model = _gpt(bias=True, n_head=4, n_embd=96)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    folder = export_gpt(model, _chars(), tmp_path / "hf")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = _ids(65)
    assert torch.equal(_logits(_load_hf(folder), ids), _logits(model, ids))


def test_output_sizes_the_packed_format_cannot_hold_are_refused_by_name(tmp_path):
    from slimtune.methods.bitnet import BitnetConfig, bitnet_model, export_bitnet

    model = _gpt(n_embd=30)
    bitnet_model(model, BitnetConfig())
    with pytest.raises(SlimtuneError, match=r"90 of layer 'transformer\.h\.0\.attn\.c_attn'.*multiple of 4"):
        export_bitnet(model, _chars(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_gpt_checkpoints_of_other_methods_are_refused_with_the_way_out(char_data, tmp_path):
    from slimtune.finetune import export

    out = tmp_path / "full"
    train(make_config(TrainConfig, overrides=[
        f"data={char_data}", f"out_dir={out}", *SHAPE, "method=full", "batch_size=4", "max_iters=1",
        "eval.interval=0", "log.progress=false", "log.plot=false", "runtime.threads=1"]))
    with pytest.raises(SlimtuneError, match=r"method=full.*method=bitnet GPTs export.*slimtune sample"):
        export(str(out), str(tmp_path / "x"))


def test_bitnet_gpt_still_warming_up_is_refused(char_data, tmp_path):
    from slimtune.finetune import export

    _train(char_data, tmp_path / "o", "bitnet.warmup_steps=10")
    with pytest.raises(SlimtuneError, match="warming up quantization"):
        export(str(tmp_path / "o"), str(tmp_path / "x"))


def test_a_gpt_trained_with_a_hugging_face_tokenizer_exports_it(tmp_path):
    from transformers import AutoTokenizer

    from slimtune.data.tokenizer import HFTokenizer
    from slimtune.methods.bitnet import BitnetConfig, bitnet_model, export_bitnet
    from tests.tiny_hf import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    ours = HFTokenizer(tmp_path / "tok")
    model = _gpt(vocab_size=ours.vocab_size)
    bitnet_model(model, BitnetConfig())
    folder = export_bitnet(model, ours, tmp_path / "hf")
    text = "the quick brown fox jumps over the lazy dog"
    assert AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
