import dataclasses

import pytest

from slimtune.config import BadamConfig, TrainConfig, field_docs, help_text, make_config, parse_override
from slimtune.errors import SlimtuneError


def test_defaults_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_size: 7\nlr: 6e-4\nbadam:\n  switch_mode: ascending\n")
    cfg = make_config(TrainConfig, [str(cfg_file)], ["batch_size=3", "badam.switch_every=20", "dropout=0.1"])
    assert cfg.batch_size == 3  # command line wins over YAML
    assert cfg.lr == pytest.approx(6e-4)  # YAML 1.1 reads 6e-4 as a string; we accept it as a float
    assert cfg.badam.switch_mode == "ascending" and cfg.badam.switch_every == 20
    assert cfg.dropout == 0.1 and isinstance(cfg.badam, BadamConfig)


def test_unknown_key_suggests_closest():
    with pytest.raises(SlimtuneError, match=r"unknown config key 'batchsize'.*Did you mean 'batch_size'"):
        make_config(TrainConfig, overrides=["batchsize=4"])
    with pytest.raises(SlimtuneError, match=r"'badam.swich_mode'.*Did you mean 'badam.switch_mode'"):
        make_config(TrainConfig, overrides=["badam.swich_mode=random"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("n_layers: 4\n")
    with pytest.raises(SlimtuneError, match=r"bad.yaml: unknown config key 'n_layers'.*'n_layer'"):
        make_config(TrainConfig, [str(f)])


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=abc", r"batch_size must be int, got 'abc'"),
        ("batch_size=2.5", r"batch_size must be int"),
        ("compile=maybe", r"compile must be bool"),
        ("lr=fast", r"lr must be float"),
        ("badam=3", r"badam is a section"),
    ],
)
def test_wrong_types(override, message):
    with pytest.raises(SlimtuneError, match=message):
        make_config(TrainConfig, overrides=[override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=0", "batch_size must be a positive integer, got 0"),
        ("batch_size=-3", "batch_size must be a positive integer, got -3"),
        ("n_head=5", "n_embd=384 must be divisible by n_head=5"),
        ("method=lora2", "method='lora2' is not one of"),
        ("badam.switch_mode=randm", "Did you mean 'random'"),
        ("badam.switch_every=0", "badam.switch_every must be >= 1"),
        ("cpu_allocator=kep", "cpu_allocator='kep' is not one of keep, system, release. Did you mean 'keep'"),
    ],
)
def test_value_checks(override, message):
    with pytest.raises(SlimtuneError, match=message):
        make_config(TrainConfig, overrides=[override])


def test_parse_override_scalars():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=out/run-1") == (["x"], "out/run-1")
    assert parse_override("x=") == (["x"], None)
    with pytest.raises(SlimtuneError, match="expected key=value"):
        parse_override("batch_size")


def test_every_field_has_a_docstring_and_help_lists_it():
    text = help_text(TrainConfig)
    for cls in (TrainConfig, BadamConfig):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
    for f in dataclasses.fields(TrainConfig):
        assert f"  {f.name}  (" in text or f"[{f.name}]" in text
    assert "badam.switch_mode  (str, default 'random')" in text
    assert "Sequences per micro-batch." in text
