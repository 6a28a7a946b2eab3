"""Checkpoints: round trip, manifest, validation of damaged folders, resume choice, temp cleanup, archiving, pruning."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_model

from slimtune.errors import SlimtuneError
from slimtune.train import checkpoint as ckpt_io


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def save(out_dir, step, model=None, keep_last=0, written_in=None):
    model = model if model is not None else tiny_model(step)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()  # momentum buffers: a non-empty optimizer state

    def write_files(folder):
        if written_in is not None:
            written_in.append(folder)
        save_model(model, str(folder / "model.safetensors"))
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")

    return ckpt_io.save_checkpoint(out_dir, step, write_files, optimizer.state_dict(), {"step": step},
                                   {"lr": 0.1}, {"kind": "linear", "in": 4, "out": 3}, keep_last=keep_last)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the PID no longer names a process (reuse within the test is vanishingly unlikely)
    return proc.pid


def test_round_trip(tmp_path):
    model = tiny_model(1)
    written_in = []
    path = save(tmp_path, 7, model, written_in=written_in)
    assert path == tmp_path / "step-000007"
    assert written_in[0].parent == tmp_path
    assert written_in[0].name.startswith(f".step-000007.tmp-{os.getpid()}-")  # the PID lets cleanup spot dead writers
    assert ckpt_io.validate_checkpoint(path) == []
    loaded = tiny_model(2)
    ckpt_io.load_model_weights(loaded, path)
    assert torch.equal(loaded.weight, model.weight) and torch.equal(loaded.bias, model.bias)
    assert ckpt_io.load_state(path, "trainer.pt") == {"step": 7}
    assert ckpt_io.load_state(path, "optimizer.pt")["state"][0]["momentum_buffer"].shape == (3, 4)
    assert ckpt_io.read_model_config(path) == {"kind": "linear", "in": 4, "out": 3}
    assert (path / "config.yaml").read_text() == "lr: 0.1\n"
    assert ckpt_io.latest_checkpoint(tmp_path) == path
    assert [p.name for p in tmp_path.iterdir()] == ["step-000007"]  # no temp folder left behind


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 3, tiny_model(1))
    model = tiny_model(2)
    path = save(tmp_path, 3, model)
    loaded = tiny_model(3)
    ckpt_io.load_model_weights(loaded, path)
    assert torch.equal(loaded.weight, model.weight)
    assert ckpt_io.validate_checkpoint(path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["step-000003"]


def test_manifest_lists_every_file_with_its_size(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / "checkpoint.json").read_text())
    assert manifest["format"] == 1 and manifest["step"] == 1
    on_disk = {p.relative_to(path).as_posix(): p.stat().st_size
               for p in path.rglob("*") if p.is_file() and p.name != "checkpoint.json"}
    assert manifest["files"] == on_disk
    assert {"model.safetensors", "optimizer.pt", "trainer.pt", "model_config.json", "config.yaml",
            "tokenizer/vocab.txt"} <= set(on_disk)


def test_validate_reports_a_truncated_safetensors_file(tmp_path):
    path = save(tmp_path, 1)
    weights = path / "model.safetensors"
    full = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:full - 5])
    assert ckpt_io.validate_checkpoint(path) == [f"model.safetensors is truncated ({full - 5:,} of {full:,} bytes)"]


def rewrite_with_manifest(path, rel, data: bytes):
    """Replace a file and record its new size in the manifest: damage only the header checks can see."""
    (path / rel).write_bytes(data)
    manifest = json.loads((path / "checkpoint.json").read_text())
    manifest["files"][rel] = len(data)
    (path / "checkpoint.json").write_text(json.dumps(manifest))


def test_validate_checks_the_safetensors_header_against_the_bytes(tmp_path):
    path = save(tmp_path, 1)
    data = (path / "model.safetensors").read_bytes()
    rewrite_with_manifest(path, "model.safetensors", data + b"\0" * 16)
    assert ckpt_io.validate_checkpoint(path) == ["model.safetensors has 16 bytes after its last tensor"]

    header_len = int.from_bytes(data[:8], "little")
    rewrite_with_manifest(path, "model.safetensors", data[:8] + b"x" * header_len + data[8 + header_len:])
    assert ckpt_io.validate_checkpoint(path) == ["model.safetensors has an unreadable safetensors header"]

    # Header intact, data cut short, manifest agreeing: a tensor's offsets run past the end of the file.
    rewrite_with_manifest(path, "model.safetensors", data[:-4])
    problems = ckpt_io.validate_checkpoint(path)
    assert len(problems) == 1 and problems[0].startswith("model.safetensors is truncated (tensor"), problems


def test_validate_reports_a_missing_optimizer_file(tmp_path):
    path = save(tmp_path, 1)
    (path / "optimizer.pt").unlink()
    assert ckpt_io.validate_checkpoint(path) == ["optimizer.pt is missing"]


def test_validate_reports_a_size_mismatch_and_a_broken_archive(tmp_path):
    path = save(tmp_path, 1)
    with open(path / "config.yaml", "a") as f:
        f.write("extra: 1\n")
    size = (path / "config.yaml").stat().st_size
    assert ckpt_io.validate_checkpoint(path) == [f"config.yaml has {size} bytes, the manifest says {size - 9}"]

    path = save(tmp_path, 2)
    trainer = path / "trainer.pt"
    trainer.write_bytes(b"\0" * trainer.stat().st_size)  # same size, not a zip archive
    assert ckpt_io.validate_checkpoint(path) == ["trainer.pt is not a readable torch archive"]


def test_validate_reports_a_missing_manifest(tmp_path):
    path = save(tmp_path, 1)
    (path / "checkpoint.json").unlink()
    problems = ckpt_io.validate_checkpoint(path)
    assert len(problems) == 1 and problems[0].startswith("checkpoint.json is missing")
    assert ckpt_io.list_checkpoints(tmp_path) == []


def test_resume_auto_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path):
    good = save(tmp_path, 1)
    bad = save(tmp_path, 2)
    (bad / "optimizer.pt").unlink()
    warnings = []
    assert ckpt_io.resolve_resume("auto", tmp_path, warn=warnings.append) == good
    assert len(warnings) == 1 and "step-000002" in warnings[0] and "optimizer.pt is missing" in warnings[0]
    assert bad.is_dir()  # never deleted
    assert ckpt_io.resolve_resume("must", tmp_path, warn=warnings.append) == good
    assert ckpt_io.resolve_resume("never", tmp_path) is None


def test_resume_must_without_an_intact_checkpoint_names_the_damaged_ones(tmp_path):
    bad = save(tmp_path, 4)
    (bad / "trainer.pt").unlink()
    assert ckpt_io.resolve_resume("auto", tmp_path, warn=lambda msg: None) is None
    with pytest.raises(SlimtuneError, match="resume=must.*damaged: step-000004"):
        ckpt_io.resolve_resume("must", tmp_path, warn=lambda msg: None)


def test_resume_from_a_damaged_path_raises_with_the_problem(tmp_path):
    bad = save(tmp_path, 5)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SlimtuneError, match=r"model\.safetensors is truncated \(100 of .*resume=auto"):
        ckpt_io.resolve_resume(str(bad), tmp_path)
    with pytest.raises(SlimtuneError, match="no such checkpoint folder"):
        ckpt_io.resolve_resume(str(tmp_path / "step-000099"), tmp_path)
    good = save(tmp_path, 6)
    assert ckpt_io.resolve_resume(str(good), tmp_path) == good


def test_load_model_weights_reports_a_damaged_file_by_name(tmp_path):
    path = save(tmp_path, 1)
    (path / "model.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0{oops")
    with pytest.raises(SlimtuneError, match=r"model\.safetensors cannot be read"):
        ckpt_io.load_model_weights(tiny_model(), path)


def test_stale_temp_dirs_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    save(tmp_path, 1)
    dead = tmp_path / f".step-000002.tmp-{dead_pid()}-abc123"
    live = tmp_path / f".step-000002.tmp-{os.getpid()}-def456"
    legacy = tmp_path / ".step-000003.k2j_8xq1"
    legacy_old = tmp_path / ".step-000001.old"
    for d in (dead, live, legacy, legacy_old):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    removed = ckpt_io.clean_stale_temp_dirs(tmp_path)
    assert sorted(removed) == sorted([dead, legacy, legacy_old])
    assert live.is_dir() and not dead.exists() and not legacy.exists() and not legacy_old.exists()
    assert (tmp_path / "step-000001").is_dir()


def test_an_orphaned_previous_copy_is_restored_not_removed(tmp_path):
    # A re-save that died between its two renames: the step exists only as the `.old` copy.
    path = save(tmp_path, 1)
    old = tmp_path / f".step-000001.old-{dead_pid()}-abcd1234"
    os.replace(path, old)
    assert ckpt_io.clean_stale_temp_dirs(tmp_path) == []
    assert ckpt_io.validate_checkpoint(path) == []


def test_list_checkpoints_ignores_temp_and_other_folders(tmp_path):
    a = save(tmp_path, 1)
    b = save(tmp_path, 12)
    for name in (f".step-000020.tmp-{os.getpid()}-x1", ".step-000021.abcdefgh", "step-notes", "step-12"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.json").write_text("{}")
    (tmp_path / "step-000030").mkdir()  # no manifest: an interrupted save
    assert ckpt_io.list_checkpoints(tmp_path) == [a, b]
    assert ckpt_io.latest_checkpoint(tmp_path) == b


def test_archive_moves_the_previous_run_and_never_reuses_a_name(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    for name in ("metrics.jsonl", "loss.png", "config.yaml", "plan.json", "train.log"):
        (tmp_path / name).write_text(name)
    (tmp_path / "notes.md").write_text("mine")  # not a run output: stays
    first = ckpt_io.archive_previous_run(tmp_path)
    assert first.parent == tmp_path / "previous-runs" and first.name.startswith("run-")
    assert sorted(p.name for p in first.iterdir()) == ["config.yaml", "loss.png", "metrics.jsonl", "plan.json",
                                                       "step-000001", "step-000002", "train.log"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md", "previous-runs"]
    assert ckpt_io.validate_checkpoint(first / "step-000002") == []
    assert ckpt_io.archive_previous_run(tmp_path) is None  # nothing left to archive

    save(tmp_path, 1)
    second = ckpt_io.archive_previous_run(tmp_path)
    assert second != first and second.parent == first.parent
    assert sorted(p.name for p in first.iterdir() if p.name.startswith("step")) == ["step-000001", "step-000002"]
    assert sorted(p.name for p in second.iterdir()) == ["step-000001"]


def test_keep_last_after_archive_never_deletes_the_new_checkpoint(tmp_path):
    # The old run reached step 500; the fresh run's first save is step 10.
    save(tmp_path, 500)
    ckpt_io.archive_previous_run(tmp_path)
    new = save(tmp_path, 10, keep_last=1)
    assert new.is_dir() and ckpt_io.validate_checkpoint(new) == []
    newer = save(tmp_path, 20, keep_last=1)
    assert ckpt_io.list_checkpoints(tmp_path) == [newer]


def test_keep_last_never_deletes_the_new_checkpoint_or_damaged_ones(tmp_path):
    # Without an archive, a newer step from elsewhere must not push the one just written out.
    future = save(tmp_path, 500)
    damaged = save(tmp_path, 5)
    (damaged / "trainer.pt").unlink()
    kept = save(tmp_path, 8)
    new = save(tmp_path, 10, keep_last=2)
    assert ckpt_io.list_checkpoints(tmp_path) == [damaged, kept, new, future]
    newest = save(tmp_path, 12, keep_last=1)
    assert ckpt_io.list_checkpoints(tmp_path) == [damaged, newest, future]
