"""strategy=pipeline through `slimtune train` under torchrun (two CPU processes, gloo): the losses of one process,
checkpoints that are one ordinary model, exact resume, and resume in one process."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from slimtune import cli
from tests.conftest import TINY
from tests.e2e.test_ddp import assert_same_losses, records, torchrun

PIPELINE = ["strategy=pipeline", "pipeline.force=true", "pipeline.microbatches=2"]


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out, "train")}


@pytest.mark.slow
def test_pipeline_trains_like_one_process_and_resumes(char_data, tmp_path):
    common = [f"data={char_data}", *TINY, "gpt.n_layer=3", "max_iters=4", "eval.interval=2", "log.interval=1",
              "runtime.threads=1", "runtime.precision=fp32"]
    pipelined = tmp_path / "pipelined"
    log = torchrun(*common, *PIPELINE, f"out_dir={pipelined}")
    # Where the stages are cut depends on the measured unit times; that they are two, contiguous, does not.
    assert re.search(r"strategy pipeline: 2 processes, 2 stages \[embedding\.\.\S+, \S+\.\.head\], 1f1b, 2 "
                     r"micro-batches", log), log
    one = tmp_path / "one"
    assert cli.main(["train", *common, f"out_dir={one}", "strategy=single"]) == 0

    a, b = _losses(pipelined), _losses(one)
    assert list(a) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5, rel=0)
    evals = records(pipelined, "eval")
    assert [r["step"] for r in evals] == [2, 4]
    for x, y in zip(evals, records(one, "eval"), strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-5, rel=0)
    assert [r["tokens"] for r in records(pipelined, "train")] == [r["tokens"] for r in records(one, "train")]

    # One ordinary checkpoint: the same tensors under the same names as one process writes (the tied embedding
    # stored once), and an optimizer state that one process loads.
    ckpt = pipelined / "step-000004"
    weights, reference = load_file(ckpt / "model.safetensors"), load_file(one / "step-000004" / "model.safetensors")
    tied = {"transformer.wte.weight", "lm_head.weight"}  # one file keeps either name of the tied matrix
    assert weights.keys() - tied == reference.keys() - tied and len(weights) == len(reference)
    for name in weights.keys() - tied:
        assert weights[name].shape == reference[name].shape
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["strategy"] == "pipeline"

    # Exact resume: stop at step 2, resume under torchrun; the losses are those of the uninterrupted run, bit for bit.
    stopped = tmp_path / "stopped"
    shutil.copytree(pipelined, stopped, ignore=shutil.ignore_patterns("step-000004"))
    torchrun(*common, *PIPELINE, f"out_dir={stopped}")
    assert _losses(stopped) == a

    # The pipelined checkpoint of step 2 resumes in one process: the next losses are the pipeline's (float rounding).
    alone = tmp_path / "alone"
    assert cli.main(["train", *common, f"out_dir={alone}", "strategy=single",
                     f"resume={pipelined / 'step-000002'}"]) == 0
    c = _losses(alone)
    assert list(c) == [3, 4]
    for step in c:
        assert c[step] == pytest.approx(a[step], abs=1e-5, rel=0)


@pytest.mark.slow
def test_pipelined_fine_tune_of_a_tied_llama_equals_one_process(llama_dir, chat_file, tmp_path):
    """Ragged padded batches (a schedule per shape), the mask carried between stages, the chunked loss on the last
    stage, the tied embedding and head on two stages; the checkpoint is a transformers folder."""
    common = [f"model={llama_dir}", f"data={chat_file}", "max_iters=3", "batch_size=4", "eval.interval=3",
              "eval.iters=2", "log.interval=1", "log.progress=false", "log.plot=false", "optim.warmup_iters=0",
              "runtime.threads=1", "runtime.precision=fp32", "dataset.max_seq_len=64"]
    torchrun(*common, *PIPELINE, f"out_dir={tmp_path / 'pipelined'}")
    assert cli.main(["train", *common, f"out_dir={tmp_path / 'one'}", "strategy=single"]) == 0
    assert_same_losses(tmp_path / "pipelined", tmp_path / "one", 3)
    assert len(records(tmp_path / "pipelined", "eval")) == 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pipelined" / "step-000003")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
