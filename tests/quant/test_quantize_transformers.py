"""`slimtune quantize` folders that plain transformers loads: symmetric int8 weight-only (per channel, per tensor)
in torchao's int8 weight-only format, holding slimtune's own codes; the other schemes stay slimtune-only."""

from __future__ import annotations

import json

import pytest
import torch

from slimtune import cli
from slimtune.errors import SlimtuneError
from slimtune.quant.layers import QuantizedLinear
from tests.conftest import quantize
from tests.tiny_hf import one_torch_thread  # noqa: F401

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])



def slimtune_model(folder):
    from slimtune.finetune import open_causal_lm

    return open_causal_lm(str(folder), device="cpu")[0]


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_sym_weight_only_folder_loads_in_plain_transformers_with_slimtunes_weights(llama_dir, chat_file, tmp_path,
                                                                                   capsys, granularity):
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    assert quantize(llama_dir, "--scheme", "sym", "--granularity", granularity, "--out", out) == 0
    assert "plain transformers" in capsys.readouterr().out
    ours = slimtune_model(out)
    theirs, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    layers = [n for n, m in ours.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down); the tied output head stays fp32
    for name in layers:
        weight = theirs.get_submodule(name).weight
        assert type(weight).__name__ == "Int8Tensor"
        assert torch.equal(weight.qdata, ours.get_submodule(name).weight)  # slimtune's codes, not torchao's own
        assert torch.equal(weight.dequantize(), ours.get_submodule(name).dequantized_weight())
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, rtol=0, atol=1e-4)

    capsys.readouterr()  # slimtune's own verbs read the same folder, without torchao's tensors
    assert cli.main(["eval", str(out), "--data", str(chat_file), "--limit", "2", "--max-seq-len", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_the_layout_is_what_torchao_and_transformers_write(llama_dir, tmp_path):
    """The same file metadata and quantization_config as transformers' own save of a torchao int8 model."""
    pytest.importorskip("torchao")
    from safetensors import safe_open
    from torchao.quantization import Int8WeightOnlyConfig, PerTensor
    from transformers import AutoModelForCausalLM, TorchAoConfig

    for granularity, config in (("channel", Int8WeightOnlyConfig()),
                                ("tensor", Int8WeightOnlyConfig(granularity=PerTensor()))):
        ref, out = tmp_path / f"ref-{granularity}", tmp_path / f"q-{granularity}"
        AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32,
                                             quantization_config=TorchAoConfig(config)).save_pretrained(ref)
        assert quantize(llama_dir, "--scheme", "sym", "--granularity", granularity, "--out", out) == 0
        metadata = []
        for folder in (ref, out):
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                meta = dict(f.metadata())
            meta["tensor_names"] = sorted(json.loads(meta["tensor_names"]))
            metadata.append(meta)
        assert metadata[0] == metadata[1]
        ours = json.loads((out / "config.json").read_text())["quantization_config"]
        assert ours["quant_type"] == TorchAoConfig(config).to_dict()["quant_type"]
        assert ours["modules_to_not_convert"] == ["lm_head"]


def test_torchao_rounds_differently_so_the_codes_are_slimtunes(llama_dir):
    """torchao's own int8 weight-only quantizer: scale max|w|/127.5, codes in [-128, 127]; slimtune's: max|w|/127,
    codes in [-127, 127]. The exported codes are slimtune's, so a QAT model keeps what it trained against."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8Tensor, PerRow
    from transformers import AutoModelForCausalLM

    weight = AutoModelForCausalLM.from_pretrained(llama_dir).model.layers[0].self_attn.q_proj.weight.detach()
    theirs = Int8Tensor.from_hp(weight, granularity=PerRow())
    with torch.no_grad():
        linear = torch.nn.Linear(32, 32, bias=False)
        linear.weight.copy_(weight)
    ours = QuantizedLinear.from_linear(linear, scheme="sym", granularity="channel")
    torch.testing.assert_close(theirs.scale, weight.abs().amax(1, keepdim=True) / 127.5)
    torch.testing.assert_close(ours.weight_scale, weight.abs().amax(1, keepdim=True) / 127)
    assert int(theirs.qdata.min()) == -128 and int(ours.weight.min()) >= -127
    assert not torch.equal(theirs.qdata, ours.weight)


def test_qat_checkpoint_runs_in_plain_transformers_as_it_trained(llama_dir, chat_file, tmp_path):
    """A method=qat (sym, per channel) run exported by `slimtune quantize`: transformers computes the fake-quantized
    model's logits (the codes QAT trained against, not torchao's own rounding of the weights)."""
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qat"
    assert cli.main(["train", f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", "method=qat",
                     "qat.scheme=sym",
                     "qat.granularity=channel", "max_iters=3", "batch_size=4", "dataset.max_seq_len=64",
                     "log.progress=false", "log.plot=false", "eval.interval=0", "runtime.threads=1",
                     "dataset.val_fraction=0"]) == 0
    assert quantize(out, "--scheme", "sym", "--granularity", "channel", "--out", tmp_path / "int8") == 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "int8", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, slimtune_model(out)(IDS).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("argv", [["--scheme", "asym", "--granularity", "channel"],
                                  ["--scheme", "asym", "--granularity", "tensor"],
                                  ["--activations", "--calibration", "CHAT", "--samples", "2"]])
def test_other_schemes_stay_slimtune_only(llama_dir, chat_file, tmp_path, capsys, argv):
    out = tmp_path / "q"
    data = [str(chat_file) if a == "CHAT" else a for a in argv]
    assert quantize(llama_dir, "--out", out, "--max-seq-len", "64", *data) == 0
    assert "slimtune eval/generate/chat only" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "slimtune_quantization.json").read_text())["layout"] == "slimtune"
    assert isinstance(slimtune_model(out).model.layers[0].mlp.up_proj, QuantizedLinear)


def test_slimtune_loads_the_torchao_layout_without_torchao(llama_dir, tmp_path, monkeypatch):
    import sys

    out = tmp_path / "q"
    assert quantize(llama_dir, "--scheme", "sym", "--out", out) == 0
    expected = slimtune_model(out)
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")] or ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)  # → ImportError on any import of torchao
    model = slimtune_model(out)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected(IDS).logits)


def test_a_file_that_does_not_match_its_description_is_refused(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "q"
    assert quantize(llama_dir, "--scheme", "sym", "--out", out) == 0
    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj._weight_qdata"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(SlimtuneError, match="model.layers.1.mlp.down_proj has no torchao int8 weight"):
        slimtune_model(out)
