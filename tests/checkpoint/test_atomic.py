"""The atomic write scheme: readers see a complete checkpoint, failed or killed writers leave the
previous one, and their leftovers are cleaned up."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

import ecospa
from ecospa.checkpoint import atomic, exists, read_extra
from ecospa.checkpoint.load import read_checkpoint


def _model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(64, 64)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _sibling(ck, kind: str, pid: int) -> str:
    return str(ck.parent / f".{ck.name}.{kind}.{atomic._host()}.{pid}.abcd1234")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    ecospa.save(_model(1.0), ck, extra={"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(sys.modules["ecospa.checkpoint.save"], "write_tensors", boom)
    with pytest.raises(OSError, match="disk full"):
        ecospa.save(_model(2.0), ck, extra={"step": 2})
    assert read_extra(ck) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_killed_between_the_renames(tmp_path):
    """The state a writer killed between its renames leaves: no ``ck``, the previous checkpoint
    at its old name, the new one complete in the temporary directory. Readers get the previous
    one; the next save puts it back first and cleans up."""
    ck = tmp_path / "ck"
    ecospa.save(_model(1.0), ck, extra={"step": 1})
    pid = _dead_pid()
    os.rename(ck, _sibling(ck, "ecospa-old", pid))
    ecospa.save(_model(2.0), tmp_path / "other", extra={"step": 2})
    os.rename(tmp_path / "other", _sibling(ck, "ecospa-tmp", pid))
    assert not ck.exists() and exists(ck)
    assert read_extra(ck) == {"step": 1}
    m = _model(0.0)
    ecospa.load(ck, m)
    assert torch.equal(m.weight, torch.ones(64, 64))
    ecospa.save(_model(3.0), ck, extra={"step": 3})
    assert read_extra(ck) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_leftovers_of_live_writers_are_kept(tmp_path):
    ck = tmp_path / "ck"
    live = _sibling(ck, "ecospa-tmp", os.getpid())  # this process: a writer still running
    os.makedirs(live)
    dead = _sibling(ck, "ecospa-tmp", _dead_pid())
    os.makedirs(dead)
    ecospa.save(_model(1.0), ck)
    assert os.path.isdir(live) and not os.path.exists(dead)
    shutil.rmtree(live)


def test_readers_never_see_a_partial_checkpoint(tmp_path):
    """A writer thread saves over and over (weights = step, extra = step) while readers load:
    every read is complete and consistent."""
    ck = tmp_path / "ck"
    ecospa.save(_model(0.0), ck, extra={"step": 0})
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            step = 0
            while not stop.is_set():
                step += 1
                ecospa.save(_model(float(step)), ck, extra={"step": step})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 20
        reads = 0
        while (len(seen) < 5 or reads < 50) and time.monotonic() < deadline:
            c = read_checkpoint(ck)
            step = c.manifest.section("extra")["step"]
            assert torch.equal(c.weights["weight"], torch.full((64, 64), float(step)))
            seen.add(step)
            reads += 1
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert len(seen) >= 2, "the writer should have replaced the checkpoint while reading"
