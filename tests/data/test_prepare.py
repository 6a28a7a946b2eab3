import json

import numpy as np
import pytest

from slimtune.data.prepare import prepare, read_meta, small_split_warnings, token_dtype
from slimtune.data.tokenizer import load_tokenizer
from slimtune.errors import SlimtuneError


def test_char_prepare_round_trip(tmp_path):
    text = "hello world\nthe quick brown fox\n" * 50
    (tmp_path / "a.txt").write_text(text)
    meta = prepare([tmp_path / "a.txt"], tmp_path / "d", progress=False)
    d = tmp_path / "d"
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert meta == json.loads((d / "meta.json").read_text())
    assert meta["vocab_size"] == len(set(text)) and meta["dtype"] == "uint16"
    train = np.fromfile(d / "train.bin", dtype=np.uint16)
    val = np.fromfile(d / "val.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert len(train) + len(val) == len(text) and len(val) == int(len(text) * 0.1)
    tok = load_tokenizer(read_meta(d), d)
    assert tok.decode(np.concatenate([train, val]).tolist()) == text


def test_multiple_files_and_chunk_boundaries(tmp_path, monkeypatch):
    import slimtune.data.prepare as prep

    monkeypatch.setattr(prep, "CHUNK_BYTES", 7)  # force many chunks, split inside multi-byte characters
    texts = ["héllo wörld ✓\nline two\n", "ünïcode ∑ more\nend"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    prepare([tmp_path / "0.txt", tmp_path / "1.txt"], tmp_path / "d", progress=False, val_fraction=0.2)
    meta = read_meta(tmp_path / "d")
    ids = np.concatenate([np.fromfile(tmp_path / "d" / f, dtype=np.uint16) for f in ("train.bin", "val.bin")])
    assert load_tokenizer(meta, tmp_path / "d").decode(ids.tolist()) == "".join(texts)


def test_non_utf8_names_byte_offset_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nna\xefve caf\xe9\n".encode("latin-1"))
    with pytest.raises(SlimtuneError, match=r"latin1.txt: not valid UTF-8 at byte offset 13 \(line 2\)"):
        prepare([path], tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()  # nothing half-written


def test_non_utf8_offset_across_chunks(tmp_path, monkeypatch):
    import slimtune.data.prepare as prep

    monkeypatch.setattr(prep, "CHUNK_BYTES", 5)
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc\ndefgh\nij\xffk\n")
    with pytest.raises(SlimtuneError, match=r"byte offset 12 \(line 3\)"):
        prepare([path], tmp_path / "d", progress=False)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(SlimtuneError, match=r"input file .*nope.txt does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "d", progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SlimtuneError, match="contain no text"):
        prepare([tmp_path / "empty.txt"], tmp_path / "d", progress=False)
    with pytest.raises(SlimtuneError, match="val_fraction"):
        prepare([tmp_path / "empty.txt"], tmp_path / "d", progress=False, val_fraction=1.5)


def test_token_dtype_by_vocab_size():
    assert token_dtype(65) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(151_936) == np.uint32


def test_read_meta_errors(tmp_path):
    with pytest.raises(SlimtuneError, match="does not exist; create it with `slimtune prepare"):
        read_meta(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(SlimtuneError, match="meta.json is missing"):
        read_meta(tmp_path / "d")


def test_hf_tokenizer_folder(tmp_path):
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = "the cat sat on the mat. the dog sat on the log.\n" * 40
    (tmp_path / "t.txt").write_text(text)
    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    tk.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tok")
    meta = prepare([tmp_path / "t.txt"], tmp_path / "d", tokenizer=str(tmp_path / "tok"), progress=False)
    assert meta["tokenizer"]["kind"] == "hf" and meta["dtype"] == "uint16"
    assert (tmp_path / "d" / "tokenizer" / "tokenizer.json").is_file()
    ids = np.concatenate([np.fromfile(tmp_path / "d" / f, dtype=np.uint16) for f in ("train.bin", "val.bin")])
    assert len(ids) < len(text) / 2  # BPE merges characters
    assert load_tokenizer(meta, tmp_path / "d").decode(ids.tolist()) == text


def test_tiny_corpus_warns_that_splits_are_too_small(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("hello")
    meta = prepare([tmp_path / "tiny.txt"], tmp_path / "d", progress=False)
    assert (meta["train_tokens"], meta["val_tokens"]) == (4, 1)  # still written: the user may train on it anyway
    err = capsys.readouterr().err
    assert "warning: " in err and str(tmp_path / "d") in err
    assert "the val split has only 1 token: fewer than the 2 of the shortest window" in err
    assert "the train split has only 4 tokens: enough only for windows of block_size <= 3" in err
    assert "larger corpus or a smaller val_fraction (now 0.1)" in err


def test_small_split_warnings():
    assert small_split_warnings(10_000, 1_000, 0.1) == []
    (train,) = small_split_warnings(0, 1_000, 0.1)
    assert train.startswith("the train split has only 0 tokens") and "training on it fails" in train
    (val,) = small_split_warnings(10_000, 30, 0.003)
    assert val == ("the val split has only 30 tokens: enough only for windows of block_size <= 29; use a larger "
                   "corpus or a larger val_fraction (now 0.003)")


def test_a_usable_corpus_prints_no_warning(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world\nthe quick brown fox\n" * 50)
    prepare([tmp_path / "a.txt"], tmp_path / "d", progress=False)
    assert "warning" not in capsys.readouterr().err
