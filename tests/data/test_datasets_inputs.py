"""Data beyond JSONL: parquet / Arrow / save_to_disk / parquet-shard folders through `datasets`, ShareGPT
conversations, role maps, several files mixed by weight, and the tokenized-data cache."""

import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch

# one_torch_thread is an autouse fixture: importing it applies it to every test here.
from tests.tiny_hf import one_torch_thread, tiny_tokenizer  # noqa: F401

from slimtune.config import TrainConfig, make_config  # noqa: E402
from slimtune.data import classify, instruct  # noqa: E402
from slimtune.data import records as data_records  # noqa: E402
from slimtune.data.batches import ConcatExamples, InstructionBatches, MixedBatches  # noqa: E402
from slimtune.data.cache import TokenCache  # noqa: E402
from slimtune.data.classify import read_classification_samples  # noqa: E402
from slimtune.data.examples import Example  # noqa: E402
from slimtune.data.instruct import data_sources, load_instruction_data  # noqa: E402
from slimtune.data.records import read_samples  # noqa: E402
from slimtune.errors import SlimtuneError  # noqa: E402

datasets = pytest.importorskip("datasets")

CHATS = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"say {w}"},
                       {"role": "assistant", "content": w}]} for w in "apple river stone cloud tree".split()]
ALPACA = [{"instruction": f"say {w}", "input": "", "output": w} for w in "one two three four".split()]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def as_files(records, tmp_path) -> dict:
    """The same records as JSONL, parquet, Arrow, a save_to_disk folder and a folder of two parquet shards."""
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "shards").mkdir()
    ds.select(range(2)).to_parquet(str(tmp_path / "shards" / "part-0.parquet"))
    ds.select(range(2, len(ds))).to_parquet(str(tmp_path / "shards" / "part-1.parquet"))
    return {"jsonl": write_jsonl(tmp_path / "d.jsonl", records), "parquet": tmp_path / "d.parquet",
            "arrow": next((tmp_path / "saved").glob("*.arrow")), "saved": tmp_path / "saved",
            "shards": tmp_path / "shards"}


def test_parquet_arrow_and_dataset_folders_read_like_jsonl(tmp_path, tok):
    for records in (CHATS, ALPACA):
        folder = tmp_path / str(len(records))
        folder.mkdir()
        files = as_files(records, folder)
        expected = [s.messages for s in read_samples(files.pop("jsonl"))]
        for kind, path in files.items():
            assert [s.messages for s in read_samples(path, cache_dir=tmp_path / "hf")] == expected, kind


def test_a_parquet_file_without_the_needed_columns_lists_the_columns_found(tmp_path):
    datasets.Dataset.from_list([{"question": "q", "reply": "a"}]).to_parquet(str(tmp_path / "q.parquet"))
    with pytest.raises(SlimtuneError, match=r"q.parquet: cannot tell the data format from its columns \('question', "
                                            r"'reply'\)"):
        read_samples(tmp_path / "q.parquet")
    with pytest.raises(SlimtuneError, match=r"no 'answer' column for the alpaca format; columns found: 'question', "
                                            r"'reply'\. Map other names with dataset.column_map"):
        read_samples(tmp_path / "q.parquet", column_map={"instruction": "question", "output": "answer"})
    assert read_samples(tmp_path / "q.parquet", column_map={"instruction": "question", "output": "reply"})


def test_classification_rows_from_parquet(tmp_path):
    rows = [{"text": t, "label": label} for t, label in [("good film", "pos"), ("awful plot", "neg")] * 3]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    samples = read_classification_samples(tmp_path / "c.parquet")
    assert [(s.text, s.label) for s in samples] == [(r["text"], r["label"]) for r in rows]
    datasets.Dataset.from_list([{"text": "x"}]).to_parquet(str(tmp_path / "nolabel.parquet"))
    with pytest.raises(SlimtuneError, match="no 'label' column for the classification format; columns found: 'text'"):
        read_classification_samples(tmp_path / "nolabel.parquet")


def test_data_is_a_path_or_a_list_of_them():
    assert make_config(TrainConfig, overrides=["model=m", "data=a.parquet"]).data == "a.parquet"
    assert make_config(TrainConfig, overrides=["model=m", "data=[a.jsonl,b.parquet]"]).data == ["a.jsonl", "b.parquet"]
    with pytest.raises(SlimtuneError, match="data must be str or list, got True"):
        make_config(TrainConfig, overrides=["model=m", "data=true"])


def test_unreadable_inputs_and_a_missing_datasets_library_are_errors(tmp_path, monkeypatch):
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(SlimtuneError, match="bad.parquet: cannot be read as a dataset"):
        read_samples(tmp_path / "bad.parquet", cache_dir=tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimtuneError, match="holds no .parquet files and was not written by Dataset.save_to_disk"):
        read_samples(tmp_path / "empty")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(SlimtuneError, match=r"needs the datasets library: pip install 'slimtune\[datasets\]'"):
        read_samples(tmp_path / "bad.parquet")


def test_sharegpt_conversations_are_detected_with_their_role_names(tmp_path):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c["messages"]]}
             for c in CHATS]
    expected = [s.messages for s in read_samples(write_jsonl(tmp_path / "chat.jsonl", CHATS))]
    assert [s.messages for s in read_samples(write_jsonl(tmp_path / "share.jsonl", share))] == expected
    # Variants: user/assistant, chatgpt/bot/model, and role/content fields inside `conversations`.
    variant = [{"conversations": [{"from": "user", "value": "hi"}, {"from": "chatgpt", "value": "yo"},
                                  {"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}]
    assert [m["role"] for m in read_samples(write_jsonl(tmp_path / "v.jsonl", variant))[0].messages] == [
        "user", "assistant"] * 2
    inner = [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    assert read_samples(write_jsonl(tmp_path / "i.jsonl", inner))[0].messages[1] == {"role": "assistant",
                                                                                    "content": "yo"}


def test_a_role_map_names_other_roles(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"conversations": [{"from": "asker", "value": "hi"},
                                                                  {"from": "helper", "value": "yo"}]}])
    with pytest.raises(SlimtuneError, match=r"message 1: unknown role 'asker'.*dataset.role_map.asker=assistant"):
        read_samples(path)
    samples = read_samples(path, role_map={"asker": "user", "helper": "assistant"})
    assert [m["role"] for m in samples[0].messages] == ["user", "assistant"]
    with pytest.raises(SlimtuneError, match="dataset.role_map.helper='robot' is not a role"):
        read_samples(path, role_map={"helper": "robot"})


def test_data_entries_carry_their_own_maps():
    sources = data_sources(["a.jsonl", {"path": "b.parquet", "column_map": {"output": "answer"}}],
                           {"instruction": "q"}, {})
    assert [(s.path, s.column_map) for s in sources] == [("a.jsonl", {"instruction": "q"}),
                                                         ("b.parquet", {"instruction": "q", "output": "answer"})]
    with pytest.raises(SlimtuneError, match=r"data entry 2 \(b.parquet\): unknown field\(s\) weight"):
        data_sources(["a.jsonl", {"path": "b.parquet", "weight": 2}], {}, {})
    with pytest.raises(SlimtuneError, match="data entry 1 .* must be a path"):
        data_sources([3], {}, {})


# --- the tokenized cache ---------------------------------------------------------------------------------------


def test_the_second_load_reads_the_cache_instead_of_tokenizing(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", CHATS * 4)
    cache = TokenCache(tmp_path / "cache")
    train, val = load_instruction_data(path, tok, 64, val_fraction=0.25, seed=1, cache=cache)
    assert train.cached_in is None and len(list((tmp_path / "cache").iterdir())) == 2

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(instruct, "tokenize_samples", refuse)
    monkeypatch.setattr(instruct, "iter_samples", refuse)
    monkeypatch.setattr(instruct, "count_records", refuse)
    train2, val2 = load_instruction_data(path, tok, 64, val_fraction=0.25, seed=1, cache=cache)
    assert train2.cached_in is not None and train2.stats == train.stats
    for a, b in ((train, train2), (val, val2)):
        assert [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b]
    # Another max_seq_len (or tokenizer, template, file, split) is another entry: it tokenizes.
    with pytest.raises(AssertionError, match="tokenized again"):
        load_instruction_data(path, tok, 63, val_fraction=0.25, seed=1, cache=cache)
    # A dry run's read-only cache reads entries and writes none.
    monkeypatch.undo()
    load_instruction_data(path, tok, 63, cache=TokenCache(tmp_path / "cache", write=False))
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_records_stream_into_compact_arrays_never_a_list(tmp_path, tok, monkeypatch):
    """Training data goes record by record from the file through the split into int32 arrays: neither the records
    nor the examples are ever gathered in a Python list (read_samples, the list reader, is not called)."""
    from slimtune.data.cache import TokenArrays
    from slimtune.data.examples import PackedExamples

    records = [{"instruction": f"say {i}", "input": "", "output": "word " * (i % 5 + 1)} for i in range(200)]
    path = write_jsonl(tmp_path / "big.jsonl", records)
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "big.parquet"))
    listed = {}
    for kind, source in (("jsonl", path), ("parquet", tmp_path / "big.parquet")):
        monkeypatch.setattr(data_records, "read_samples", lambda *a, **k: (_ for _ in ()).throw(AssertionError("list")))
        for cache in (None, TokenCache(tmp_path / f"cache-{kind}")):
            train, val = load_instruction_data(source, tok, 64, val_fraction=0.1, seed=2, cache=cache,
                                               pack=True)
            assert isinstance(train.examples, PackedExamples) and isinstance(train.examples.examples, TokenArrays)
            assert train.examples.examples.input_ids.dtype == np.int32
            assert train.stats.records == 180 and val.stats.records == 20
            listed[kind, cache is None] = [(e.input_ids, e.labels, e.position_ids) for e in train]
        monkeypatch.undo()
    assert len(set(map(str, listed.values()))) == 1  # jsonl = parquet, cached = not cached
    # The packs hold the same tokens as packing the unpacked examples one by one.
    plain, _ = load_instruction_data(path, tok, 64, val_fraction=0.1, seed=2)
    assert [i for e in listed["jsonl", True] for i in e[0]] == [i for e in plain for i in e.input_ids]
    assert train.num_tokens() == plain.num_tokens() == sum(len(e.input_ids) for e in plain)


def test_validation_mask_is_deterministic_and_sized():
    from slimtune.data.records import validation_mask

    a, b = validation_mask(1000, 0.05, seed=7), validation_mask(1000, 0.05, seed=7)
    assert a.dtype == bool and a.sum() == 50 and (a == b).all()
    assert (validation_mask(1000, 0.05, seed=8) != a).any()
    assert validation_mask(3, 0.01, seed=0).sum() == 1 and validation_mask(10, 0.0, seed=0) is None
    with pytest.raises(SlimtuneError, match="leaves nothing to train on"):
        validation_mask(1, 0.5, seed=0)


def test_classification_data_is_cached_with_its_label_ids(tmp_path, monkeypatch):
    from slimtune.data.classify import load_classification_data

    cls_tok = tiny_tokenizer(None, pair_template=True)
    rows = [{"text": f"text {i}", "label": ("good", "bad", "meh")[i % 3]} for i in range(30)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cache = TokenCache(tmp_path / "cache")
    train, val, label2id = load_classification_data(path, cls_tok, 16, val_fraction=0.2, seed=1, cache=cache)
    assert label2id == {"bad": 0, "good": 1, "meh": 2} and len(train) == 24 and len(val) == 6
    assert train.cached_in is None and len(list((tmp_path / "cache").iterdir())) == 2

    def refuse(*args, **kwargs):
        raise AssertionError("read again")

    monkeypatch.setattr(classify, "iter_classification_samples", refuse)
    monkeypatch.setattr(classify, "count_records", refuse)
    train2, val2, label2id2 = load_classification_data(path, cls_tok, 16, val_fraction=0.2, seed=1, cache=cache)
    assert train2.cached_in is not None and label2id2 == label2id
    for a, b in ((train, train2), (val, val2)):
        assert [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b]
    assert all(isinstance(e.labels, int) for e in train2)


# --- mixing several datasets -----------------------------------------------------------------------------------


def numbered(n: int, offset: int) -> list[Example]:
    return [Example([offset + i, 1], [-100, 1]) for i in range(n)]


def test_mixed_batches_follow_the_weights_deterministically_and_resume_exactly():
    a, b = numbered(10, 1000), numbered(50, 2000)

    def source_of(batch):
        return [int(t) // 1000 for t in batch["input_ids"][:, 0]]

    mix = MixedBatches([a, b], [0.8, 0.2], batch_size=8, seed=3, pad_id=0)
    counts = Counter(s for _ in range(100) for s in source_of(mix.next_batch()))
    assert 0.75 < counts[1] / 800 < 0.85  # the small file is drawn 8x its share of examples: it repeats
    assert len(mix) == 8  # an epoch of the mix: as many examples as both files hold (60 / 8, rounded up)

    first = MixedBatches([a, b], [0.8, 0.2], batch_size=8, seed=3, pad_id=0)
    for _ in range(7):
        first.next_batch()
    state = first.state_dict()
    later = [first.next_batch()["input_ids"] for _ in range(5)]
    resumed = MixedBatches([a, b], [0.8, 0.2], batch_size=8, seed=3, pad_id=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.next_batch()["input_ids"]) for x in later)
    # Within one file's epoch every example comes once.
    only_a = MixedBatches([a, b], [1, 0], batch_size=4, seed=0, pad_id=0)
    drawn = [int(t) for _ in range(3) for t in only_a.next_batch()["input_ids"][:, 0]]
    assert len(set(drawn[:10])) == 10
    with pytest.raises(SlimtuneError, match="cannot resume the data order"):
        MixedBatches([a, b], [0.5, 0.5], batch_size=8, seed=3, pad_id=0).load_state_dict(state)
    with pytest.raises(SlimtuneError, match="cannot resume the data order"):
        InstructionBatches(a, 8, 3, 0).load_state_dict(state)


def test_mixed_ranks_take_their_slices_of_the_same_global_batch():
    a, b = numbered(10, 1000), numbered(30, 2000)
    whole = MixedBatches([a, b], [1, 1], batch_size=4, seed=0, pad_id=0)
    ranks = [MixedBatches([a, b], [1, 1], batch_size=2, seed=0, pad_id=0, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(6):
        assert torch.equal(whole.next_batch()["input_ids"],
                           torch.cat([r.next_batch()["input_ids"] for r in ranks]))


def test_concatenated_files_read_as_one():
    joined = ConcatExamples([numbered(3, 0), numbered(2, 10)])
    assert len(joined) == 5 and [e.input_ids[0] for e in joined] == [0, 1, 2, 10, 11]
    with pytest.raises(IndexError):
        joined[5]
    assert np.all(np.diff(joined.starts) >= 0)
