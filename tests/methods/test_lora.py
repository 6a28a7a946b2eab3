"""method=lora: peft adapters in and out, exact resume, merged export, LoRA on slimtune's GPT, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from slimtune import cli
from slimtune.config import TrainConfig, make_config
from slimtune.errors import SlimtuneError
from tests.conftest import TINY
from tests.tiny_hf import (assert_same_training_step, one_torch_thread, save_tiny_bert, tiny_llama,  # noqa: F401
                           tiny_tokenizer, write_sentiment_jsonl)

peft = pytest.importorskip("peft")

FAST = ["log.progress=false", "log.plot=false", "eval.iters=2", "optim.warmup_iters=2", "dataset.max_seq_len=64",
        "batch_size=4", "runtime.threads=1", "dataset.val_fraction=0", "eval.interval=0", "log.interval=1",
        "optim.weight_decay=0"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


@pytest.fixture(scope="module")
def trained(llama_dir, chat_file, tmp_path_factory):
    """A LoRA run of 8 steps on the tiny Llama: its out_dir."""
    out = tmp_path_factory.mktemp("lora") / "run"
    assert cli.main(train_args(llama_dir, chat_file, out, "max_iters=8")) == 0
    return out


def train_args(model, data, out, *extra):
    return ["train", f"model={model}", f"data={data}", f"out_dir={out}", *FAST, "lr=3e-3", "method=lora", *extra]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


def base_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def test_checkpoint_is_a_peft_adapter_with_the_same_logits(trained, llama_dir):
    from slimtune.finetune import open_causal_lm

    ckpt = trained / "step-000008"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer.pt"} <= names
    assert "model.safetensors" not in names
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == llama_dir.resolve()
    assert sorted(config["target_modules"]) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert losses(trained)[8] < losses(trained)[1]

    plain = peft.PeftModel.from_pretrained(base_model(llama_dir), str(ckpt)).eval()
    ours, _ = open_causal_lm(str(trained), device="cpu")
    with torch.no_grad():
        theirs, mine, untouched = plain(IDS).logits, ours(IDS).logits, base_model(llama_dir)(IDS).logits
    assert torch.equal(theirs, mine)
    assert (mine - untouched).abs().max() > 1e-3  # the adapter really changed the model


def test_export_merged_and_adapter_only(trained, llama_dir, tmp_path):
    from slimtune.finetune import open_causal_lm

    ours, _ = open_causal_lm(str(trained), device="cpu")
    assert cli.main(["export", str(trained), str(tmp_path / "merged"), "--merge"]) == 0
    merged = base_model(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        assert (merged(IDS).logits - ours(IDS).logits).abs().max() < 1e-4

    assert cli.main(["export", str(trained), str(tmp_path / "adapter")]) == 0
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not {"optimizer.pt", "trainer.pt", "model.safetensors"} & files
    again = peft.PeftModel.from_pretrained(base_model(llama_dir), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, ours(IDS).logits)


def test_resume_is_bit_identical(llama_dir, chat_file, tmp_path):
    args = lambda out: train_args(llama_dir, chat_file, out, "max_iters=8", "ckpt.interval=4",  # noqa: E731
                                  "lora.dropout=0.1", "ckpt.keep_last=0")
    assert cli.main(args(tmp_path / "straight")) == 0
    assert cli.main(args(tmp_path / "stopped")) == 0
    shutil.rmtree(tmp_path / "stopped" / "step-000008")  # as if the run had stopped after the step-4 checkpoint
    assert cli.main(args(tmp_path / "stopped")) == 0
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(a) == list(range(1, 9)) and a == b


def test_adapter_made_with_peft_alone_keeps_training(llama_dir, chat_file, tmp_path):
    from safetensors.torch import load_file

    made = peft.get_peft_model(base_model(llama_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False))
    made.save_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        start_logits = made(IDS).logits
    out = tmp_path / "run"
    assert cli.main(train_args(llama_dir, chat_file, out, "max_iters=6", f"lora.adapter={tmp_path / 'adapter'}")) == 0
    config = json.loads((out / "step-000006" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    before = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(out / "step-000006" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(not torch.equal(before[k], after[k]) for k in before)
    run = losses(out)
    assert run[6] < run[1]
    # The run started from that adapter, not from a fresh one: training 0 steps gives its exact logits.
    from slimtune.methods import create

    cfg = make_config(TrainConfig, overrides=[f"model={llama_dir}", "method=lora", f"lora.adapter={tmp_path / 'adapter'}"])
    with torch.no_grad():
        assert torch.equal(create(cfg).prepare(base_model(llama_dir))(IDS).logits, start_logits)


@pytest.mark.parametrize("options", [{}, {"lora_alpha": 7, "use_rslora": True, "lora_dropout": 0.1},
                                     {"use_dora": True}])
def test_lean_adapter_forward_is_pefts_bit_for_bit(llama_dir, options):
    """Training runs peft's LoRA linears with slimtune's leaner forward (in-place scaling and sum): the logits and
    every gradient must be exactly peft's, with dropout drawing the same masks; DoRA keeps peft's own forward."""
    from slimtune.methods.peft_patch import lean_lora_layers

    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "init_lora_weights": False, **options}
    theirs = peft.get_peft_model(base_model(llama_dir), peft.LoraConfig(**config)).train()
    torch.manual_seed(0)  # (init_lora_weights=False draws B at random)
    mine = peft.get_peft_model(base_model(llama_dir), peft.LoraConfig(**config)).train()
    mine.load_state_dict(theirs.state_dict())
    assert lean_lora_layers(mine) == 6
    layer = mine.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, peft.tuners.lora.layer.Linear) and repr(layer).startswith("lora.Linear(")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    assert_same_training_step(theirs, mine, ids)
    with torch.no_grad():
        assert torch.equal(theirs.eval()(ids).logits, mine.eval()(ids).logits)
        with mine.disable_adapter():
            assert torch.equal(mine(ids).logits, base_model(llama_dir)(ids).logits)


def test_lora_on_a_classifier_saves_its_new_head(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert")
    write_sentiment_jsonl(tmp_path / "cls.jsonl")
    out = tmp_path / "cls"
    assert cli.main(["train", f"model={bert}", "hf.task=classify", f"data={tmp_path / 'cls.jsonl'}", f"out_dir={out}",
                     *FAST, "batch_size=8", "max_iters=40", "lr=1e-2", "method=lora"]) == 0
    from safetensors.torch import load_file

    saved = load_file(str(out / "step-000040" / "adapter_model.safetensors"))
    assert any(k.endswith("classifier.weight") for k in saved)
    run = losses(out)
    assert sum(run[s] for s in range(36, 41)) < 0.8 * sum(run[s] for s in range(1, 6))


def test_lora_on_slimtunes_gpt_trains_and_resumes(char_data, tmp_path):
    def args(out):
        return ["train", f"data={char_data}", f"out_dir={out}", *TINY, "log.interval=1", "eval.interval=0",
                "runtime.threads=1", "method=lora", "lr=1e-2", "max_iters=8", "ckpt.interval=4", "ckpt.keep_last=0"]

    assert cli.main(args(tmp_path / "straight")) == 0
    assert cli.main(args(tmp_path / "stopped")) == 0
    shutil.rmtree(tmp_path / "stopped" / "step-000008")
    assert cli.main(args(tmp_path / "stopped")) == 0
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(a) == list(range(1, 9)) and a == b and a[8] < a[1]
    config = json.loads((tmp_path / "straight" / "step-000008" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


# -- bad input -----------------------------------------------------------------------------------------------------


def test_target_that_matches_nothing_lists_the_linear_layers(llama_dir, chat_file, tmp_path, capsys):
    assert cli.main(train_args(llama_dir, chat_file, tmp_path / "o", "lora.target_modules=qkv_proj")) == 2
    err = capsys.readouterr().err
    assert "'qkv_proj' matches no linear layer" in err and "model.layers.N.self_attn.q_proj" in err


def test_bad_rank_and_keys_of_another_method(llama_dir, chat_file, tmp_path, capsys):
    assert cli.main(train_args(llama_dir, chat_file, tmp_path / "o", "lora.r=0")) == 2
    assert "lora.r must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SlimtuneError, match="lora.r applies to method=lora, but method=full"):
        make_config(TrainConfig, overrides=[f"model={llama_dir}", "lora.r=4"])
    with pytest.raises(SlimtuneError, match="not a peft adapter folder"):
        make_config(TrainConfig, overrides=[f"model={llama_dir}", "method=lora", f"lora.adapter={tmp_path}"])


def test_adapter_for_another_base_is_refused(llama_dir, chat_file, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    peft.get_peft_model(wider, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "a"))
    assert cli.main(train_args(llama_dir, chat_file, tmp_path / "o", f"lora.adapter={tmp_path / 'a'}")) == 2
    err = capsys.readouterr().err
    assert "does not fit this base model" in err and "different shapes" in err


def test_merging_into_another_base_is_refused(llama_dir, chat_file, tmp_path, capsys):
    base = shutil.copytree(llama_dir, tmp_path / "base")
    out = tmp_path / "run"
    assert cli.main(train_args(base, chat_file, out, "max_iters=2")) == 0
    tok = tiny_tokenizer()
    tiny_llama(tok, seed=1).save_pretrained(base)  # same architecture, other weights
    capsys.readouterr()
    assert cli.main(["export", str(out), str(tmp_path / "merged"), "--merge"]) == 2
    assert "trained on a different base model" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_dora_and_rslora_merge_exactly(llama_dir, chat_file, tmp_path):
    from slimtune.finetune import open_causal_lm

    out = tmp_path / "dora"
    assert cli.main(train_args(llama_dir, chat_file, out, "max_iters=3", "lora.use_dora=true", "lora.use_rslora=true",
                               "lora.target_modules=q_proj,*.mlp.up_proj")) == 0
    config = json.loads((out / "step-000003" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]
    assert sorted(config["target_modules"]) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "q_proj"]
    ours, _ = open_causal_lm(str(out), device="cpu")
    assert cli.main(["export", str(out), str(tmp_path / "merged"), "--merge"]) == 0
    with torch.no_grad():
        assert (base_model(tmp_path / "merged")(IDS).logits - ours(IDS).logits).abs().max() < 1e-4


def test_classifier_adapter_checkpoint_exports_merged(tmp_path):
    """The new head is initialised afresh at every load; the fingerprint leaves it out, the adapter brings it."""
    from transformers import AutoModelForSequenceClassification

    from slimtune.finetune import checkpoint_method

    bert = save_tiny_bert(tmp_path / "bert")
    lines = [json.dumps({"text": f"good movie {i}" if i % 2 else f"bad film {i}", "label": "pos" if i % 2 else "neg"})
             for i in range(16)]
    (tmp_path / "cls.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cls"
    assert cli.main(["train", f"model={bert}", "hf.task=classify", f"data={tmp_path / 'cls.jsonl'}", f"out_dir={out}",
                     *FAST, "max_iters=3", "method=lora"]) == 0
    ckpt = out / "step-000003"
    assert cli.main(["export", str(ckpt), str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ours, _ = checkpoint_method(str(ckpt)).load_for_inference(ckpt)
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    with torch.no_grad():
        assert (merged(ids).logits - ours.eval()(ids).logits).abs().max() < 1e-5


def test_lora_with_badam_trains_one_blocks_adapters_at_a_time_and_resumes_exactly(llama_dir, chat_file, tmp_path):
    """lora.badam=true: BAdam's blocks over the adapters; a switch every 2 steps, in ascending order."""
    from safetensors.torch import load_file

    extra = ("max_iters=4", "ckpt.interval=2", "ckpt.keep_last=0", "lora.badam=true", "badam.switch_every=2",
             "badam.switch_mode=ascending", "lora.init=random")
    assert cli.main(train_args(llama_dir, chat_file, tmp_path / "straight", *extra)) == 0
    out = tmp_path / "straight"
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    switches = [(r["step"], r["block"]) for r in records if r["kind"] == "switch"]
    assert [s for s, _ in switches] == [0, 2, 4] and switches[0][1] != switches[1][1]
    # After 2 steps only block 0's adapters moved; after 4, block 1's too, and the others are still as initialised.
    start = load_file(str(out / "step-000002" / "adapter_model.safetensors"))
    end = load_file(str(out / "step-000004" / "adapter_model.safetensors"))
    block0, block1 = switches[0][1], switches[1][1]
    assert any(block0 in k for k in end) and any(block1 in k for k in end)
    for name in end:
        moved = not torch.equal(start[name], end[name])
        assert moved == (block1 in name), name  # steps 3-4 trained block 1 only

    assert cli.main(train_args(llama_dir, chat_file, tmp_path / "stopped", *extra)) == 0
    shutil.rmtree(tmp_path / "stopped" / "step-000004")
    assert cli.main(train_args(llama_dir, chat_file, tmp_path / "stopped", *extra)) == 0
    assert losses(tmp_path / "stopped") == losses(out)


def test_badam_keys_with_lora_need_lora_badam(llama_dir, chat_file, tmp_path, capsys):
    assert cli.main(train_args(llama_dir, chat_file, tmp_path / "o", "badam.switch_every=2")) == 2
    assert "badam.* keys apply to method=lora only with lora.badam=true" in capsys.readouterr().err
