"""LoRA and QLoRA train with slimtune's oneDNN linear layers (runtime.matmul=onednn, what `auto` picks on many CPUs):
the adapted layers' in-place sum must not modify a custom autograd Function's output, which is a view."""

import pytest

from slimtune import cli
from tests.e2e.test_ddp import records
from tests.tiny_hf import one_torch_thread  # noqa: F401


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_train_on_onednn_linears_as_on_aten(method, llama_dir, chat_file, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    runs = {}
    for matmul in ("onednn", "aten"):
        out = tmp_path / matmul
        assert cli.main(["train", f"model={llama_dir}", f"data={chat_file}", f"out_dir={out}", f"method={method}",
                         "max_iters=3", f"runtime.matmul={matmul}", "log.progress=false", "log.plot=false",
                         "log.interval=1", "batch_size=2", "dataset.max_seq_len=64", "eval.interval=0",
                         "runtime.threads=1", "optim.warmup_iters=1"]) == 0
        runs[matmul] = [r["loss"] for r in records(out, "train")]
    assert len(runs["onednn"]) == 3 and runs["onednn"] == pytest.approx(runs["aten"], rel=1e-4)
