"""Crash safety (issue 10): a training run killed with SIGKILL at several moments, including in
the middle of a save, resumes from its last checkpoint each time and ends with exactly the
parameters of an uninterrupted run with the same seed."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ecospa.checkpoint import exists
from ecospa.checkpoint.load import read_checkpoint
from tests.checkpoint import crash_train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL"), pytest.mark.slow]


def _run(ckpt: Path, final: Path, *, pause: str | None = None, kill_after: float | None = None,
         timeout: float = 120.0) -> tuple[bool, list[str]]:
    """Run the script; kill it with SIGKILL at its ``pause`` marker or ``kill_after`` seconds after
    it started training. Returns (killed, stdout lines)."""
    cmd = [sys.executable, "-m", "tests.checkpoint.crash_train", str(ckpt), str(final)]
    if pause:
        cmd += ["--pause", pause]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    killed = False
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if time.monotonic() > deadline:
                raise AssertionError(f"crash_train ran past {timeout}s: {lines}")
            if pause and line.startswith("pause"):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            if kill_after is not None and line.startswith("start"):
                time.sleep(kill_after)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                break
        lines += [s.strip() for s in proc.stdout.read().splitlines()]  # printed before it died
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not killed:
        assert proc.returncode == 0, f"crash_train failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}"
    proc.stdout.close()
    proc.stderr.close()
    return killed, lines


def _last(lines: list[str], marker: str) -> int | None:
    steps = [int(s.split()[1]) for s in lines if s.startswith(marker + " ")]
    return steps[-1] if steps else None


def _step_on_disk(ckpt: Path) -> int:
    return read_checkpoint(ckpt).manifest.section("extra")["step"]


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    """Kill points: inside a save after its first file is written (partial temporary directory),
    between the save's two renames (only the previous checkpoint's renamed copy exists), after
    them (the new checkpoint is committed, the old copy not yet deleted), and at a random
    moment. After each kill a complete checkpoint is readable, and the next run resumes from it."""
    torch.set_num_threads(1)
    reference = crash_train.run(None, str(tmp_path / "reference"))
    ckpt, final = tmp_path / "ckpt", tmp_path / "final"
    rng = random.Random(0)
    kills = [{"pause": "write:2"}, {"pause": "swap:1"}, {"pause": "swapped:1"},
             {"kill_after": rng.uniform(0.0, 0.4)}]
    on_disk = 0
    for kill in kills:
        killed, lines = _run(ckpt, final, **kill)
        start = int(next(s for s in lines if s.startswith("start")).split()[1])
        assert start == on_disk, f"{kill}: resumed from step {start}, the checkpoint holds {on_disk}"
        if not killed:  # the random kill came too late: the run finished
            break
        saved, saving = _last(lines, "saved"), _last(lines, "saving")
        phase = kill.get("pause", "random").split(":")[0]
        if phase == "swap":
            assert not ckpt.exists() and exists(ckpt), "between the renames only the old copy exists"
        now = _step_on_disk(ckpt) if exists(ckpt) else 0
        if phase in ("write", "swap"):  # the interrupted save did not commit
            assert now == (saved if saved is not None else on_disk)
        elif phase == "swapped":  # it did
            assert now == saving
        else:
            assert now in {on_disk, saved, saving}
        on_disk = now
    if not final.exists():
        killed, lines = _run(ckpt, final)
        assert not killed and lines[0] == f"start {on_disk}"
    leftovers = [p.name for p in tmp_path.iterdir() if ".ecospa-" in p.name]
    assert leftovers == [], f"temporary directories left behind: {leftovers}"
    got = read_checkpoint(final).weights
    want = reference.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and torch.equal(got[k], want[k]), f"{k} differs"
