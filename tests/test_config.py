import dataclasses

import pytest

from slimtune.config import (TrainConfig, field_docs, help_text, make_config, parse_override, plugin_sections,
                             to_dict, train_help_text)
from slimtune.errors import SlimtuneError
from slimtune.methods.badam import BadamConfig


def test_defaults_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_size: 7\nlr: 6e-4\nmethod: badam\nbadam:\n  switch_mode: ascending\n")
    cfg = make_config(TrainConfig, [str(cfg_file)], ["batch_size=3", "badam.switch_every=20", "gpt.dropout=0.1"])
    assert cfg.batch_size == 3  # command line wins over YAML
    assert cfg.lr == pytest.approx(6e-4)  # YAML 1.1 reads 6e-4 as a string; we accept it as a float
    assert cfg.badam.switch_mode == "ascending" and cfg.badam.switch_every == 20
    assert cfg.gpt.dropout == 0.1 and isinstance(cfg.badam, BadamConfig)
    saved = to_dict(cfg)
    assert saved["badam"]["switch_every"] == 20 and "hf" not in saved and "cpu_shards" not in saved
    assert make_config(TrainConfig, base=saved) == cfg  # a checkpoint's config.yaml reads back to the same config


def test_unknown_key_suggests_closest():
    with pytest.raises(SlimtuneError, match=r"unknown config key 'batchsize'.*Did you mean 'batch_size'"):
        make_config(TrainConfig, overrides=["batchsize=4"])
    with pytest.raises(SlimtuneError, match=r"'badam.swich_mode'.*Did you mean 'badam.switch_mode'"):
        make_config(TrainConfig, overrides=["method=badam", "badam.swich_mode=random"])
    with pytest.raises(SlimtuneError, match=r"'gpt.n_layers'.*Did you mean 'gpt.n_layer'"):
        make_config(TrainConfig, overrides=["gpt.n_layers=4"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("gpt:\n  n_layers: 4\n")
    with pytest.raises(SlimtuneError, match=r"bad.yaml: unknown config key 'gpt.n_layers'.*'gpt.n_layer'"):
        make_config(TrainConfig, [str(f)])


def test_old_flat_keys_still_work_with_a_warning(tmp_path, capsys):
    f = tmp_path / "old.yaml"
    f.write_text("n_layer: 3\neval_interval: 7\n")
    cfg = make_config(TrainConfig, [str(f)], ["keep_last=2", "cpu_shards=2"])
    err = capsys.readouterr().err
    assert cfg.gpt.n_layer == 3 and cfg.eval.interval == 7 and cfg.ckpt.keep_last == 2
    assert cfg.strategy == "cpu_shards" and cfg.section("cpu_shards").n == 2
    assert "key 'n_layer' is now 'gpt.n_layer'" in err and "removed in slimtune 0.3" in err
    assert "cpu_shards=2 is now strategy=cpu_shards cpu_shards.n=2" in err
    # ... and a renamed key that does not apply is still refused (max_seq_len with model=gpt).
    with pytest.raises(SlimtuneError, match=r"dataset.max_seq_len applies to Hugging Face models"):
        make_config(TrainConfig, overrides=["max_seq_len=64"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=some/folder", "gpt.n_layer=4"], r"gpt.n_layer sets slimtune's GPT architecture, but model=some/folder"),
        (["model=some/folder", "n_layer=4"], r"gpt.n_layer sets slimtune's GPT architecture"),
        (["dataset.packing=true"], r"dataset.packing applies to Hugging Face models, but model=gpt"),
        (["hf.weights_dtype=bf16"], r"hf.weights_dtype applies to Hugging Face models"),
        (["badam.switch_every=5"], r"badam.switch_every applies to method=badam, but method=full"),
        (["cpu_shards.n=2"], r"cpu_shards.n applies to strategy=cpu_shards, but strategy=auto"),
        (["strategy=fsdb"], r"strategy='fsdb' is not one of cpu_shards, ddp, deepspeed, fsdp, pipeline, single. Did you mean 'fsdp'\?"),
        (["model=x", "dataset.val_data=v.jsonl", "dataset.val_fraction=0.1"], r"replaces the held-out split"),
    ],
)
def test_keys_that_do_not_apply_are_errors(overrides, message):
    with pytest.raises(SlimtuneError, match=message):
        make_config(TrainConfig, overrides=overrides)


def test_dict_keys_merge_key_by_key(tmp_path):
    """The README's recipe: two column_map overrides both survive (and merge with the YAML's)."""
    f = tmp_path / "c.yaml"
    f.write_text("model: m\ndataset:\n  column_map:\n    input: context\n")
    cfg = make_config(TrainConfig, [str(f)], ["dataset.column_map.instruction=question",
                                             "dataset.column_map.output=answer"])
    assert cfg.dataset.column_map == {"input": "context", "instruction": "question", "output": "answer"}
    cfg = make_config(TrainConfig, overrides=["model=m", "column_map.instruction=q", "column_map.output=a"])
    assert cfg.dataset.column_map == {"instruction": "q", "output": "a"}


def test_val_data_replaces_the_split():
    cfg = make_config(TrainConfig, overrides=["model=m", "dataset.val_data=v.jsonl"])
    assert cfg.dataset.held_out_fraction == 0.0
    assert make_config(TrainConfig, overrides=["model=m"]).dataset.held_out_fraction == 0.05


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=abc", r"batch_size must be int, got 'abc'"),
        ("batch_size=2.5", r"batch_size must be int"),
        ("runtime.compile=maybe", r"runtime.compile must be bool"),
        ("lr=fast", r"lr must be float"),
        ("gpt=3", r"gpt is a section"),
    ],
)
def test_wrong_types(override, message):
    with pytest.raises(SlimtuneError, match=message):
        make_config(TrainConfig, overrides=[override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["batch_size=0"], "batch_size must be a positive integer, got 0"),
        (["batch_size=-3"], "batch_size must be a positive integer, got -3"),
        (["gpt.n_head=5"], "gpt.n_embd=384 must be divisible by gpt.n_head=5"),
        (["method=lora2"], "method='lora2' is not one of"),
        (["method=badam", "badam.switch_mode=randm"], "Did you mean 'random'"),
        (["method=badam", "badam.switch_every=0"], "badam.switch_every must be >= 1"),
        (["runtime.cpu_allocator=kep"], "runtime.cpu_allocator='kep' is not one of keep, system, release. Did you "
                                        "mean 'keep'"),
    ],
)
def test_value_checks(overrides, message):
    with pytest.raises(SlimtuneError, match=message):
        make_config(TrainConfig, overrides=overrides)


def test_parse_override_scalars():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=out/run-1") == (["x"], "out/run-1")
    assert parse_override("x=") == (["x"], None)
    with pytest.raises(SlimtuneError, match="expected key=value"):
        parse_override("batch_size")


def _sections(cls):
    hints = __import__("typing").get_type_hints(cls)
    return [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]


def test_every_field_has_a_docstring_and_help_lists_it():
    text = train_help_text()
    for cls in (TrainConfig, *_sections(TrainConfig), *plugin_sections().values()):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("internal"):
            assert f"  {f.name}  (" in text or f"[{f.name}]" in text
    assert "plugins" not in help_text(TrainConfig)
    assert "badam.switch_mode  (str, default 'random')" in text and "gpt.n_layer  (int, default 6)" in text
    assert "Sequences per micro-batch" in text and "[badam] (method=badam)" in text


def test_other_trainers_key_names_are_accepted_without_warning(capsys):
    cfg = make_config(TrainConfig, overrides=["model=m", "data=[a.jsonl,b.jsonl]", "report_to=tensorboard",
                                              "data_weights=[0.7,0.3]", "role_map.bot=assistant", "epochs=2"])
    assert cfg.log.report_to == ["tensorboard"] and cfg.dataset.weights == [0.7, 0.3]
    assert cfg.dataset.role_map == {"bot": "assistant"} and cfg.num_epochs == 2
    assert "warning" not in capsys.readouterr().err
