"""benchmarks/methods.py's multi-seed driver: seed ranges, the paired bootstrap interval, and a results file that an
interrupted study continues from (the training workers themselves are replaced: they are the benchmark's business)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    """benchmarks/methods.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "benchmarks" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def bench(monkeypatch):
    module = load_bench()
    calls = []

    def fake_worker(name, seed, work, args):
        calls.append((name, seed))
        loss = {"lora": 0.05, "qlora": 0.06}[name] + seed / 1000
        return {"run": name, "peak_mb": 1000.0 + seed, "s_per_step": 1.0, "ckpt_mb": 30.0, "val_loss": loss,
                "losses": [4.5, loss]}

    monkeypatch.setattr(module, "run_worker", fake_worker)
    monkeypatch.setattr(module, "write_data", lambda folder, val_size=64: None)
    import slimtune.models.hf

    monkeypatch.setattr(slimtune.models.hf, "resolve_model", lambda name: None)
    module.calls = calls
    return module


def test_parse_seeds(bench):
    assert bench.parse_seeds("0-3,9") == [0, 1, 2, 3, 9]
    assert bench.parse_seeds("5") == [5]
    with pytest.raises(SystemExit, match="0-x.*ranges like 0-7,9"):
        bench.parse_seeds("0-x")


def test_paired_interval_brackets_the_ratio_and_is_exact_for_a_constant_ratio(bench):
    lo, hi = bench.paired_ratio_interval([1.0, 2.0, 3.0, 4.0], [1.1, 2.1, 3.2, 4.0])
    assert lo < 10.4 / 10 < hi and hi - lo < 0.1
    lo, hi = bench.paired_ratio_interval([0.04, 0.05, 0.06], [0.05, 0.0625, 0.075])
    assert lo == pytest.approx(1.25) and hi == pytest.approx(1.25)


def test_results_file_is_appended_per_run_and_reused(bench, tmp_path, capsys):
    results = tmp_path / "study.jsonl"
    bench.main(["--runs", "lora,qlora", "--seeds", "0-1", "--steps", "60", "--decay", "--results", str(results)])
    assert bench.calls == [("lora", 0), ("qlora", 0), ("lora", 1), ("qlora", 1)]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["run"], r["seed"]) for r in rows] == bench.calls
    assert rows[0]["protocol"]["steps"] == 60 and rows[0]["protocol"]["decay"] is True
    out = capsys.readouterr().out
    assert "| 0 | 0.0500 (1000) | 0.0600 (1000) |" in out
    # qlora/lora = (0.060 + 0.061) / (0.050 + 0.051)
    assert f"| qlora | 2 | 0.0605 | 0.0007 | {0.121 / 0.101:.3f} |" in out

    bench.calls.clear()  # a longer study on the same file only runs what is missing
    bench.main(["--runs", "lora,qlora", "--seeds", "0-2", "--steps", "60", "--decay", "--results", str(results)])
    assert bench.calls == [("lora", 2), ("qlora", 2)]
    assert len(results.read_text().splitlines()) == 6

    bench.calls.clear()  # another protocol does not reuse those rows
    bench.main(["--runs", "lora", "--seeds", "0", "--steps", "30", "--results", str(results)])
    assert bench.calls == [("lora", 0)]


def test_a_broken_results_line_names_file_and_line(bench, tmp_path):
    results = tmp_path / "study.jsonl"
    results.write_text('{"run": "lora"}\n{not json\n')
    with pytest.raises(SystemExit, match=r"study.jsonl:2: not a JSON line"):
        bench.main(["--runs", "lora", "--seeds", "0-1", "--results", str(results)])


def test_the_held_out_set_starts_with_the_64_conversations_of_earlier_tables(tmp_path):
    module = load_bench()
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir(), large.mkdir()
    module.write_data(small, 64)
    train, val = module.write_data(large, 1024)
    assert not (small / "val64.jsonl").exists()
    first = (large / "val64.jsonl").read_text()
    assert first == (small / "val.jsonl").read_text()  # the earlier tables' set, the same conversations
    assert val.read_text().startswith(first) and len(val.read_text().splitlines()) == 1024
    assert train.read_text() == (small / "train.jsonl").read_text()
    held_out = set(val.read_text().splitlines())
    assert not held_out & set(train.read_text().splitlines())


def test_only_a_non_default_held_out_size_enters_the_protocol(bench, tmp_path):
    results = tmp_path / "study.jsonl"
    bench.main(["--runs", "lora", "--seeds", "0-1", "--results", str(results), "--val-size", "64"])
    bench.main(["--runs", "lora", "--seeds", "0-1", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert ["val" in r["protocol"] for r in rows] == [False, False, True, True]
    assert rows[2]["protocol"]["val"] == 1024
    assert bench.calls == [("lora", 0), ("lora", 1), ("lora", 0), ("lora", 1)]  # 64 and 1024 rows are not mixed
