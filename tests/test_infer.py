"""Generation, streaming chat and JSONL generation on a tiny random Llama."""

import io
import json

import pytest
import torch

# one_torch_thread is an autouse fixture: importing it applies it to every test here.
from tests.tiny_hf import one_torch_thread, tiny_llama, tiny_tokenizer  # noqa: F401

from slimtune.errors import SlimtuneError  # noqa: E402
from slimtune.infer import chat_loop, generate, generate_jsonl, stream_reply  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


def test_greedy_generation_is_deterministic_and_batch_independent(model, tok):
    prompts = ["hello world", "sort these numbers: 12 5 40 7", "reverse"]
    one_by_one = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert batched == one_by_one
    assert all(isinstance(o, str) for o in batched)


def test_generation_uses_the_chat_template(model, tok):
    seen = []
    real = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return real(**kwargs)

    model.generate = spy
    try:
        generate(model, tok, ["hi"], max_new_tokens=2)
        generate(model, tok, ["hi"], max_new_tokens=2, chat=False)
    finally:
        del model.generate
    assert tok.decode(seen[0]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(seen[1]) == "hi"


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model, tok):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, tok, ["hello"], max_new_tokens=8, temperature=1.5, top_k=20, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tok, ["hello"], max_new_tokens=8, temperature=1.5, top_k=20, seed=1)
    others = {generate(model, tok, ["hello"], max_new_tokens=8, temperature=1.5, seed=s)[0] for s in range(2, 6)}
    assert a == b and len(others | set(a)) > 1


def test_generation_restores_training_mode(model, tok):
    model.train()
    generate(model, tok, ["hi"], max_new_tokens=1)
    assert model.training
    model.eval()


def test_bad_generation_settings(model, tok):
    with pytest.raises(SlimtuneError, match="temperature must be >= 0"):
        generate(model, tok, ["hi"], max_new_tokens=1, temperature=-1)
    with pytest.raises(SlimtuneError, match="max_new_tokens must be at least 1"):
        generate(model, tok, ["hi"], max_new_tokens=0)
    with pytest.raises(SlimtuneError, match="no chat template"):
        generate(model, tiny_tokenizer(chat_template=None), ["hi"], max_new_tokens=1)


def test_stream_reply_writes_what_it_returns(model, tok):
    out = io.StringIO()
    reply = stream_reply(model, tok, [{"role": "user", "content": "hello"}], out=out, max_new_tokens=8, temperature=0)
    assert reply == generate(model, tok, ["hello"], max_new_tokens=8)[0]
    assert out.getvalue().strip() == reply


def test_chat_loop_keeps_history_until_exit(model, tok):
    out = io.StringIO()
    lines = io.StringIO("hello\n\nsort 12 5\n/exit\nnever read\n")
    history = chat_loop(model, tok, input=lines, out=out, max_new_tokens=4, temperature=0,
                        system_prompt="be brief")
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[1]["content"] == "hello" and history[3]["content"] == "sort 12 5"
    assert out.getvalue().count("assistant: ") == 2


def test_chat_loop_reset_and_context_limit(model, tok):
    history = chat_loop(model, tok, input=["hello\n", "/reset\n", "world\n"], out=io.StringIO(), max_new_tokens=4,
                        temperature=0)
    assert [m["content"] for m in history if m["role"] == "user"] == ["world"]
    # A context of 60 tokens holds only the newest exchange or two: old turns are dropped, the newest never.
    history = chat_loop(model, tok, input=[f"apple river stone {i}\n" for i in range(6)], out=io.StringIO(),
                        max_new_tokens=4, temperature=0, max_context=60)
    assert history[-2]["content"] == "apple river stone 5" and len(history) < 12


def test_generate_jsonl_round_trip_and_errors(model, tok, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "hello", "id": 7}) + "\n" + json.dumps({"prompt": "world"}) + "\n")
    n = generate_jsonl(src, tmp_path / "out" / "o.jsonl", model, tok, max_new_tokens=4)
    rows = [json.loads(line) for line in (tmp_path / "out" / "o.jsonl").read_text().splitlines()]
    assert n == 2 and [r["prompt"] for r in rows] == ["hello", "world"] and rows[0]["id"] == 7
    assert [r["output"] for r in rows] == generate(model, tok, ["hello", "world"], max_new_tokens=4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n{nope\n")
    with pytest.raises(SlimtuneError, match=r"bad\.jsonl:2: line 2 is not valid JSON"):
        generate_jsonl(bad, tmp_path / "x.jsonl", model, tok)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(SlimtuneError, match=r"missing\.jsonl:1: record has no 'prompt' field"):
        generate_jsonl(missing, tmp_path / "x.jsonl", model, tok)
    assert not (tmp_path / "x.jsonl").exists()


def test_generation_stops_at_every_configured_eos(model, tok):
    from slimtune.infer import _stop_ids

    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    try:
        assert _stop_ids(model, tok) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert _stop_ids(model, tok) == [tok.eos_token_id]
