"""Shared fixtures: a small text corpus, a prepared data folder, tiny configs, one cache dir per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

TINY = ["gpt.n_layer=2", "gpt.n_head=2", "gpt.n_embd=32", "gpt.block_size=32", "batch_size=4", "eval.iters=2", "log.progress=false",
        "log.plot=false", "optim.warmup_iters=2"]


def pytest_configure(config):
    # One cache for the whole run (and the subprocesses it starts): the matmul peak is measured once.
    if "SLIMTUNE_CACHE" not in os.environ:
        root = Path(config.rootpath) / ".pytest_cache" / "slimtune"
        root.mkdir(parents=True, exist_ok=True)
        os.environ["SLIMTUNE_CACHE"] = str(root)
    # precision=auto means fp32 on every host (the bf16 probe is not consulted): a test of what auto does on a
    # bf16-capable CPU forces that branch itself. `SLIMTUNE_BF16_SPEEDUP=2 make test` runs the suite as a Zen 4 or
    # Sapphire Rapids host's users run it (bf16 autocast wherever precision is left at auto).
    os.environ.setdefault("SLIMTUNE_BF16_SPEEDUP", "1")
    # Hugging Face datasets' own cache (parquet converted to Arrow) stays in the test tree too; set before it is imported.
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(os.environ["SLIMTUNE_CACHE"], "hf-datasets"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    from slimtune.data.corpus import write_python_docs

    return write_python_docs(tmp_path_factory.mktemp("corpus") / "docs.txt", max_chars=60_000)


@pytest.fixture(scope="session")
def char_data(corpus_file, tmp_path_factory) -> Path:
    from slimtune.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "chars"
    prepare([corpus_file], out, tokenizer="char", progress=False)
    return out


@pytest.fixture
def tiny_args(char_data, tmp_path) -> list[str]:
    """key=value overrides for a tiny, fast training run writing into tmp_path/out."""
    return [f"data={char_data}", f"out_dir={tmp_path / 'out'}", *TINY]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + tokenizer saved as a Hugging Face folder."""
    from tests.tiny_hf import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    """40 chat records of the demo's word-reversal task."""
    from slimtune.tasks import make_examples, write_jsonl

    return write_jsonl(make_examples(40, seed=0), tmp_path_factory.mktemp("sft") / "reverse.jsonl")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantize(*argv) -> int:
    """`slimtune quantize ARGV...` in this process; its exit status."""
    import argparse

    from slimtune.quant.cli import add_parser, run

    parser = argparse.ArgumentParser(prog="slimtune")
    add_parser(parser.add_subparsers(dest="verb"))
    return run(parser.parse_args(["quantize", *map(str, argv)]))
