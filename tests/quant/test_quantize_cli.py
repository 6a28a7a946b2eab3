"""`slimtune quantize`: int8 post-training quantization of a model's linear layers, its report, its output folder
(which slimtune eval/generate load), QAT checkpoints quantized to the weights they trained against, bad input."""

from __future__ import annotations


import pytest
import torch

from slimtune import cli
from slimtune.errors import SlimtuneError
from slimtune.quant.layers import QuantizedLinear
from tests.conftest import quantize
from tests.tiny_hf import one_torch_thread  # noqa: F401

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])



def logits(source) -> torch.Tensor:
    from slimtune.finetune import open_causal_lm

    model, _ = open_causal_lm(str(source), device="cpu")
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_weight_ptq_report_and_output_folder(llama_dir, chat_file, tmp_path, capsys, scheme, granularity):
    out = tmp_path / "q"
    assert quantize(llama_dir, "--scheme", scheme, "--granularity", granularity, "--out", out, "--eval", chat_file,
                    "--max-seq-len", "64") == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "linear weight bytes" in text
    # Symmetric weights run torch's int8 kernel on CPU; asymmetric ones (a zero point) dequantize.
    assert ("torch._weight_int8pack_mm" if scheme == "sym" else "dequantize + floating-point matmul") in text
    before, after = [float(x) for x in text.split("perplexity")[1].split()[:2]]
    assert abs(after - before) / before < 0.01  # int8 weights barely move a model's perplexity
    kib = [float(x) for x in text.split("linear weight bytes")[1].split()[::2][:2]]
    assert kib[1] < kib[0] / 3  # fp32 -> int8 codes + a 4-byte scale per 32-wide row of this tiny model

    from slimtune.finetune import open_causal_lm

    model, _ = open_causal_lm(str(out), device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear)
    assert layer.weight.dtype == (torch.int8 if scheme == "sym" else torch.uint8)
    assert layer.weight_scale.shape == ((32, 1) if granularity == "channel" else ())
    assert (logits(out) - logits(llama_dir)).abs().max() < 0.05


def test_static_activation_quantization_is_calibrated_and_loads(llama_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert quantize(llama_dir, "--out", out, "--activations", "--calibration", chat_file, "--samples", "8",
                    "--observer", "percentile", "--max-seq-len", "64") == 0
    assert "static int8 inputs (percentile)" in capsys.readouterr().out
    from slimtune.finetune import open_causal_lm

    model, _ = open_causal_lm(str(out), device="cpu")
    layer = model.model.layers[1].mlp.down_proj
    assert layer.activations and float(layer.input_scale) != 1.0
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--data", str(chat_file), "--limit", "4", "--max-seq-len", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    assert cli.main(["generate", str(out), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                     "--max-new-tokens", "3"]) == 0


def test_qat_checkpoint_quantizes_to_the_weights_it_trained_against(llama_dir, chat_file, tmp_path):
    out = tmp_path / "qat"
    assert cli.main(["train", f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", "method=qat",
                     "qat.scheme=asym",
                     "max_iters=3", "batch_size=4", "dataset.max_seq_len=64", "log.progress=false", "log.plot=false",
                     "eval.interval=0", "runtime.threads=1", "dataset.val_fraction=0"]) == 0
    assert quantize(out, "--scheme", "asym", "--granularity", "channel", "--out", tmp_path / "int8") == 0
    assert torch.equal(logits(tmp_path / "int8"), logits(out))


@pytest.mark.parametrize("argv,message", [
    (["--scheme", "int4"], "unknown quantization scheme 'int4'"),
    (["--granularity", "row"], "unknown quantization granularity 'row'"),
    (["--activations"], "--activations needs calibration data"),
    (["--observer", "mse"], "unknown observer"),
    (["--eval", "missing.jsonl"], "eval file missing.jsonl does not exist"),
])
def test_bad_input_is_refused_before_loading(llama_dir, tmp_path, argv, message):
    with pytest.raises(SlimtuneError, match=message):
        quantize(llama_dir, "--out", tmp_path / "q", *argv)
    assert not (tmp_path / "q").exists()


def test_model_without_linear_layers_is_refused():
    from slimtune.quant.ptq import QuantizeSettings, quantize_model

    with pytest.raises(SlimtuneError, match="no linear layer to quantize"):
        quantize_model(torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.LayerNorm(4)), QuantizeSettings())


@pytest.mark.parametrize("activations", [False, True])
def test_int8_kernels_match_the_dequantizing_product(activations):
    from slimtune.quant.layers import INT8_INT8_KERNEL, WEIGHT_ONLY_KERNEL, int8_product

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = QuantizedLinear.from_linear(linear, scheme="sym", granularity="channel", activations=activations)
    if activations:
        layer.set_input_range(-3.0, 3.0)
    layer.use_int8_kernels = False
    x = torch.randn(2, 17, 64)
    slow = layer(x)
    assert layer.kernels_used == {QuantizedLinear.KERNEL}
    fast = int8_product(layer, x, INT8_INT8_KERNEL if activations else WEIGHT_ONLY_KERNEL)
    torch.testing.assert_close(fast + layer.bias, slow, rtol=1e-4, atol=1e-5)


def test_cpu_decoding_uses_the_int8_weight_kernel_and_batches_dequantize():
    from slimtune.quant.layers import WEIGHT_ONLY_KERNEL

    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 48), scheme="sym", granularity="tensor")
    batch = torch.randn(1, 9, 64)
    decoded = layer(batch[:, :1])  # one token: torch's int8 weight kernel
    torch.testing.assert_close(layer(batch)[:, :1], decoded, rtol=1e-5, atol=1e-6)  # nine: dequantized
    assert layer.kernels_used == {WEIGHT_ONLY_KERNEL, QuantizedLinear.KERNEL}


def test_report_has_exact_match_where_the_data_has_answers(llama_dir, chat_file, tmp_path, capsys):
    assert quantize(llama_dir, "--out", tmp_path / "q", "--eval", chat_file, "--accuracy", "--limit", "3",
                    "--max-seq-len", "64") == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("exact match"))
    assert line.count("%") == 2
