"""Every example config parses, and its first line is the exact command that runs it."""

from pathlib import Path

import pytest

from slimtune.config import TrainConfig, make_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config(path, capsys):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# slimtune ") and f"configs/{path.name}" in first
    cfg = make_config(TrainConfig, [str(path)])
    assert cfg.data and cfg.out_dir
    assert "warning" not in capsys.readouterr().err  # examples use the current key names
