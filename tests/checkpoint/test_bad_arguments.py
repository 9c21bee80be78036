"""Bad arguments to ``ecospa.save`` / ``ecospa.load`` as a new user writes them: a folder that
cannot be created, a model that is not a module, a directory that is not a path, the two
swapped. Each is one CheckpointError naming the user's path or argument and the way out, raised
before anything is written."""
from __future__ import annotations

import sys

import pytest
import torch

import ecospa
from ecospa.checkpoint import check_writable


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


UNWRITABLE = ["/proc/ecospa-ck", "/proc/a/b/ck"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
@pytest.mark.parametrize("where", UNWRITABLE)
def test_save_where_no_folder_can_be_created(where):
    with pytest.raises(ecospa.CheckpointError) as e:
        ecospa.save(_model(), where)
    msg = str(e.value)
    assert msg.startswith(f"cannot save to {where}: cannot create a folder in /proc")
    assert "ecospa-tmp" not in msg and "choose a folder you can write to" in msg
    with pytest.raises(ecospa.CheckpointError, match=f"cannot save to {where}: "):
        check_writable(where)


def test_save_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for where in (tmp_path / "notes.txt" / "ck", tmp_path / "notes.txt" / "a" / "ck"):
        with pytest.raises(ecospa.CheckpointError, match="notes.txt is a file, not a folder"):
            ecospa.save(_model(), where)
        with pytest.raises(ecospa.CheckpointError, match="notes.txt is a file, not a folder"):
            check_writable(where)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_check_writable_leaves_nothing_behind(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "ck") == (tmp_path / "a" / "b" / "ck").resolve()
    assert list(tmp_path.iterdir()) == []
    ecospa.save(_model(), tmp_path / "ck")
    assert check_writable(tmp_path / "ck") == (tmp_path / "ck").resolve()  # a checkpoint may be replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x").write_text("x")
    with pytest.raises(ecospa.CheckpointError, match="refusing to replace"):
        check_writable(tmp_path / "mine")


@pytest.mark.parametrize("args, match", [
    (("model.pt", "ck"), "model should be a torch.nn.Module, got str"),
    ((None, "ck"), "model should be a torch.nn.Module, got NoneType"),
    ((_model(), None), "directory should be a path .*got NoneType"),
    ((_model(), 3), "directory should be a path .*got int 3"),
    ((_model(), ""), "directory is an empty path"),
    (("ck", _model()), "swapped: call ecospa.save\\(model, directory\\)"),
])
def test_save_bad_arguments(args, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ecospa.CheckpointError, match=match):
        ecospa.save(*args)
    assert list(tmp_path.iterdir()) == []


def test_load_bad_arguments(tmp_path):
    ck = ecospa.save(_model(), tmp_path / "ck")
    with pytest.raises(ecospa.CheckpointError, match="directory should be a path .*got NoneType"):
        ecospa.load(None)
    with pytest.raises(ecospa.CheckpointError, match="model should be a torch.nn.Module, got str"):
        ecospa.load(ck, "Linear")
    with pytest.raises(ecospa.CheckpointError, match="swapped"):
        ecospa.load(_model(), ck)
    with pytest.raises(ecospa.CheckpointError, match="no checkpoint at .*does not exist"):
        ecospa.load(tmp_path / "nothing", _model())


def test_optimizer_of_the_wrong_type(tmp_path):
    with pytest.raises(ecospa.CheckpointError, match="optimizer should be a torch.optim.Optimizer .*got str"):
        ecospa.save(_model(), tmp_path / "ck", optimizer="adam")
    assert list(tmp_path.iterdir()) == []
    ck = ecospa.save(_model(), tmp_path / "ck")
    with pytest.raises(ecospa.CheckpointError, match="optimizer should be a torch.optim.Optimizer"):
        ecospa.load(ck, _model(), optimizer={"lr": 1})
