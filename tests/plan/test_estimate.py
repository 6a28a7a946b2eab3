"""The planner's formulas: units, plans, weights, method states, strategies, activation settings, baseline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.plan.estimate import (QUANT_FORMATS, LoraAdapters, ModelSpec, Plan, activation_bytes,
                                    activation_items, badam_state, badam_zero3, baseline_plan, bitnet_state,
                                    cpu_offload, ddp, framework_baseline, fsdp, full_adam, layer_saved_tensors,
                                    lora_state, parse_budget, pipeline_stage, qat_state, qlora_state, weights_bytes,
                                    zero2, zero3)

L2_7B = ModelSpec.preset("llama-2-7b")
L3_8B = ModelSpec.preset("llama-3-8b")
GiB = 2**30


# ----------------------------------------------------------------------------------------------------------------
# Units and plans
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("24GB", 24 * 10**9), ("24GiB", 24 * GiB), ("500MB", 500 * 10**6), ("1.5T", 1.5e12), (" 2 gib ", 2 * GiB),
    ("24G", 24 * 10**9), ("2Gi", 2 * GiB), ("512KiB", 512 * 1024), ("1e9", 10**9), ("4096", 4096), (123, 123),
    ("0.5tb", 5 * 10**11),
])
def test_parse_budget(text, expected):
    assert parse_budget(text) == int(expected)


@pytest.mark.parametrize("bad", ["lots", "", "-5GB", "24XB", "GB", 0, -1, True, 3.5, None, "0GB", "1e999GB"])
def test_parse_budget_errors_show_examples(bad):
    with pytest.raises(SlimtuneError, match="24GiB"):
        parse_budget(bad)


def test_plan_adds_and_serialises():
    a = Plan.of("state", weights=10, optimizer=5)
    b = Plan(parts={"activations": 7}, notes=["acts"], host_bytes=3, trainable_params=2)
    total = a + b
    assert total.parts == {"weights": 10, "gradients": 0, "optimizer": 5, "activations": 7, "temporary": 0,
                           "baseline": 0}
    assert total.peak_bytes == 22 and total.host_bytes == 3 and total.notes == ["state", "acts"]
    data = json.loads(total.to_json())
    assert data["peak_bytes"] == 22 and data["parts"]["activations"] == 7 and data["notes"] == ["state", "acts"]
    assert total.fits(22) and not total.fits(21) and total.fits("1KB")
    assert "peak" in total.summary()
    with pytest.raises(ValueError, match="unknown plan part"):
        Plan(parts={"kv_cache": 1})


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


def test_weights_plain_dtypes():
    assert weights_bytes(L2_7B, "bf16") == 2 * L2_7B.n_params
    assert weights_bytes(L2_7B, "fp32") == 4 * L2_7B.n_params
    assert weights_bytes(L2_7B, torch.float16) == 2 * L2_7B.n_params


def _linear_params(spec: ModelSpec) -> int:
    return spec.n_layers * sum(lin.in_features * lin.out_features for lin in spec.linears)


@pytest.mark.parametrize("fmt,bytes_per_param", [("nf4", 0.5625), ("nf4-dq", 4.127 / 8), ("int8", 1.0),
                                                 ("ternary", 0.25)])
def test_quantized_bytes_per_parameter(fmt, bytes_per_param):
    """NF4: 4 bits + fp32 absmax per 64; with double quantization 4.127 bits (QLoRA paper); int8 1 byte + a row
    scale; ternary 2 bits + one scale."""
    rest = weights_bytes(L2_7B, "bf16") - 2 * _linear_params(L2_7B)  # embeddings, norms, head at bf16
    quantized = weights_bytes(L2_7B, "bf16", fmt) - rest
    assert quantized / _linear_params(L2_7B) == pytest.approx(bytes_per_param, rel=2e-3)


def test_quantize_head_only_when_asked_and_untied():
    plain = weights_bytes(L2_7B, "bf16", "nf4")
    with_head = weights_bytes(L2_7B, "bf16", "nf4", quantize_head=True)
    assert plain - with_head == 2 * L2_7B.vocab * L2_7B.hidden - QUANT_FORMATS["nf4"](L2_7B.vocab, L2_7B.hidden)
    tied = ModelSpec.preset("smollm2-135m")
    assert weights_bytes(tied, "bf16", "nf4") == weights_bytes(tied, "bf16", "nf4", quantize_head=True)


def test_unknown_quant_format():
    with pytest.raises(SlimtuneError, match="nf4, nf4-dq, int8, ternary"):
        weights_bytes(L2_7B, "bf16", "fp3")
    with pytest.raises(SlimtuneError, match="unknown dtype"):
        weights_bytes(L2_7B, "fp8")


# ----------------------------------------------------------------------------------------------------------------
# Method states
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,master,eight_bit,per_param", [
    ("fp32", True, False, 16), ("bf16", True, False, 18), ("bf16", False, False, 8), ("bf16", True, True, 12),
    ("fp32", True, True, 10),
])
def test_full_adam_bytes_per_param(dtype, master, eight_bit, per_param):
    plan = full_adam(L2_7B, dtype, master_weights=master, eight_bit=eight_bit)
    assert plan.peak_bytes / L2_7B.n_params == pytest.approx(per_param, abs=0.01)
    assert plan.trainable_params == L2_7B.n_params


def test_badam_formulas():
    m, a = L3_8B.n_params, L3_8B.layer_params
    bf16 = badam_state(L3_8B, "bf16")
    assert bf16.parts["weights"] == 2 * m and bf16.parts["gradients"] + bf16.parts["optimizer"] == 16 * a
    fp32 = badam_state(L3_8B, "fp32")
    assert fp32.parts["weights"] == 4 * m and fp32.parts["gradients"] + fp32.parts["optimizer"] == 12 * a
    paper = badam_state(L3_8B, "bf16", n_blocks=32)
    assert paper.peak_bytes == pytest.approx(2 * m + 16 * m / 32, abs=16)
    # Finer partitions shrink the active block; an included embedding can become the largest block.
    assert (badam_state(L3_8B, granularity="matrix").peak_bytes < badam_state(L3_8B, granularity="attn_mlp").peak_bytes
            < bf16.peak_bytes)
    assert badam_state(L3_8B, include_embedding=True).trainable_params == L3_8B.embedding_params
    with pytest.raises(SlimtuneError, match="layer, attn_mlp, matrix"):
        badam_state(L3_8B, granularity="row")


def test_badam_matches_runtime_formula():
    """The planner and `slimtune.methods.badam.analytic_state_bytes` count the active block alike."""
    from slimtune.methods.badam import analytic_state_bytes

    a = L2_7B.layer_params
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        plan = badam_state(L2_7B, dtype)
        assert plan.parts["gradients"] + plan.parts["optimizer"] == analytic_state_bytes(a, torch_dtype)


def test_lora_state():
    lora = LoraAdapters(rank=16, targets=("all-linear",))
    per_layer = 16 * sum(lin.in_features + lin.out_features for lin in L2_7B.linears)
    assert lora.params(L2_7B) == 32 * per_layer
    plan = lora_state(L2_7B, lora)
    adapters = lora.params(L2_7B)
    assert plan.parts == {"weights": 2 * L2_7B.n_params + 4 * adapters, "gradients": 4 * adapters,
                          "optimizer": 8 * adapters, "activations": 0, "temporary": 0, "baseline": 0}
    assert LoraAdapters(8, ("q_proj", "lm_head")).params(L2_7B) == 32 * 8 * 8192 + 8 * (4096 + 32000)


def test_qlora_base_is_about_half_a_byte():
    lora = LoraAdapters(rank=8)
    plan = qlora_state(L2_7B, lora, double_quant=True)
    base = plan.parts["weights"] - 4 * lora.params(L2_7B)
    non_linear = 2 * (L2_7B.n_params - _linear_params(L2_7B))
    assert (base - non_linear) / _linear_params(L2_7B) == pytest.approx(0.516, abs=0.001)
    # One dequantized bf16 weight (the largest block linear) is alive at a time.
    assert plan.parts["temporary"] == 2 * 4096 * 11008
    assert qlora_state(L2_7B, lora, double_quant=False).parts["weights"] > plan.parts["weights"]


def test_lora_target_errors():
    with pytest.raises(SlimtuneError, match="c_attn.*q_proj"):
        LoraAdapters(8, ("c_attn",)).params(L2_7B)
    gpt = ModelSpec.from_gpt()
    assert {lin.name for lin in LoraAdapters(8, ("c_proj",)).adapted(gpt)[0]} == {"attn.c_proj", "mlp.c_proj"}
    with pytest.raises(SlimtuneError, match="rank"):
        LoraAdapters(0)
    with pytest.raises(SlimtuneError, match="target"):
        LoraAdapters(8, ())


def test_qat_and_bitnet_keep_fake_quantized_copies():
    full = full_adam(L2_7B, "bf16")
    qat = qat_state(L2_7B, "bf16")
    assert qat.parts["temporary"] == 2 * _linear_params(L2_7B)
    assert qat.peak_bytes - full.peak_bytes == 2 * _linear_params(L2_7B)
    assert qat_state(L2_7B, "bf16", checkpointing=True).parts["temporary"] == 2 * _linear_params(L2_7B) // 32
    assert bitnet_state(L2_7B, "bf16").peak_bytes == qat.peak_bytes
    exported = weights_bytes(L2_7B, "bf16", "ternary")
    assert exported < 0.2 * weights_bytes(L2_7B, "bf16")


# ----------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 8])
def test_zero2_is_2p_plus_18p_over_n(n):
    p = L2_7B.n_params
    plan = zero2(full_adam(L2_7B, "bf16"), n)
    assert plan.peak_bytes == pytest.approx(2 * p + 18 * p / n, abs=8)


@pytest.mark.parametrize("n", [1, 4, 8])
def test_zero3_is_18p_over_n_plus_gathered_unit(n):
    p, unit = L3_8B.n_params, L3_8B.largest_unit_params
    plan = zero3(full_adam(L3_8B, "bf16"), n, unit)
    assert plan.peak_bytes == pytest.approx(18 * p / n + 4 * unit, abs=8)
    assert fsdp(full_adam(L3_8B, "bf16"), n, unit).parts == plan.parts


def test_badam_zero3_matches_readme():
    """(2M + 16M/D)/N per GPU, plus the gathered unit."""
    m, a, n = ModelSpec.preset("llama-3-70b").n_params, ModelSpec.preset("llama-3-70b").layer_params, 4
    spec = ModelSpec.preset("llama-3-70b")
    plan = badam_zero3(spec, n)
    assert plan.peak_bytes == pytest.approx((2 * m + 16 * a) / n + 4 * spec.largest_unit_params, abs=8)
    states = plan.peak_bytes - plan.parts["temporary"]
    assert abs(states - (2 * m + 16 * m / 80) / n) / states < 0.05


def test_ddp_replicates_and_adds_buckets():
    plan = full_adam(L2_7B, "bf16")
    assert ddp(plan, 8).peak_bytes == plan.peak_bytes + plan.parts["gradients"]
    assert ddp(plan, 8, bucket_view=True).peak_bytes == plan.peak_bytes
    with pytest.raises(SlimtuneError, match="world_size"):
        ddp(plan, 0)


def test_cpu_offload_matches_deepspeed_estimators():
    """DeepSpeed's estimators: ZeRO-2 + offload_optimizer keeps 2P on the GPU; ZeRO-3 with offload_optimizer keeps
    4·largest + 2P/N, and with offload_param too, 4·largest."""
    p, unit, n = L3_8B.n_params, L3_8B.largest_unit_params, 4
    adam = full_adam(L3_8B, "bf16")
    z2 = cpu_offload(zero2(adam, n))
    assert z2.peak_bytes == 2 * p and z2.host_bytes > 0
    z3 = cpu_offload(zero3(adam, n, unit))
    assert z3.peak_bytes == pytest.approx(4 * unit + 2 * p / n, abs=8)
    z3_params = cpu_offload(zero3(adam, n, unit), params=True)
    assert z3_params.peak_bytes == 4 * unit
    assert z3_params.host_bytes == pytest.approx(18 * p / n, abs=8)


def test_pipeline_stages():
    states = full_adam(L2_7B, "bf16")
    kwargs = dict(n_stages=4, micro_batch=1, seq=1024, n_microbatches=8, checkpointing=False)
    stages = [pipeline_stage(states, L2_7B, stage=s, **kwargs) for s in range(4)]
    # States split by parameters: the four stages hold the whole model.
    assert sum(s.parts["weights"] for s in stages) == pytest.approx(states.parts["weights"], rel=1e-6)
    # 1F1B: stage s holds n_stages - s micro-batches; the middle stages differ only in that.
    assert stages[1].parts["activations"] / stages[2].parts["activations"] == pytest.approx(3 / 2)
    one = activation_bytes(L2_7B, 1, 1024)
    assert stages[0].parts["activations"] < 4 * one.parts["activations"]
    gpipe = pipeline_stage(states, L2_7B, stage=1, schedule="gpipe", **kwargs)
    assert gpipe.parts["activations"] == 8 / 3 * stages[1].parts["activations"]
    # The last stage carries the loss and logits.
    assert stages[3].parts["temporary"] > stages[2].parts["temporary"]
    with pytest.raises(SlimtuneError, match="schedule"):
        pipeline_stage(states, L2_7B, stage=0, schedule="zigzag", **kwargs)
    with pytest.raises(SlimtuneError, match="stage"):
        pipeline_stage(states, L2_7B, stage=4, **kwargs)
    with pytest.raises(SlimtuneError, match="layers_per_stage"):
        pipeline_stage(states, L2_7B, stage=0, layers_per_stage=[10, 10, 10, 10], **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Activation settings
# ----------------------------------------------------------------------------------------------------------------


def test_checkpointing_keeps_block_inputs_and_one_block():
    full = activation_bytes(L2_7B, 2, 1024)
    ckpt = activation_bytes(L2_7B, 2, 1024, checkpointing=True)
    items = activation_items(L2_7B, 2, 1024, checkpointing=True)
    inputs = [t for t in items if t.name == "checkpoint.input"]
    assert len(inputs) == 32 and all(t.nbytes == 2 * 4096 * 2048 for t in inputs)
    one_block = sum(t.nbytes for t in layer_saved_tensors(L2_7B, 2, 1024))
    assert sum(t.nbytes for t in items if t.name.startswith("recompute.")) == one_block
    assert ckpt.parts["activations"] < full.parts["activations"] / 4


def test_backward_from_layer_limits_activations():
    """BAdam: with the active block at layer k, layers below k keep nothing."""
    per_layer = {k: sum(t.nbytes for t in activation_items(L2_7B, 1, 512, backward_from_layer=k,
                                                           trainable_layers=(k,)) if t.layer is not None)
                 for k in (0, 16, 31)}
    assert per_layer[0] > per_layer[16] > per_layer[31]
    frozen = sum(t.nbytes for t in layer_saved_tensors(L2_7B, 1, 512, weights_trainable=False))
    assert per_layer[0] - per_layer[16] == pytest.approx(16 * frozen, rel=0.01)
    assert all(t.layer >= 16 for t in activation_items(L2_7B, 1, 512, backward_from_layer=16,
                                                       trainable_layers=(16,)) if t.layer is not None)


def test_fp32_weights_under_bf16_autocast_keep_a_bf16_copy_of_each_linear_weight():
    """Autocast casts an fp32 weight for each product and the matmul keeps the copy for its input's gradient: 2 bytes
    per block-linear parameter of every layer backward runs through; one block's with checkpointing; none where the
    weights are already bf16 or the base is 4-bit (decoded per product, never kept)."""
    per_layer = sum(lin.in_features * lin.out_features for lin in L2_7B.linears)

    def copies(**options):
        return sum(t.nbytes for t in activation_items(L2_7B, 1, 512, **options) if ".weight_bf16" in t.name)

    assert copies(weight_dtype="fp32") == 2 * per_layer * 32
    assert copies(weight_dtype="fp32", backward_from_layer=16, trainable_layers=(16,)) == 2 * per_layer * 16
    assert copies(weight_dtype="fp32", checkpointing=True) == 2 * per_layer
    # LoRA: all but layer 0's q/k/v, whose input (the frozen embedding's, normed) needs no gradient.
    qkv = 3 * 4096 * 4096
    assert copies(weight_dtype="fp32", trainable_layers=(), lora=LoraAdapters(rank=8)) == 2 * (per_layer * 32 - qkv)
    assert copies(weight_dtype="bf16") == copies() == 0
    assert copies(weight_dtype="fp32", trainable_layers=(), lora=LoraAdapters(rank=8), quantized_base=True) == 0
    assert copies(weight_dtype="fp32", act_dtype="fp32") == 0


def test_chunked_loss_drops_the_logits():
    frozen_head = dict(trainable_layers=tuple(range(32)), head_trainable=False)
    full = activation_bytes(L3_8B, 2, 1024, **frozen_head)
    chunked = activation_bytes(L3_8B, 2, 1024, loss_chunk=256, **frozen_head)
    logits = (2 + 4) * L3_8B.vocab * 2048
    assert full.parts["activations"] - chunked.parts["activations"] > 0.9 * logits
    assert chunked.parts["temporary"] < full.parts["temporary"] / 2
    # A trained head: the chunked loss holds the head's gradient (computed during forward) instead.
    trained = activation_items(L3_8B, 2, 1024, loss_chunk=256)
    assert {t.name: t.nbytes for t in trained}["loss.head_grad"] == 2 * L3_8B.vocab * L3_8B.hidden


def test_lora_keeps_less_than_full_and_quantized_base_more():
    """Frozen nn.Linear keeps no input, a 4-bit kernel does; fp32 adapters keep an fp32 copy of what they read."""
    lora = LoraAdapters(8, ("q_proj", "v_proj"), dtype="bf16")
    full = activation_bytes(L2_7B, 1, 1024)
    lora_acts = activation_bytes(L2_7B, 1, 1024, trainable_layers=(), lora=lora)
    qlora_acts = activation_bytes(L2_7B, 1, 1024, trainable_layers=(), lora=lora, quantized_base=True)
    assert lora_acts.parts["activations"] < qlora_acts.parts["activations"] < full.parts["activations"]
    fp32_adapters = activation_bytes(L2_7B, 1, 1024, trainable_layers=(), lora=LoraAdapters(8, ("q_proj", "v_proj")))
    extra = fp32_adapters.parts["activations"] - lora_acts.parts["activations"]
    # bf16 adapters without dropout read the norm output itself (2h, shared by q and v); fp32 adapters keep an fp32
    # copy each (2 x 4h) and fp32 A outputs (2 x 4r instead of 2 x 2r).
    assert extra == 32 * 1024 * (2 * 4 * 4096 - 2 * 4096 + 2 * (4 - 2) * 8)


def test_eager_attention_grows_with_seq_squared():
    def attention(seq):
        return sum(t.nbytes for t in layer_saved_tensors(L2_7B, 1, seq, attention="eager") if "softmax" in t.name)
    assert attention(2048) == 4 * attention(1024)
    assert not any("softmax" in t.name for t in layer_saved_tensors(L2_7B, 1, 1024, attention="flash"))


def test_dropout_masks_are_bool_on_cuda():
    gpt = ModelSpec.from_gpt(dropout=0.1)
    cuda = {t.name: t.nbytes for t in layer_saved_tensors(gpt, 1, 64, act_dtype="bf16", device="cuda")}
    cpu = {t.name: t.nbytes for t in layer_saved_tensors(gpt, 1, 64, act_dtype="bf16", device="cpu")}
    assert cuda["mlp.resid_dropout_mask"] == 64 * 768 and cpu["mlp.resid_dropout_mask"] == 2 * 64 * 768


@pytest.mark.parametrize("kwargs,match", [
    (dict(backward_from_layer=5, trainable_layers=(3,)), "backward_from_layer=5"),
    (dict(trainable_layers=(40,)), "not layers"),
    (dict(backward_from_layer=3, embedding_trainable=True), "embedding"),
    (dict(attention="ring"), "flash, eager"),
    (dict(loss_chunk=0), "loss_chunk"),
    (dict(act_dtype="int4"), "unknown dtype"),
    (dict(checkpoint=True), "did you mean 'checkpointing'"),
])
def test_activation_option_errors(kwargs, match):
    with pytest.raises(SlimtuneError, match=match):
        activation_bytes(L2_7B, 1, 128, **kwargs)
    with pytest.raises(SlimtuneError, match="batch"):
        activation_bytes(L2_7B, 0, 128)


# ----------------------------------------------------------------------------------------------------------------
# Framework baseline
# ----------------------------------------------------------------------------------------------------------------


def test_framework_baseline_devices():
    assert framework_baseline("cuda") == framework_baseline("cuda:1") == 512 * 2**20
    assert framework_baseline(torch.device("cpu")) == framework_baseline("cpu")
    assert baseline_plan("cuda").parts["baseline"] == framework_baseline("cuda")
    with pytest.raises(SlimtuneError, match="cuda, cpu, mps"):
        framework_baseline("tpu")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_cpu_baseline_matches_a_fresh_process():
    """The CPU constant is the resident memory of a process that imported torch, transformers and slimtune."""
    code = ("import torch, transformers, slimtune.plan\n"
            "torch.ones(64, 64) @ torch.ones(64, 64)\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])")
    kib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    ratio = kib * 1024 / framework_baseline("cpu")
    assert 0.5 < ratio < 1.5, f"fresh process {kib / 1024:.0f} MiB vs baseline constant"
    assert math.isfinite(ratio)
