"""Instruction / chat / text / classification data: reading, masking, truncation, packing, splits, batches."""

import json
import logging

import pytest
import torch

# one_torch_thread is an autouse fixture: importing it applies it to every test here.
from tests.tiny_hf import one_torch_thread, tiny_llama, tiny_tokenizer  # noqa: F401

from slimtune.data.batches import InstructionBatches, eval_batches  # noqa: E402
from slimtune.data.classify import load_classification_data  # noqa: E402
from slimtune.data.examples import IGNORE_INDEX  # noqa: E402
from slimtune.data.instruct import load_instruction_data, tokenize_samples  # noqa: E402
from slimtune.data.records import Sample, read_samples  # noqa: E402
from slimtune.data.templates import CHAT_TEMPLATES, encode_chat, render_chat, resolve_chat_template  # noqa: E402
from slimtune.errors import SlimtuneError  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tok_no_template():
    return tiny_tokenizer(chat_template=None)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(user, reply, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def decode_labelled(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


# --- chat templates and masking --------------------------------------------------------------------------------


def test_single_turn_labels_cover_exactly_the_reply_and_end_marker(tok):
    messages = [{"role": "user", "content": "sort 12 5"}, {"role": "assistant", "content": "5 12"}]
    ids, labels, merges = encode_chat(tok, messages)
    prompt = tok(render_chat(tok, messages[:1], add_generation_prompt=True), add_special_tokens=False).input_ids
    reply = tok("5 12<|im_end|>\n", add_special_tokens=False).input_ids
    assert merges == 0
    assert ids == prompt + reply
    assert labels == [IGNORE_INDEX] * len(prompt) + reply


def test_multi_turn_masks_every_non_assistant_span(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "world"}, {"role": "user", "content": "apple river"},
                {"role": "assistant", "content": "river apple"}]
    ids, labels, _ = encode_chat(tok, messages)
    assert decode_labelled(tok, ids, labels) == "world<|im_end|>\nriver apple<|im_end|>\n"
    # Positions: the labelled tokens are exactly the two assistant spans, in place.
    text = render_chat(tok, messages)
    assert tok.decode(ids) == text
    first_start = len(tok(render_chat(tok, messages[:2], add_generation_prompt=True),
                          add_special_tokens=False).input_ids)
    first_end = len(tok(render_chat(tok, messages[:3]), add_special_tokens=False).input_ids)
    labelled = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert labelled[: first_end - first_start] == list(range(first_start, first_end))
    assert all(labels[i] == ids[i] for i in labelled)


def test_boundary_merge_is_counted_and_treated_as_prompt():
    # The prompt ends in a space and the reply starts with a word: byte-level BPE tokenizes " world" as one token
    # ("Ġwor..."), so the prompt's last token ("Ġ") is not a prefix token of the full conversation.
    tok = tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    messages = [{"role": "user", "content": "say "}, {"role": "assistant", "content": "world"}]
    ids, labels, merges = encode_chat(tok, messages)
    assert tok.convert_ids_to_tokens(tok("say ").input_ids)[-1] == "Ġ"
    assert merges == 1
    assert tok.decode(ids) == "say world"
    start = len(tok("say").input_ids)  # the merged token " wor" holds reply text: it is learned as the reply's start
    assert tok.convert_ids_to_tokens(ids[start]) == "Ġwor"
    assert labels == [IGNORE_INDEX] * start + ids[start:]


def test_fallback_templates_render_and_end_replies_with_eos(tok_no_template):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for name in CHAT_TEMPLATES:
        ids, labels, _ = encode_chat(tok_no_template, messages, template=name)
        reply = decode_labelled(tok_no_template, ids, labels)
        assert reply.startswith("yo") and "<eos>" in reply, (name, reply)
    assert render_chat(tok_no_template, messages, "alpaca") == "### Instruction:\nhi\n\n### Response:\nyo<eos>\n\n"


def test_no_chat_template_and_none_chosen_lists_the_names(tok_no_template):
    with pytest.raises(SlimtuneError, match="no chat template.*chatml, alpaca"):
        resolve_chat_template(tok_no_template)
    with pytest.raises(SlimtuneError, match="unknown chat template 'vicuna'"):
        resolve_chat_template(tok_no_template, "vicuna")


def test_no_chat_template_error_from_loading_a_file(tmp_path, tok_no_template):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b")])
    with pytest.raises(SlimtuneError, match=r"dataset.chat_template=NAME for train, --chat-template NAME for "
                                             r"chat/generate/eval\), one of: chatml, alpaca"):
        load_instruction_data(path, tok_no_template, max_seq_len=64)
    train, _ = load_instruction_data(path, tok_no_template, max_seq_len=64, template="chatml")
    assert len(train) == 1


# --- readers ---------------------------------------------------------------------------------------------------


def test_alpaca_json_list_and_jsonl_give_the_same_examples(tmp_path, tok):
    records = [{"instruction": "reverse", "input": "a b", "output": "b a"}, {"instruction": "say hi", "output": "hi"}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    write_jsonl(tmp_path / "d.jsonl", records)
    a, _ = load_instruction_data(tmp_path / "d.json", tok, max_seq_len=64)
    b, _ = load_instruction_data(tmp_path / "d.jsonl", tok, max_seq_len=64)
    assert [e.input_ids for e in a] == [e.input_ids for e in b]
    samples = read_samples(tmp_path / "d.jsonl")
    assert samples[0].messages[0] == {"role": "user", "content": "reverse\n\na b"}
    assert samples[1].messages[0] == {"role": "user", "content": "say hi"}  # missing input is optional


def test_column_map_renames_fields(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    samples = read_samples(path, column_map={"instruction": "question", "output": "answer"})
    assert samples[0].messages[-1] == {"role": "assistant", "content": "4"}
    share = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                   {"from": "gpt", "value": "yo"}]}])
    samples = read_samples(share, column_map={"messages": "conversations", "role": "from", "content": "value"})
    assert samples[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(SlimtuneError, match="did you mean 'instruction'"):
        read_samples(path, column_map={"instructions": "question"})


def test_invalid_json_line_names_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(chat("a", "b")) + "\n\n" + '{"messages": [}\n')
    with pytest.raises(SlimtuneError, match=r"bad\.jsonl:3: line 3 is not valid JSON"):
        load_instruction_data(path, tok, max_seq_len=64)


def test_invalid_json_list_file_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{oops}\n]')
    with pytest.raises(SlimtuneError, match=r"bad\.json:3: not valid JSON"):
        read_samples(path)


def test_missing_required_field_names_field_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(SlimtuneError, match=r"d\.jsonl:2: record has no 'output' field"):
        load_instruction_data(path, tok, max_seq_len=64)
    mapped = write_jsonl(tmp_path / "m.jsonl", [{"question": "a"}])
    with pytest.raises(SlimtuneError, match=r"m\.jsonl:1: record has no 'answer' field \(mapped from 'output'"):
        read_samples(mapped, column_map={"instruction": "question", "output": "answer"})


def test_chat_record_problems_are_reported_with_location(tmp_path):
    bad_role = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "wizard", "content": "x"}]}])
    with pytest.raises(SlimtuneError, match=r"r\.jsonl:1 message 1: unknown role 'wizard'"):
        read_samples(bad_role)
    no_reply = write_jsonl(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(SlimtuneError, match=r"n\.jsonl:1: the conversation has no assistant message"):
        read_samples(no_reply)
    no_content = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(SlimtuneError, match=r"c\.jsonl:1 message 1: record has no 'content' field"):
        read_samples(no_content)
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(SlimtuneError, match=r"u\.jsonl:1: cannot tell the data format.*column_map"):
        read_samples(unknown)


def test_missing_file_is_reported(tmp_path, tok):
    with pytest.raises(SlimtuneError, match="does not exist"):
        load_instruction_data(tmp_path / "nope.jsonl", tok, max_seq_len=64)


def test_plain_text_is_learned_on_every_token_and_chunked(tmp_path, tok):
    path = tmp_path / "doc.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n\n\nhello world")
    train, _ = load_instruction_data(path, tok, max_seq_len=8, text_separator="\n\n\n")
    assert train.stats.chunked_documents == 1 and train.stats.truncated == 0
    assert all(len(e.input_ids) <= 8 for e in train)
    all_ids = [i for e in train for i in e.input_ids]
    assert tok.decode(all_ids).replace("<eos>", "|") == "the quick brown fox jumps over the lazy dog|hello world|"
    for e in train:  # every token but the first of each sequence is a target
        assert e.labels == [IGNORE_INDEX] + e.input_ids[1:]


def test_jsonl_text_records_are_plain_documents(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": "apple river"}])
    train, _ = load_instruction_data(path, tok, max_seq_len=64)
    assert [tok.decode(e.input_ids) for e in train] == ["hello world<eos>", "apple river<eos>"]
    assert all(e.labels == [IGNORE_INDEX] + e.input_ids[1:] for e in train)


# --- truncation and filtering ----------------------------------------------------------------------------------


def test_truncation_counts_warns_and_drops_only_reply_less_examples(tmp_path, tok, caplog):
    long_prompt = "apple river stone cloud " * 10
    records = [chat("hi", "yo"), chat("hi", "word " * 40), chat(long_prompt, "lost")]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with caplog.at_level(logging.WARNING):
        train, _ = load_instruction_data(path, tok, max_seq_len=24)
    assert train.stats.truncated == 2 and train.stats.dropped == 1 and len(train) == 2
    assert "2 of 3 examples were longer than max_seq_len=24" in caplog.text and "1 of them" in caplog.text
    assert all(len(e.input_ids) <= 24 for e in train)


def test_nothing_left_after_filtering_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("apple river stone cloud " * 10, "x")] * 3)
    with pytest.raises(SlimtuneError, match="no training examples left.*all 3 were dropped.*raise max_seq_len"):
        load_instruction_data(path, tok, max_seq_len=16)


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.json", "[]"), ("e.json", ""),
                                          ("blank.jsonl", "\n\n  \n")])
@pytest.mark.parametrize("val_fraction", [0.0, 0.05])
def test_file_without_records_says_so(tmp_path, tok, name, content, val_fraction):
    (tmp_path / name).write_text(content)
    # The message blames the file, never val_fraction.
    with pytest.raises(SlimtuneError, match=rf"{name}: the file has no records") as info:
        load_instruction_data(tmp_path / name, tok, max_seq_len=16, val_fraction=val_fraction)
    assert "val_fraction" not in str(info.value)
    cls_tok = tiny_tokenizer(None, pair_template=True)
    with pytest.raises(SlimtuneError, match=rf"{name}: the file has no records"):
        load_classification_data(tmp_path / name, cls_tok, max_seq_len=16, val_fraction=val_fraction)
    good = write_jsonl(tmp_path / "good.jsonl", [chat("a", "b")] * 3)
    with pytest.raises(SlimtuneError, match=rf"{name}: the file has no records"):  # an empty validation file too
        load_instruction_data(good, tok, max_seq_len=16, val_path=tmp_path / name)


def test_text_file_without_text_says_so(tmp_path, tok):
    (tmp_path / "e.txt").write_text(" \n\n")
    with pytest.raises(SlimtuneError, match=r"e\.txt: the file has no text"):
        load_instruction_data(tmp_path / "e.txt", tok, max_seq_len=16)


# --- packing, splits -------------------------------------------------------------------------------------------


def test_packing_keeps_labels_separate_and_resets_positions(tmp_path, tok):
    records = [chat(f"word {i}", "apple " * (i % 3 + 1)) for i in range(6)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    plain, _ = load_instruction_data(path, tok, max_seq_len=64)
    packed, _ = load_instruction_data(path, tok, max_seq_len=64, pack=True)
    assert len(packed) < len(plain) and packed.stats.packed_sequences == len(packed)
    assert [i for e in packed for i in e.input_ids] == [i for e in plain for i in e.input_ids]
    assert [lab for e in packed for lab in e.labels] == [lab for e in plain for lab in e.labels]
    for e in packed:
        assert len(e.input_ids) <= 64
        starts = [t for t, p in enumerate(e.position_ids) if p == 0]
        assert all(e.labels[t] == IGNORE_INDEX for t in starts)  # no target crosses an example boundary
    batch = next(iter(InstructionBatches(packed, 2, seed=0, pad_id=tok.pad_token_id)))
    assert batch["position_ids"].shape == batch["input_ids"].shape


def test_packed_batch_runs_through_a_model(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"word {i}", "apple") for i in range(4)])
    packed, _ = load_instruction_data(path, tok, max_seq_len=64, pack=True)
    model = tiny_llama(tok)
    batch = next(iter(InstructionBatches(packed, 2, seed=0, pad_id=tok.pad_token_id)))
    assert torch.isfinite(model(**batch).loss)


def test_val_fraction_split_is_deterministic_and_disjoint(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    train, val = load_instruction_data(path, tok, max_seq_len=64, val_fraction=0.2, seed=3)
    train2, val2 = load_instruction_data(path, tok, max_seq_len=64, val_fraction=0.2, seed=3)
    _, val3 = load_instruction_data(path, tok, max_seq_len=64, val_fraction=0.2, seed=4)
    assert len(train) == 16 and len(val) == 4
    key = lambda ds: [tuple(e.input_ids) for e in ds]  # noqa: E731
    assert key(val) == key(val2) and key(train) == key(train2)
    assert not set(key(train)) & set(key(val))
    assert key(val3) != key(val)


def test_separate_validation_file_and_bad_split_settings(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b")] * 3)
    vpath = write_jsonl(tmp_path / "v.jsonl", [chat("c", "d")])
    train, val = load_instruction_data(path, tok, max_seq_len=64, val_path=vpath)
    assert len(train) == 3 and len(val) == 1
    with pytest.raises(SlimtuneError, match="leaves nothing to train on"):
        load_instruction_data(vpath, tok, max_seq_len=64, val_fraction=0.5)


@pytest.mark.parametrize("val_fraction", [0.05, 0.5, 0.0])
def test_validation_file_replaces_the_split(tmp_path, tok, val_fraction):
    # val_data=FILE next to the default val_fraction: the file is the validation set, every record trains.
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    vpath = write_jsonl(tmp_path / "v.jsonl", [chat("c", "d"), chat("e", "f")])
    train, val = load_instruction_data(path, tok, max_seq_len=64, val_fraction=val_fraction, val_path=vpath)
    alone, _ = load_instruction_data(path, tok, max_seq_len=64)
    assert [e.input_ids for e in train] == [e.input_ids for e in alone]
    assert len(val) == 2
    cls_tok = tiny_tokenizer(None, pair_template=True)
    cpath = write_jsonl(tmp_path / "c.jsonl", [{"text": f"good {i}", "label": i % 2} for i in range(10)])
    cval = write_jsonl(tmp_path / "cv.jsonl", [{"text": "bad", "label": 0}])
    train, val, _ = load_classification_data(cpath, cls_tok, max_seq_len=16, val_fraction=val_fraction,
                                             val_path=cval)
    assert len(train) == 10 and len(val) == 1


# --- batches ---------------------------------------------------------------------------------------------------


def _dataset(tok, n=10):
    samples = [Sample(f"s{i}", messages=chat(f"q {i}", "x " * (i % 4 + 1))["messages"]) for i in range(n)]
    return tokenize_samples(samples, tok, max_seq_len=64)


def test_batches_are_right_padded_long_tensors(tok):
    ds = _dataset(tok)
    batch = InstructionBatches(ds, 4, seed=0, pad_id=tok.pad_token_id, shuffle=False).next_batch()
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == batch["input_ids"].shape for t in batch.values())
    lengths = [len(ds[i].input_ids) for i in range(4)]
    assert batch["input_ids"].shape[1] == max(lengths)
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["input_ids"][row, :n].tolist() == ds[row].input_ids
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_each_epoch_visits_every_example_once_in_a_new_order(tok):
    ds = _dataset(tok, 10)
    it = InstructionBatches(ds, 3, seed=1, pad_id=tok.pad_token_id)
    assert len(it) == 4  # 3 + 3 + 3 + 1
    epochs = []
    for _ in range(2):
        rows = [tuple(r[m.bool()].tolist()) for _ in range(4) for b in [it.next_batch()]
                for r, m in zip(b["input_ids"], b["attention_mask"])]
        epochs.append(rows)
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(tuple(e.input_ids) for e in ds)
    assert epochs[0] != epochs[1]
    assert it.epoch == 1 and it.position == 10


def test_resume_mid_epoch_gives_exactly_the_same_batches(tok):
    ds = _dataset(tok, 10)
    reference = InstructionBatches(ds, 3, seed=7, pad_id=tok.pad_token_id)
    expected = [reference.next_batch() for _ in range(9)]
    first = InstructionBatches(ds, 3, seed=7, pad_id=tok.pad_token_id)
    for _ in range(5):  # stop inside the second epoch
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip as plain data
    resumed = InstructionBatches(ds, 3, seed=999, pad_id=tok.pad_token_id)  # seed comes from the state
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_on_different_data_is_refused(tok):
    state = InstructionBatches(_dataset(tok, 10), 3, seed=0, pad_id=0).state_dict()
    with pytest.raises(SlimtuneError, match="checkpoint was taken on 10 examples, the data now has 9"):
        InstructionBatches(_dataset(tok, 9), 3, seed=0, pad_id=0).load_state_dict(state)


def test_ranks_split_each_global_batch(tok):
    ds = _dataset(tok, 10)
    ranks = [InstructionBatches(ds, 2, seed=0, pad_id=0, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == 2  # 10 // 4, the incomplete tail is skipped
    seen = []
    for _ in range(2):
        for it in ranks:
            b = it.next_batch()
            seen += [tuple(r[m.bool()].tolist()) for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert len(set(seen)) == 8


def test_eval_batches_cover_the_dataset_in_order(tok):
    ds = _dataset(tok, 5)
    batches = list(eval_batches(ds, 2, pad_id=0))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[2]["input_ids"][0].tolist() == ds[4].input_ids


# --- classification --------------------------------------------------------------------------------------------


def test_classification_string_labels_are_mapped_deterministically(tmp_path):
    tok = tiny_tokenizer(None, pair_template=True)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "good film", "label": "pos"}, {"text": "bad", "label": "neg"},
                                             {"text": "fine", "text_pair": "great", "label": "pos"}])
    train, val, label2id = load_classification_data(path, tok, max_seq_len=32)
    assert label2id == {"neg": 0, "pos": 1} and val is None
    assert [e.labels for e in train] == [1, 0, 1]
    assert train[2].input_ids == tok("fine", "great").input_ids
    batch = InstructionBatches(train, 3, seed=0, pad_id=tok.pad_token_id, shuffle=False).next_batch()
    assert batch["labels"].tolist() == [1, 0, 1] and batch["labels"].shape == (3,)


def test_classification_int_labels_truncation_and_errors(tmp_path, caplog):
    tok = tiny_tokenizer(None, pair_template=True)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "good " * 30, "label": 1}, {"text": "bad", "label": 0}])
    with caplog.at_level(logging.WARNING):
        train, _, label2id = load_classification_data(path, tok, max_seq_len=8)
    assert label2id == {"0": 0, "1": 1} and train.stats.truncated == 1 and len(train[0].input_ids) == 8
    assert "1 of 2 texts were longer than max_seq_len=8" in caplog.text
    missing = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": 0}, {"text": "b"}])
    with pytest.raises(SlimtuneError, match=r"m\.jsonl:2: record has no 'label' field"):
        load_classification_data(missing, tok, max_seq_len=8)
    mixed = write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "pos"}])
    with pytest.raises(SlimtuneError, match="labels mix integers"):
        load_classification_data(mixed, tok, max_seq_len=8)
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "a", "label": "meh"}])
    strs = write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": "pos"}])
    with pytest.raises(SlimtuneError, match=r"v\.jsonl:1: label 'meh' does not occur in the training data"):
        load_classification_data(strs, tok, max_seq_len=8, val_path=val)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a", "label": 0}\nnot json\n')
    with pytest.raises(SlimtuneError, match=r"b\.jsonl:2: line 2 is not valid JSON"):
        load_classification_data(bad, tok, max_seq_len=8)
