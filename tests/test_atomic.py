"""Folders written atomically (`slimtune.atomic`): complete under the final name, or absent, and nothing else left."""

from __future__ import annotations

import os
import stat

import pytest

from slimtune.atomic import check_new_folder, write_folder_atomically
from slimtune.errors import SlimtuneError


def test_a_crash_leaves_nothing_behind_and_a_lost_race_keeps_the_first_copy(tmp_path):
    target = tmp_path / "cache" / "entry"

    def crash(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_folder_atomically(target, crash, exist_ok=True)
    assert not target.exists() and list(target.parent.iterdir()) == []
    write_folder_atomically(target, lambda tmp: (tmp / "a").write_text("1"), exist_ok=True)
    write_folder_atomically(target, lambda tmp: (tmp / "b").write_text("2"), exist_ok=True)  # lost race: keep first
    assert sorted(p.name for p in target.iterdir()) == ["a"] and len(list(target.parent.iterdir())) == 1


def test_replace_swaps_in_the_complete_folder_only(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("x")

    def crash(tmp):
        (tmp / "new").write_text("y")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_folder_atomically(target, crash, replace=True)
    assert [p.name for p in target.iterdir()] == ["old"]  # the earlier folder is untouched
    write_folder_atomically(target, lambda tmp: (tmp / "new").write_text("y"), replace=True)
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(OSError):  # neither replace nor exist_ok: an existing folder is never overwritten
        write_folder_atomically(target, lambda tmp: (tmp / "other").write_text("z"))
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_folder_gets_the_permissions_of_a_plain_mkdir(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    written = write_folder_atomically(tmp_path / "written", lambda tmp: None)
    assert stat.S_IMODE(os.stat(written).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_an_output_folder_must_be_new_or_empty_unless_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_new_folder(tmp_path / "empty", overwrite=False) == tmp_path / "empty"
    assert check_new_folder(tmp_path / "new", overwrite=False) == tmp_path / "new"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SlimtuneError, match="already exists and is not empty; choose another folder or pass"):
        check_new_folder(tmp_path / "full", overwrite=False)
    assert check_new_folder(tmp_path / "full", overwrite=True) == tmp_path / "full"
