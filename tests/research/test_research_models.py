"""Research code (torchtune, litgpt, x-transformers, torchtitan): the fast rows of
``bench/research/matrix.py``. Each test skips unless its library imports (they live in the venv
``bench/research/setup_venv.sh`` builds, not in the main one).

Asserted: the couplings the config implies are found, pruning half of every coupling's units
matches the masked dense model, every attention region runs narrow on the prefill (an ALiBi module
passed as an argument, a FlexAttention BlockMask passed as an argument included); where the
library's KV cache decode runs, it matches the masked model too (narrow or not: see the matrix);
``ecospa.save`` / ``ecospa.load`` round-trip (torchtitan's fused-QKV state_dict hooks included).
"""
from __future__ import annotations

import pytest

from bench.research.matrix import TOL, run_spec
from bench.research.models import all_specs

# Known failures (bench/results/research_matrix.md has the reasons): strict, so a fix shows up.
KNOWN: dict[str, str] = {}
FAST = [pytest.param(s, id=s.name, marks=[pytest.mark.xfail(reason=KNOWN[s.name], strict=True)] if s.name in KNOWN else [])
        for s in all_specs() if s.fast]


@pytest.mark.parametrize("spec", FAST)
def test_research_model(spec):
    pytest.importorskip(spec.lib)
    row = run_spec(spec, speed=False, tp=False)
    assert row["status"] == "ok", row.get("traceback", row.get("error"))
    assert row["couplings_ok"], (row["found"], row["expected"], row["inexact"])
    assert row["exact"], row["rel_err"]
    assert row["params_after"] < row["params"]
    if spec.narrow_prefill:
        assert row["prefill"]["fallback"] == 0 and row["prefill"]["narrow"] > 0, row["prefill"]
    dec = row.get("decode")
    if dec is not None:
        assert "error" not in dec, dec
        assert dec["rel_err"] <= TOL, dec
    if spec.trainable:
        assert row["train"] == "ok", row["train"]
    assert row["save_load_err"] is not None and row["save_load_err"] <= TOL, row.get("save_load_error")
