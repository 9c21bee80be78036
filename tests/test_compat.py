"""A representative subset of the compatibility matrix (bench/compat.py, docs/compatibility.md):
each architecture built from a small config, a random third of every exact coupling removed,
pruned == masked dense (fp32, relative error <= 1e-5) and fewer parameters."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from bench import compat  # noqa: E402

SUBSET = ["gpt2", "gpt_neox", "bloom", "llama", "qwen3", "mixtral", "albert",
          "bert", "deberta_v2", "t5", "whisper", "vit", "swin", "clip"]
ARCHS = {a.name: a for a in compat.ARCHS}


@pytest.mark.parametrize("name", SUBSET)
def test_architecture_prunes_exactly(name):
    row = compat.check(ARCHS[name])
    assert row["status"] == "ok", row.get("error") or row
    assert row["max_rel_err"] <= 1e-5
    assert row["params_after"] < row["params"]
    if ARCHS[name].family == "encoder-decoder":
        # built as users build them (use_cache on): the decoder's cross-attention reads its keys
        # back from an EncoderDecoderCache and runs the exact fallback; everything else is narrow
        assert all("cross-attention cache" in r for r in row["regions"]["reasons"]), row["regions"]
    else:
        assert not row["regions"]["fallback"], row["regions"]  # every attention region ran narrow
    assert {"qk", "vo"} & set(row["couplings"]) or name == "qwen3", row["couplings"]


def test_qwen3_row_lists_qk_norm_as_the_reason():
    row = compat.check(ARCHS["qwen3"])
    assert row["couplings"].keys() == {"vo", "glu"}
    qk = [g for g in row["inexact"] if "qk" in g["kinds"]]
    assert qk and all("q_norm" in g["reason"] or "k_norm" in g["reason"] for g in qk), row["inexact"]


def test_every_row_is_listed_with_a_status():
    assert len(ARCHS) == len(compat.ARCHS) >= 25 + 3
    md = compat.markdown([{"model": "x", "family": "decoder", "status": "skipped", "error": "timm not importable"}],
                         {"command": "c", "seconds": 1.0, "torch": "t", "machine": "m"})
    assert "| x | decoder | skipped |" in md and "timm not importable" in md


def test_execution_counts_layouts():
    class C:
        def __init__(self, *layouts):
            self.sites = [type("S", (), {"layout": x})() for x in layouts]

    assert compat.execution([C("compact", "compact"), C("scatter"), C("scatter", "scatter")]) == {
        "compact": 1, "scatter": 2}


@pytest.mark.timm
@pytest.mark.parametrize("name", ["timm_vit", "timm_deit", "timm_swin"])
def test_timm_architecture_prunes_exactly(name):
    """The timm rows (run in the timm environment; skipped where timm does not import)."""
    pytest.importorskip("timm")
    row = compat.check(ARCHS[name])
    assert row["status"] == "ok", row.get("error") or row
    assert row["max_rel_err"] <= 1e-5 and row["params_after"] < row["params"]
