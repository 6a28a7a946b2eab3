"""method=qlora: a 4-bit frozen base (bitsandbytes NF4, double quantization) under peft LoRA adapters."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from slimtune import cli
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from tests.tiny_hf import assert_same_training_step, one_torch_thread  # noqa: F401

peft = pytest.importorskip("peft")

FAST = ["log.progress=false", "log.plot=false", "eval.iters=2", "optim.warmup_iters=2", "dataset.max_seq_len=64",
        "batch_size=4", "runtime.threads=1", "dataset.val_fraction=0", "eval.interval=0", "log.interval=1",
        "optim.weight_decay=0"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """The tiny Llama at hidden size 64: each linear's rows are whole 64-value blocks and each output a multiple of
    32, the shapes where bitsandbytes' own CPU products are right on every host. On AVX-512 hosts they are wrong
    for narrower rows (tests/quant/test_bnb4.py), where slimtune's are not: the tests that compare slimtune with
    plain bitsandbytes bit for bit use this model; the others train on the narrow tiny Llama (`llama_dir`)."""
    from tests.tiny_hf import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama-64", hidden_size=64)


def train_args(model, data, out, *extra):
    """`slimtune train` arguments of a QLoRA run computing in fp32 on every host (this file compares its results
    with plain peft's and its own exports, which `qlora.compute_dtype=auto`'s bf16 on bf16-capable CPUs would not
    equal)."""
    return ["train", f"model={model}", f"data={data}", f"out_dir={out}", *FAST, "lr=3e-3", "method=qlora",
            "runtime.precision=fp32", "qlora.compute_dtype=fp32", *extra]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


def test_on_an_avx512_bf16_host_qlora_trains_evaluates_and_decodes_narrow_layers(llama_dir, chat_file, tmp_path,
                                                                                 monkeypatch, capsys):
    """What a Zen 4 or Sapphire Rapids user runs by default (bf16 compute, bitsandbytes' AVX-512 BF16 flag set on
    every 4-bit layer), on any host: the narrow tiny Llama trains, evaluates and greedy-decodes without reaching
    bitsandbytes' in-place conversion, which fails on layers narrower than a block."""
    bnb_modules = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # what bitsandbytes reads on such a CPU
    out = tmp_path / "run"
    assert cli.main(train_args(llama_dir, chat_file, out, "max_iters=2", "runtime.precision=bf16",
                               "qlora.compute_dtype=bf16", "dataset.val_fraction=0.25", "eval.interval=2")) == 0
    assert any(r["kind"] == "eval" for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--data", str(chat_file), "--accuracy", "--limit", "2",
                     "--max-new-tokens", "4"]) == 0
    assert "exact match" in capsys.readouterr().out


def test_base_linears_are_4bit_and_frozen_and_only_adapters_change(llama_dir, chat_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from slimtune.train.loop import fit, setup

    cfg = make_config(TrainConfig, overrides=train_args(llama_dir, chat_file, tmp_path / "o", "max_iters=6")[1:])
    run = setup(cfg)
    try:
        quantized = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(quantized) == 2 * 7  # every projection of both blocks; the head stays as it is
        assert {type(m).__name__ for m in quantized} == {"Workspace4bit"}  # slimtune's CPU product
        for m in quantized:
            assert m.weight.dtype == torch.uint8 and not m.weight.requires_grad
            assert m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested  # double quantization
        embed = run.model.get_input_embeddings().weight
        assert embed.dtype == torch.float32 and not embed.requires_grad  # not upcast, not trained
        trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        fit(run)
    finally:
        run.strategy.teardown()
    after = run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k in before if "lora_B" in k} <= changed
    run_losses = losses(tmp_path / "o")
    assert run_losses[6] < run_losses[1]


@pytest.mark.parametrize("init", ["default", "loftq"])
def test_resume_is_bit_identical(llama_dir, chat_file, tmp_path, init):
    pytest.importorskip("bitsandbytes")
    args = lambda out: train_args(llama_dir, chat_file, out, "max_iters=6", "ckpt.interval=3",  # noqa: E731
                                  "ckpt.keep_last=0", "qlora.dropout=0.1", f"qlora.init={init}")
    assert cli.main(args(tmp_path / "straight")) == 0
    assert cli.main(args(tmp_path / "stopped")) == 0
    shutil.rmtree(tmp_path / "stopped" / "step-000006")
    assert cli.main(args(tmp_path / "stopped")) == 0
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(a) == list(range(1, 7)) and a == b


def quantized_llama(llama_dir):
    """The tiny Llama quantized by plain transformers + bitsandbytes, with bitsandbytes' eval-time conversion to its
    AVX-512 BF16 kernel off: on such hosts its no-grad products would run in bf16 whatever the compute dtype, so
    this file's bit-for-bit comparisons would compare kernels, not slimtune's adapters."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, local_files_only=True, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("backend", ["bitsandbytes", "torchao"])
def test_loftq_adapters_start_at_the_rounding_error(llama_dir, wide_llama_dir, chat_file, tmp_path, backend, capsys):
    """qlora.init=loftq: every adapter on a 4-bit layer starts at the best rank-r approximation of what rounding
    lost, so the model starts nearer the full-precision one; the base is the one plain qlora stores, and the saved
    adapter is an ordinary peft adapter over it."""
    pytest.importorskip(backend)
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slimtune.finetune import open_causal_lm
    from slimtune.quant.four_bit import dequantized_weight
    from slimtune.train.loop import setup

    original = load_file(str(llama_dir / "model.safetensors"))
    cfg = make_config(TrainConfig, overrides=train_args(llama_dir, chat_file, tmp_path / "o", "qlora.init=loftq",
                                                        f"qlora.backend={backend}")[1:])
    run = setup(cfg)
    try:
        layers = {n: m for n, m in run.model.named_modules() if isinstance(m, LoraLayer)}
        assert len(layers) == 2 * 7
        for name, m in layers.items():
            rounding = original[f"{name}.weight"].float() - dequantized_weight(m.get_base_layer())
            u, s, vh = torch.linalg.svd(rounding, full_matrices=False)
            best = (u[:, :8] * s[:8]) @ vh[:8]
            delta = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
            # Within 1 % of the best rank-8 error (a randomized SVD), and well below the plain rounding error.
            assert (rounding - delta).norm() <= 1.01 * (rounding - best).norm(), name
            assert (rounding - delta).norm() < 0.9 * rounding.norm(), name
        full = AutoModelForCausalLM.from_pretrained(llama_dir, local_files_only=True).eval()
        with torch.no_grad():
            start = run.model.eval()(IDS).logits
            with run.method.peft_model.disable_adapter():
                rounded = run.model(IDS).logits
            reference = full(IDS).logits
        assert (start - reference).abs().max() < 0.5 * (rounded - reference).abs().max()
    finally:
        run.strategy.teardown()
    if backend != "bitsandbytes":
        return
    out = tmp_path / "run"
    assert cli.main(train_args(wide_llama_dir, chat_file, out, "max_iters=2", "qlora.init=loftq")) == 0
    assert json.loads((out / "step-000002" / "adapter_config.json").read_text())["init_lora_weights"] is True
    ours, _ = open_causal_lm(str(out), device="cpu")
    plain = peft.PeftModel.from_pretrained(quantized_llama(wide_llama_dir), str(out / "step-000002")).eval()
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, ours(IDS).logits)
    capsys.readouterr()
    assert cli.main(["export", str(out), str(tmp_path / "adapter")]) == 0  # the adapter alone: told what it needs
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "trained from qlora.init=loftq" in capsys.readouterr().err


@pytest.mark.parametrize("workspace", [False, True], ids=["bnb-product", "workspace-product"])
def test_lean_adapter_forward_on_4bit_layers_is_pefts_bit_for_bit(wide_llama_dir, workspace):
    """The leaner LoRA forward also runs on bitsandbytes' 4-bit layers (peft's Linear4bit, whose base output it
    copies first as peft does, unless slimtune's workspace product made it): logits and adapter gradients exactly
    peft's on bitsandbytes' own layers."""
    pytest.importorskip("bitsandbytes")
    from slimtune.methods.peft_patch import lean_lora_layers
    from slimtune.quant.bnb4 import use_workspace_4bit

    def adapted():
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                                 target_modules=["q_proj", "v_proj", "up_proj"])
        return peft.get_peft_model(quantized_llama(wide_llama_dir), config).train()

    theirs, mine = adapted(), adapted()
    peft.set_peft_model_state_dict(mine, peft.get_peft_model_state_dict(theirs))  # the same adapters
    assert lean_lora_layers(mine) == 6
    assert type(mine.get_base_model().model.layers[0].mlp.up_proj).__mro__[1] is peft.tuners.lora.bnb.Linear4bit
    if workspace:
        assert use_workspace_4bit(mine) == 2 * 7  # the adapted layers' bases and the other projections
        assert mine.get_base_model().model.layers[0].mlp.up_proj.base_layer.fresh_output(torch.zeros(1, 64))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    assert_same_training_step(theirs, mine, ids)


def test_merged_export_dequantizes_and_equals_the_adapter_forward(wide_llama_dir, chat_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slimtune.finetune import open_causal_lm

    out = tmp_path / "run"
    assert cli.main(train_args(wide_llama_dir, chat_file, out, "max_iters=4")) == 0
    ours, _ = open_causal_lm(str(out), device="cpu")
    assert cli.main(["export", str(out), str(tmp_path / "merged"), "--merge"]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    with torch.no_grad():
        assert (merged(IDS).logits - ours(IDS).logits).abs().max() < 1e-4
    # The checkpoint's adapter also loads with plain peft on the same 4-bit base, giving the same logits.
    plain = peft.PeftModel.from_pretrained(quantized_llama(wide_llama_dir), str(out / "step-000004")).eval()
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, ours(IDS).logits)


def test_missing_bitsandbytes_names_the_extra(llama_dir, monkeypatch):
    from slimtune import methods

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes → ImportError
    cfg = make_config(TrainConfig, overrides=[f"model={llama_dir}", "method=qlora"])
    with pytest.raises(SlimtuneError, match=r"method=qlora needs bitsandbytes.*pip install 'slimtune\[qlora\]'"):
        methods.create(cfg).load_options()


def test_bad_qlora_keys(llama_dir):
    with pytest.raises(SlimtuneError, match="qlora.quant_type='int3' is not one of nf4, fp4"):
        make_config(TrainConfig, overrides=[f"model={llama_dir}", "method=qlora", "qlora.quant_type=int3"])
    with pytest.raises(SlimtuneError, match="qlora.r must be a positive integer"):
        make_config(TrainConfig, overrides=[f"model={llama_dir}", "method=qlora", "qlora.r=-1"])
    with pytest.raises(SlimtuneError, match=r"lora.init=loftq starts the adapters .* for method=qlora"):
        make_config(TrainConfig, overrides=[f"model={llama_dir}", "method=lora", "lora.init=loftq"])
    with pytest.raises(SlimtuneError, match="qlora.init=loftq and qlora.use_dora=true do not combine"):
        make_config(TrainConfig, overrides=[f"model={llama_dir}", "method=qlora", "qlora.init=loftq",
                                            "qlora.use_dora=true"])
    with pytest.raises(SlimtuneError, match="qlora.init=loftq and qlora.adapter both set"):
        make_config(TrainConfig, overrides=[f"model={llama_dir}", "method=qlora", "qlora.init=loftq",
                                            "qlora.adapter=elsewhere"])
    with pytest.raises(SlimtuneError, match="model=gpt is built from scratch"):
        from slimtune import methods

        methods.create(make_config(TrainConfig, overrides=["method=qlora"])).load_options()


def test_8bit_adamw_from_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    from types import SimpleNamespace

    import bitsandbytes as bnb

    from slimtune.config import TrainConfig, make_config
    from slimtune.methods.base import build_adam

    def cfg(name):
        return SimpleNamespace(lr=1e-2, optim=SimpleNamespace(name=name, beta1=0.9, beta2=0.99))

    weight = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = build_adam([{"params": [weight], "weight_decay": 0.0}], cfg("adamw8bit"), torch.device("cpu"))
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    before = weight.detach().clone()
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert not torch.equal(before, weight) and optimizer.state[weight]["state1"].dtype == torch.uint8
    with pytest.raises(SlimtuneError, match="optim.name='sgd' is not one of adamw, adamw8bit, paged_adamw8bit"):
        make_config(TrainConfig, overrides=["optim.name=sgd"])
    assert make_config(TrainConfig, overrides=["optim.name=adamw8bit"]).optim.name == "adamw8bit"


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_qlora_on_smollm2_quantizes_every_projection_and_learns(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from slimtune.models.hf import builtin_gguf_path
    from slimtune.tasks import make_examples, write_jsonl
    from slimtune.train.loop import fit, setup

    try:
        builtin_gguf_path("smollm2-135m")
    except SlimtuneError as exc:
        pytest.skip(str(exc))
    data = write_jsonl(make_examples(64, seed=0), tmp_path / "reverse.jsonl")
    cfg = make_config(TrainConfig, overrides=train_args("smollm2-135m", data, tmp_path / "o", "max_iters=6",
                                                        "lr=2e-3", "optim.warmup_iters=1", "runtime.threads=2")[1:])
    run = setup(cfg)
    try:
        quantized = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(quantized) == 30 * 7 and all(m.weight.dtype == torch.uint8 for m in quantized)
        assert all("lora_" in n for n, p in run.model.named_parameters() if p.requires_grad)
        fit(run)
    finally:
        run.strategy.teardown()
    run_losses = losses(tmp_path / "o")
    assert sum(run_losses[s] for s in (5, 6)) < 0.8 * sum(run_losses[s] for s in (1, 2))  # 2.05 vs 5.94 measured


def test_merged_export_requantized_on_request(wide_llama_dir, chat_file, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert cli.main(train_args(wide_llama_dir, chat_file, out, "max_iters=2")) == 0
    assert cli.main(["export", str(out), str(tmp_path / "q"), "--quantize", "nf4"]) == 2
    assert "add --merge" in capsys.readouterr().err
    assert cli.main(["export", str(out), str(tmp_path / "fp32"), "--merge"]) == 0
    assert cli.main(["export", str(out), str(tmp_path / "q"), "--merge", "--quantize", "nf4"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    requantized = AutoModelForCausalLM.from_pretrained(tmp_path / "q", local_files_only=True, device_map="cpu").eval()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in requantized.modules()) == 2 * 7
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", local_files_only=True).eval()
    with torch.no_grad():
        a, b = requantized(IDS).logits, merged(IDS).logits
    assert (a - b).abs().max() < 0.1 * b.abs().max()  # close, not equal: 4 bits lose precision


# ----------------------------------------------------------------------------------------------------------------
# qlora.backend=torchao: torchao's NF4 tensor instead of bitsandbytes
# ----------------------------------------------------------------------------------------------------------------


def test_torchao_backend_stores_nf4_trains_only_adapters_and_exports_merged(llama_dir, chat_file, tmp_path):
    pytest.importorskip("torchao")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slimtune.finetune import open_causal_lm
    from slimtune.train.loop import fit, setup

    args = train_args(llama_dir, chat_file, tmp_path / "o", "max_iters=6", "qlora.backend=torchao")[1:]
    run = setup(make_config(TrainConfig, overrides=args))
    try:
        linears = [m for m in run.model.modules() if isinstance(m, torch.nn.Linear)]
        quantized = [m for m in linears if hasattr(m.weight, "quantized_data")]
        assert len(quantized) == 2 * 7  # every projection of both blocks; the head stays as it is
        assert all(not m.weight.requires_grad and m.weight.quantized_data.dtype == torch.uint8 for m in quantized)
        trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        fit(run)
    finally:
        run.strategy.teardown()
    run_losses = losses(tmp_path / "o")
    assert run_losses[6] < run_losses[1]
    adapter = load_file(str(tmp_path / "o" / "step-000006" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)

    ours, _ = open_causal_lm(str(tmp_path / "o"), device="cpu")  # base quantized again as in training
    assert cli.main(["export", str(tmp_path / "o"), str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    with torch.no_grad():
        assert (merged(IDS).logits - ours(IDS).logits).abs().max() < 1e-4


def test_torchao_backend_resumes_bit_identically(llama_dir, chat_file, tmp_path):
    pytest.importorskip("torchao")
    args = lambda out: train_args(llama_dir, chat_file, out, "max_iters=4", "ckpt.interval=2",  # noqa: E731
                                  "ckpt.keep_last=0", "qlora.dropout=0.1", "qlora.backend=torchao")
    assert cli.main(args(tmp_path / "straight")) == 0
    assert cli.main(args(tmp_path / "stopped")) == 0
    shutil.rmtree(tmp_path / "stopped" / "step-000004")
    assert cli.main(args(tmp_path / "stopped")) == 0
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(a) == [1, 2, 3, 4] and a == b


def test_torchao_backend_bad_keys_and_missing_library(llama_dir, monkeypatch):
    from slimtune import methods

    with pytest.raises(SlimtuneError, match="qlora.backend=torchao stores NF4 with double quantization only"):
        make_config(TrainConfig, overrides=[f"model={llama_dir}", "method=qlora", "qlora.backend=torchao",
                                            "qlora.quant_type=fp4"])
    monkeypatch.setitem(sys.modules, "torchao.quantization.quantize_.workflows.nf4", None)  # → ImportError
    cfg = make_config(TrainConfig, overrides=[f"model={llama_dir}", "method=qlora", "qlora.backend=torchao"])
    with pytest.raises(SlimtuneError, match=r"needs torchao.*pip install 'slimtune\[torchao\]'"):
        methods.create(cfg).load_options()
