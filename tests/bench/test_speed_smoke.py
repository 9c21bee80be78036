"""Smoke test of the speed benchmark: ``--quick`` runs end to end and writes a complete report.

No speed thresholds: timings on a shared CI machine mean nothing; only structure, positive
numbers, exactness of the pruned models and that their attention ran narrow are checked.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("torch_pruning")
pytest.importorskip("transformers")


def _timings(summary: dict, names) -> None:
    assert set(summary) == set(names)
    for row in summary.values():
        assert row["wall_runs_s"] and all(t > 0 for t in row["wall_runs_s"] + row["cpu_runs_s"])
        assert row["median_s"] > 0 and row["min_s"] > 0 and row["speedup_median"] > 0 and row["speedup"] > 0


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "bench.speed.run", "--quick", "--threads", "1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "speed.json").read_text())
    assert {"meta", "probes", "gpt2", "layouts", "generate", "linear_gpt", "tiny"} <= set(res)
    assert (tmp_path / "speed.md").read_text().startswith("# Speed") and (tmp_path / "speed.png").stat().st_size > 0
    assert res["meta"]["threads"] == 1 and len(res["meta"]["load_before"]) == 3
    for sec, names in (("gpt2", ["dense", "uniform", "ragged", "ragged-grouped"]),
                       ("linear_gpt", ["dense", "ecospa-uniform", "ecospa-ragged", "tp-head-dims", "tp-num-heads", "reference"]),
                       ("tiny", ["dense", "uniform", "ragged", "reference"])):
        s = res[sec]
        params = {k: v["params"] for k, v in s["variants"].items()}
        assert all(p > 0 for p in params.values()) and len({p for k, p in params.items() if k != "dense"}) == 1, params
        for k, v in s["variants"].items():
            if "rel_err_eval" in v:
                assert v["rel_err_eval"] <= 1e-5 and v["rel_err_train"] <= 1e-5, (sec, k, v)
        assert s["execution"] and all(e["all_narrow"] for e in s["execution"].values()), s["execution"]
        assert s["lengths"]
        for row in s["lengths"]:
            for key in ("forward", "body", "train"):
                _timings(row[key], names)
                assert all(row[key][k]["ideal"] >= 1 for k in names)
            assert all(f["total"] > f["body"] >= f["attention"] > 0 for f in row["flops"].values())
            assert all(len(row["load_per_round"][key]) == len(row[key]["dense"]["wall_runs_s"]) for key in ("forward", "train"))
    for row in res["layouts"]["lengths"]:
        for key in ("forward", "train"):
            _timings(row[key], ["dense", "uniform", "padded", "padded_unequal", "grouped", "per_head"])
        assert row["flops"]["dense"] > row["flops"]["padded_unequal"] >= row["flops"]["uniform"]
    g = res["generate"]
    for key in ("cached", "prefill", "no_cache"):
        _timings(g[key], ["dense", "uniform", "ragged"])
    dense_kv = g["variants"]["dense"]["kv_bytes"]
    for k, v in g["variants"].items():
        assert v["kv_bytes"] > 0 and v["tokens_per_s"] > 0 and v["no_cache_tokens_per_s"] > 0
        assert 0 < v["kv_bytes_at_kept_widths"] <= v["kv_bytes_at_padded_widths"] <= dense_kv
        # the cache holds the kept widths (ragged heads: up to the layer's widest kept head)
        assert v["kv_bytes_at_kept_widths"] <= v["kv_bytes"] <= v["kv_bytes_at_padded_widths"], (k, v)
        assert k == "dense" or v["kv_bytes"] < dense_kv
    assert all(e["kv_cache"] and all(s.startswith("KV cache stored at the kept widths") for s in e["kv_cache"])
               for e in g["cached_execution"].values()), g["cached_execution"]
    assert all(e["narrow_calls"] > 0 for e in g["no_cache_execution"].values())
    assert res["probes"]["inference_mode"]
