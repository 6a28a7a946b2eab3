"""slimtune.quant.loftq: the low-rank factors of a rounding error, and reading original weights by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from slimtune.errors import SlimtuneError
from slimtune.quant.loftq import SourceWeights, low_rank_factors


def test_factors_are_the_best_rank_r_approximation_and_leave_the_rng_alone():
    g = torch.Generator().manual_seed(0)
    residual = torch.randn(96, 4, generator=g) @ torch.randn(4, 80, generator=g) * 3 \
        + 0.01 * torch.randn(96, 80, generator=g)
    state = torch.random.get_rng_state()
    b, a = low_rank_factors(residual, rank=4, scaling=2.0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is untouched
    assert b.shape == (96, 4) and a.shape == (4, 80)
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert (2.0 * b @ a - best).abs().max() < 1e-4 * best.abs().max()
    # Deterministic (a fixed seed), and the singular values split evenly between B and A.
    b2, a2 = low_rank_factors(residual, rank=4, scaling=2.0)
    assert torch.equal(b, b2) and torch.equal(a, a2)
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-4)


def test_rank_is_capped_by_the_matrix():
    b, a = low_rank_factors(torch.randn(6, 3), rank=8, scaling=1.0)
    assert b.shape == (6, 3) and a.shape == (3, 3)
    with pytest.raises(ValueError, match="must be a matrix"):
        low_rank_factors(torch.randn(2, 3, 4), rank=1, scaling=1.0)


def test_source_weights_reads_shards_and_finds_renamed_trunks(tmp_path):
    one, two = torch.randn(4, 3), torch.randn(5, 2)
    save_file({"model.layers.0.q_proj.weight": one}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"model.layers.1.q_proj.weight": two}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.layers.0.q_proj.weight": "model-00001-of-00002.safetensors",
        "model.layers.1.q_proj.weight": "model-00002-of-00002.safetensors"}}))
    with SourceWeights(tmp_path) as source:
        assert source.names() == {"model.layers.0.q_proj.weight", "model.layers.1.q_proj.weight"}
        assert torch.equal(source.find("model.layers.1.q_proj"), two)
        assert torch.equal(source.find("layers.0.q_proj", prefixes=("model",)), one)  # added
        with pytest.raises(SlimtuneError, match=r"no tensor 'model.layers.2.q_proj.weight' .*qlora.init=default"):
            source.find("model.layers.2.q_proj")
    single = tmp_path / "single"
    single.mkdir()
    save_file({"transformer.h.0.weight": one}, str(single / "model.safetensors"))
    with SourceWeights(single) as source:
        assert torch.equal(source.find("h.0", prefixes=("transformer",)), one)


def test_a_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SlimtuneError, match=r"has none \(no model.safetensors.*qlora.init=default"):
        SourceWeights(tmp_path)
