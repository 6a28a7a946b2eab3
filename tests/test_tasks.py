"""The demo task: generated examples and exact-match scoring."""

import json

import pytest

from slimtune.tasks import (PROMPT, WORDS, TaskExample, accuracy, exact_match, make_examples, make_split,
                            normalize, to_chat_record, write_jsonl)


def test_examples_are_deterministic_distinct_and_correct():
    a, b = make_examples(200, seed=5), make_examples(200, seed=5)
    assert a == b and a != make_examples(200, seed=6)
    assert len({e.prompt for e in a}) == 200
    prefix = PROMPT.format(words="")
    for e in a:
        words = e.prompt[len(prefix):].split()
        assert e.prompt.startswith(prefix) and 3 <= len(words) <= 5 and len(set(words)) == len(words)
        assert set(words) <= set(WORDS) and e.answer.split() == words[::-1]


def test_split_has_no_overlap():
    train, test = make_split(300, 30, seed=0)
    assert len(train) == 300 and len(test) == 30
    assert not {e.prompt for e in train} & {e.prompt for e in test}


def test_exact_match_normalises_whitespace_only():
    assert exact_match("  garden  candle\npiano tiger ", "garden candle piano tiger")
    assert not exact_match("Garden candle piano tiger", "garden candle piano tiger")
    assert not exact_match("garden, candle, piano, tiger", "garden candle piano tiger")
    assert normalize("\ta \n b ") == "a b"
    assert accuracy(["a b", "x"], ["a  b", "y"]) == 0.5
    with pytest.raises(ValueError):
        accuracy(["a"], [])


def test_chat_records_read_back_as_instruction_data(tmp_path):
    from slimtune.data.records import read_samples

    ex = TaskExample("Reverse the order of these words: a b c", "c b a")
    assert to_chat_record(ex)["messages"][1] == {"role": "assistant", "content": "c b a"}
    path = write_jsonl([ex, ex], tmp_path / "d" / "task.jsonl")
    assert json.loads(path.read_text().splitlines()[0]) == to_chat_record(ex)
    assert read_samples(path)[0].messages == to_chat_record(ex)["messages"]
