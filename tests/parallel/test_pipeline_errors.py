"""Pipeline splitting in one process: units, the profiler, `slimtune split`, and the bad inputs a user can give,
each answered with one clear message naming the key to change."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from slimtune import cli
from slimtune.errors import SlimtuneError
from slimtune.models.gpt import GPT, GPTConfig
from slimtune.parallel.profile import profile_units
from slimtune.parallel.units import cut_units, fx_units
from tests.parallel.test_pipeline import ResidualCNN
from tests.tiny_hf import one_torch_thread  # noqa: F401

SMALL_GPT = ["gpt.n_layer=2", "gpt.n_head=2", "gpt.n_embd=32", "gpt.block_size=16", "batch_size=4"]


class DataDependent(nn.Module):
    """A forward torch.fx cannot trace: Python control flow on a tensor's value, in one child module."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.gate = Gate()
        self.last = nn.Linear(4, 2)

    def forward(self, x):
        return self.last(self.gate(self.first(x)))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def _split(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["split", *SMALL_GPT, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_units_of_the_gpt_and_of_a_cnn_with_a_skip_connection_compute_the_model():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=8))
    units = cut_units(gpt)
    assert units.names == ["embedding", "transformer.h.0", "transformer.h.1", "head"]
    x = torch.randint(0, 20, (2, 8))
    out = x
    for unit in units.modules:
        out = unit(out)
    assert torch.equal(out, gpt(x, x)[0])

    cnn = ResidualCNN()
    units = fx_units(cnn)
    assert units.names == ["stem", "conv1", "conv2", "pool", "head"]  # functions (relu, +) join their unit
    images = torch.randn(2, 3, 8, 8)
    values = (images,)
    for unit in units.modules:
        out = unit(*values)
        values = out if isinstance(out, tuple) else (out,)
    assert torch.allclose(values[0], cnn(images))
    grouped = fx_units(cnn, ["conv1", "head"])
    assert grouped.names == ["stem", "conv1", "head"]


def test_profile_weighs_frozen_units_by_their_weights_only():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=8))
    units = cut_units(gpt)
    batch = units.example(2, 8)
    trained = profile_units(units, batch, repeats=2)
    for p in gpt.transformer.h[0].parameters():
        p.requires_grad_(False)
    frozen = profile_units(units, batch, repeats=2)
    weights = sum(p.numel() * 4 for p in gpt.transformer.h[0].parameters())
    assert trained.state_bytes[1] == weights * 4  # weights + gradients + two Adam moments, fp32
    assert frozen.state_bytes[1] == weights
    assert all(t > 0 for t in trained.seconds) and all(a > 0 for a in trained.activation_bytes)
    assert all(p.grad is None for p in gpt.parameters())  # the profile leaves no gradients behind


def test_split_prints_the_exact_and_the_equal_split(capsys):
    code, out, _ = _split(capsys, "--stages", "2")
    assert code == 0
    assert "exact split:" in out and "equal-layer split:" in out and "bubble fraction 0.33" in out
    code, out, _ = _split(capsys, "--stages", "2", "--by", "both", "--json")
    plan = json.loads(out)
    assert plan["stages"] == 2 and plan["units"]["names"][0] == "embedding"
    balanced, equal = plan["balanced"], plan["equal_layers"]
    assert balanced["bottleneck_seconds"] <= equal["bottleneck_seconds"] * 1.5  # measured: noise allowed
    assert [s["first_unit"] for s in equal["stages"]] == [0, 2]


def test_split_takes_a_model_folder_and_weighs_what_the_method_trains(llama_dir, capsys):
    args = [str(llama_dir), "dataset.max_seq_len=32", "batch_size=2", "--stages", "2", "--json"]
    assert cli.main(["split", *args]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["units"]["names"] == ["embed_tokens", "layers.0", "layers.1", "norm+lm_head"]
    assert cli.main(["split", "method=lora", *args]) == 0
    lora = json.loads(capsys.readouterr().out)
    # A frozen base weighs its weights only; the adapters (in the layers) add their Adam state.
    assert lora["units"]["state_bytes"][0] * 4 == full["units"]["state_bytes"][0]
    assert lora["units"]["state_bytes"][1] < full["units"]["state_bytes"][1]


@pytest.mark.parametrize("args,message", [
    (["--stages", "5"], r"--stages 5 is more than the 4 units of the model \(embedding, transformer.h.0, "
                        r"transformer.h.1, head\); use at most 4"),
    (["batch_size=3", "--stages", "2"], r"batch_size=3 does not divide into pipeline.microbatches=2"),
    (["pipeline.microbatches=1", "--stages", "2"],
     r"pipeline.microbatches=1 is fewer than the 2 stages, which pipeline.schedule=1f1b needs"),
    (["--stages", "2", "--memory-cap", "1000"],
     r"no split of 4 units into 2 stages fits pipeline.memory_cap=1000 bytes; the smallest cap that fits is \d+ "
     r"bytes"),
    (["pipeline.split_points=transformer.h.7", "--stages", "2"],
     r"pipeline.split_points names 'transformer.h.7', not a unit of this model; choose from: embedding"),
    (["pipeline.schedule=zigzag", "--stages", "2"], r"pipeline.schedule='zigzag' is not one of gpipe, 1f1b"),
])
def test_bad_split_input_is_one_clear_error(capsys, args, message):
    code, _, err = _split(capsys, *args)
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_a_model_fx_cannot_trace_names_the_module_and_the_split_points_key():
    with pytest.raises(SlimtuneError, match=r"torch.fx cannot trace DataDependent \(in its module 'gate'\).*"
                                            r"pipeline.split_points=NAME,NAME .*first, gate, last"):
        fx_units(DataDependent())
    units = fx_units(DataDependent(), ["last"])  # by hand: its children, one after the other
    assert units.names == ["first", "last"]
    with pytest.raises(SlimtuneError, match=r"pipeline.split_points names 'middle', not a top-level module"):
        fx_units(DataDependent(), ["middle"])


def test_a_micro_batch_count_that_does_not_divide_the_batch_is_refused():
    from slimtune.parallel.pipeline import PipelineRunner

    torch.manual_seed(0)
    units = cut_units(GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8)))
    runner = PipelineRunner(units, [range(0, 3)], "gpipe", 2, torch.device("cpu"), rank=0, world_size=1)
    with pytest.raises(SlimtuneError, match=r"a batch of 3 rows does not divide into pipeline.microbatches=2"):
        runner.step(units.example(3, 8), 1.0)


def test_pipeline_needs_torchrun(char_data, tmp_path, capsys):
    code = cli.main(["train", f"data={char_data}", f"out_dir={tmp_path}", *SMALL_GPT, "strategy=pipeline"])
    assert code == 2
    assert "strategy=pipeline needs 2 or more processes: torchrun --nproc_per_node=N" in capsys.readouterr().err


def test_a_model_that_fits_one_device_is_not_split_unless_forced(char_data):
    from slimtune.config import TrainConfig, make_config
    from slimtune.parallel.pipeline import Pipeline

    for force, refused in (("false", True), ("true", False)):
        cfg = make_config(TrainConfig, overrides=[f"data={char_data}", "strategy=pipeline", f"pipeline.force={force}"])
        strategy = Pipeline(cfg)
        strategy.device, strategy._whole_model_peak = torch.device("cpu"), 1_000_000  # as estimate_memory records
        if refused:
            with pytest.raises(SlimtuneError, match=r"the model fits one device \(976.6 KiB predicted, .* available "
                                                    r"on cpu\), so it is not split: train it with strategy=ddp"):
                strategy._check_fits()
        else:
            strategy._check_fits()


def test_a_hugging_face_model_of_another_family_is_refused_by_name():
    from tests.tiny_hf import tiny_bert, tiny_tokenizer

    bert = tiny_bert(tiny_tokenizer(None, pair_template=True))
    with pytest.raises(SlimtuneError, match=r"strategy=pipeline cuts Hugging Face causal LMs of the Llama-class "
                                            r"families \(.*llama.*\) and slimtune's GPT; BertForSequenceClassification "
                                            r"\(model_type 'bert'\) is not one of them"):
        cut_units(bert)


def test_badam_is_refused_by_name(char_data):
    from slimtune import methods
    from slimtune.config import TrainConfig, make_config
    from slimtune.parallel.pipeline import Pipeline

    cfg = make_config(TrainConfig, overrides=[f"data={char_data}", "strategy=pipeline", "method=badam"])
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(SlimtuneError, match=r"method=badam cannot run under strategy=pipeline: .* Use strategy=ddp or "
                                            r"strategy=fsdp"):
        Pipeline(cfg).check(methods.create(cfg), model)


def test_more_stages_than_units_names_the_units(char_data):
    from slimtune import methods
    from slimtune.config import TrainConfig, make_config
    from slimtune.parallel.pipeline import Pipeline

    cfg = make_config(TrainConfig, overrides=[f"data={char_data}", "strategy=pipeline", "pipeline.force=true"])
    strategy = Pipeline(cfg)
    strategy.n_stages = 5  # as setup sets it for 5 processes
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=8))
    with pytest.raises(SlimtuneError, match=r"GPT has 4 units \(embedding, transformer.h.0, transformer.h.1, head\), "
                                            r"too few for 5 stages; run fewer processes"):
        strategy.shard(model, methods.create(cfg))
