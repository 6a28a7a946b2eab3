"""`slimtune estimate` (slimtune.plan.cli): model inputs, per-device tables and JSON, budgets, and bad input."""

from __future__ import annotations

import argparse
import json

import pytest

from slimtune.errors import SlimtuneError
from slimtune.methods.base import Method
from slimtune.plan import cli
from slimtune.plan.estimate import ModelSpec, Plan, parse_budget
from slimtune.plan.settings import NoEstimate, RunSettings
from slimtune.registry import METHODS

GiB = 2**30


def estimate(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser(prog="slimtune")
    cli.add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["estimate", *argv])
    assert cli.run(args) == 0
    return capsys.readouterr().out


def estimate_json(capsys, *argv: str) -> dict:
    return json.loads(estimate(capsys, *argv, "--json"))


# ----------------------------------------------------------------------------------------------------------------
# Acceptance: the BAdam README's question
# ----------------------------------------------------------------------------------------------------------------


def test_badam_llama3_8b_fits_24gb(capsys):
    out = estimate(capsys, "--preset", "llama-3-8b", "--method", "badam", "--budget", "24GB")
    for part in ("weights", "gradients", "optimizer", "activations", "temporary", "baseline", "peak"):
        assert f"  {part}" in out
    assert "\nfits with gradient checkpointing" in out and "\ndoes not fit" not in out


def test_full_llama3_8b_does_not_fit_and_suggests(capsys):
    out = estimate(capsys, "--preset", "llama-3-8b", "--method", "full", "--budget", "24GB")
    assert "does not fit: needs" in out
    suggestions = out.split("best first:")[1].strip().splitlines()
    assert suggestions and suggestions[0].split()[0].rstrip(",") == "badam"
    assert not any(line.split()[0].rstrip(",") == "full" for line in suggestions)


def test_budget_json_lists_fitting_settings_best_first(capsys):
    data = estimate_json(capsys, "--preset", "llama-3-8b", "--method", "full", "--budget", "24GB")
    assert data["fits"] is False and data["budget_bytes"] == 24 * 10**9
    assert data["fitting"] and all(e["peak_bytes"] <= data["budget_bytes"] for e in data["fitting"])
    trained = [e["trainable_params"] for e in data["fitting"]]
    assert trained == sorted(trained, reverse=True)
    # Without --checkpointing, the verb picks checkpointing only when nothing else comes close to fitting.
    assert data["settings"]["checkpointing"] is True


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def test_json_per_device_parts(capsys):
    data = estimate_json(capsys, "--preset", "llama-2-7b", "--method", "full", "--batch", "2", "--seq", "512")
    assert data["devices"] == 1 and len(data["per_device"]) == 1
    device = data["per_device"][0]
    assert device["peak_bytes"] == sum(device["parts"].values()) == data["peak_bytes"]
    assert set(device["parts"]) == {"weights", "gradients", "optimizer", "activations", "temporary", "baseline"}
    # slimtune's full method steps bf16 weights directly: 2 + 2 + 4 bytes per parameter.
    p = ModelSpec.preset("llama-2-7b").n_params
    assert device["parts"]["weights"] + device["parts"]["gradients"] + device["parts"]["optimizer"] == 8 * p


def test_master_weights_and_8bit_adam(capsys):
    p = ModelSpec.preset("llama-2-7b").n_params

    def states(*flags):
        parts = estimate_json(capsys, "--preset", "llama-2-7b", *flags)["per_device"][0]["parts"]
        return parts["weights"] + parts["gradients"] + parts["optimizer"]

    assert states("--master-weights") == 18 * p
    assert states("--storage-dtype", "fp32", "--precision", "fp32") == 16 * p
    assert states("--master-weights", "--optimizer", "adamw8bit") < 12.1 * p


def test_strategies_divide_per_device(capsys):
    single = estimate_json(capsys, "--preset", "llama-2-7b", "--master-weights")["peak_bytes"]
    ddp = estimate_json(capsys, "--preset", "llama-2-7b", "--master-weights", "--devices", "4")
    assert ddp["strategy"] == "ddp" and len(ddp["per_device"]) == 4 and ddp["peak_bytes"] > single
    zero3 = estimate_json(capsys, "--preset", "llama-2-7b", "--master-weights", "--devices", "4",
                          "--strategy", "zero3")
    zero2 = estimate_json(capsys, "--preset", "llama-2-7b", "--master-weights", "--devices", "4",
                          "--strategy", "zero2")
    assert zero3["peak_bytes"] < zero2["peak_bytes"] < single
    offload = estimate_json(capsys, "--preset", "llama-2-7b", "--master-weights", "--devices", "4",
                            "--strategy", "zero3", "--offload", "optimizer")
    assert offload["per_device"][0]["parts"]["optimizer"] == 0 and offload["per_device"][0]["host_bytes"] > 0


def test_pipeline_prints_one_column_per_stage(capsys):
    out = estimate(capsys, "--preset", "llama-2-7b", "--devices", "4", "--strategy", "pipeline", "--grad-accum", "8")
    assert all(f"device {i}" in out for i in range(4))
    data = estimate_json(capsys, "--preset", "llama-2-7b", "--devices", "4", "--strategy", "pipeline",
                         "--grad-accum", "8")
    acts = [d["parts"]["activations"] for d in data["per_device"]]
    assert acts[0] > acts[1] > acts[2]  # 1F1B: the first stage holds the most micro-batches


def test_method_options_are_config_keys(capsys):
    layer = estimate_json(capsys, "--preset", "llama-3-8b", "--method", "badam")["peak_bytes"]
    matrix = estimate_json(capsys, "--preset", "llama-3-8b", "--method", "badam",
                           "badam.granularity=matrix")["peak_bytes"]
    assert matrix < layer


def test_checkpointing_and_loss_chunk(capsys):
    plain = estimate_json(capsys, "--preset", "llama-2-7b", "--method", "badam", "--seq", "2048")
    ckpt = estimate_json(capsys, "--preset", "llama-2-7b", "--method", "badam", "--seq", "2048", "--checkpointing")
    assert ckpt["per_device"][0]["parts"]["activations"] < plain["per_device"][0]["parts"]["activations"] / 4
    assert plain["settings"]["loss_chunk"] == 256  # slimtune's fused head + loss for Llama-like models
    full_logits = estimate_json(capsys, "--preset", "llama-2-7b", "--method", "badam", "--seq", "2048",
                                "--loss-chunk", "0")
    assert full_logits["peak_bytes"] > plain["peak_bytes"]


# ----------------------------------------------------------------------------------------------------------------
# Model inputs
# ----------------------------------------------------------------------------------------------------------------


def test_model_from_hf_folder_and_config_file(capsys, tmp_path):
    config = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 172}
    (tmp_path / "config.json").write_text(json.dumps(config))
    by_folder = estimate_json(capsys, "--model", str(tmp_path))
    by_file = estimate_json(capsys, "--model", str(tmp_path / "config.json"))
    assert by_folder == by_file and by_folder["params"] == ModelSpec.from_hf_config(config).n_params


def test_model_from_gguf_metadata(capsys):
    """The built-in SmolLM2 GGUF file's metadata gives the published shape (134.5M parameters)."""
    data = estimate_json(capsys, "--model", "smollm2-135m")
    assert data["params"] == ModelSpec.preset("smollm2-135m").n_params


def test_model_gpt_settings(capsys):
    data = estimate_json(capsys, "--model", "gpt", "gpt.n_layer=4", "gpt.n_embd=128", "gpt.n_head=4",
                         "gpt.block_size=64", "--vocab", "65")
    spec = ModelSpec.from_gpt(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, bias=False)
    assert data["params"] == spec.n_params and data["settings"]["seq"] == 64
    assert data["settings"]["loss_chunk"] is None and data["settings"]["logits_fp32"] is False


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_preset_lists_known(capsys):
    with pytest.raises(SlimtuneError, match="llama-3-8b.*smollm2-135m"):
        estimate(capsys, "--preset", "llama-9b")


def test_config_json_missing_fields_named(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(SlimtuneError, match="missing vocab_size, num_hidden_layers"):
        estimate(capsys, "--model", str(tmp_path))


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 64}))
    with pytest.raises(SlimtuneError, match="mamba.*not supported"):
        estimate(capsys, "--model", str(tmp_path))


@pytest.mark.parametrize("budget", ["lots", "-3GB", "24XB"])
def test_bad_budget(capsys, budget):
    with pytest.raises(SlimtuneError, match="24GiB"):
        estimate(capsys, "--preset", "llama-2-7b", f"--budget={budget}")


def test_impossible_combination_is_the_trainers_refusal(capsys):
    with pytest.raises(SlimtuneError, match="method=badam cannot run under strategy=pipeline"):
        estimate(capsys, "--preset", "llama-2-7b", "--method", "badam", "--devices", "2", "--strategy", "pipeline")


L2 = ["--preset", "llama-2-7b"]


@pytest.mark.parametrize("argv,match", [
    ([*L2, "--strategy", "zero4"], "unknown strategy 'zero4'"),
    ([*L2, "--devices", "2", "--strategy", "single"], "one process on one device"),
    ([*L2, "--method", "nope"], "method='nope' is not one of"),
    ([*L2, "--batch", "0"], "--batch must be a positive integer"),
    ([*L2, "badam.granularity=matrix"], "applies to method=badam"),
    *[([*L2, "--method", m, "--optimizer", "adamw8bit"], f"method={m} steps with torch AdamW; optimizer adamw8bit")
      for m in ("badam", "qat", "bitnet")],
    (["--method", "full"], "give a model"),
])
def test_bad_settings(capsys, argv, match):
    with pytest.raises(SlimtuneError, match=match):
        estimate(capsys, *argv)


# ----------------------------------------------------------------------------------------------------------------
# The plug-in interface
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_estimates_its_memory(name):
    """A method cannot land without an estimate: each registered one returns a Plan for a small model."""
    from slimtune import methods
    from slimtune.config import TrainConfig, make_config

    method = methods.create(make_config(TrainConfig, [], [f"method={name}"]))
    plan = method.estimate_memory(ModelSpec.preset("smollm2-135m"), RunSettings(batch=2, seq=128))
    assert isinstance(plan, Plan) and plan.peak_bytes > 0
    assert plan.parts["weights"] > 0 and plan.parts["activations"] > 0


class NoPlan(Method):
    """A method that does not implement estimate_memory."""


@pytest.fixture
def no_plan_method():
    METHODS.register("no_plan")(NoPlan)
    yield
    METHODS.unregister("no_plan")


def test_a_method_without_estimate_is_refused_and_left_out(capsys, no_plan_method):
    with pytest.raises(NoEstimate, match="method=no_plan has no memory estimate"):
        estimate(capsys, "--preset", "llama-2-7b", "--method", "no_plan")
    data = estimate_json(capsys, "--preset", "llama-3-8b", "--method", "badam", "--budget", "80GB")
    assert "no_plan" not in {e["method"] for e in data["fitting"]}
    assert parse_budget("80GB") >= data["peak_bytes"]
