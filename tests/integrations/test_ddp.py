"""DDP under torchrun (2 processes, gloo, CPU): every rank prunes the same units, the wrapper is
rebuilt after each prune, and the result equals one process on the combined batches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ecospa
from tests.integrations import ddp_worker

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def reference():
    model, opt = ddp_worker.build()
    sp = ecospa.EcoSpa(model, opt, 0.5, every=3, top_k=0.5, theta=0.8)
    ddp_worker.train(lambda: model, opt, sp, ddp_worker.batches())
    return ddp_worker.snapshot(model, opt, sp)


@pytest.mark.slow
def test_ddp_two_ranks_prune_alike_and_match_one_process(tmp_path):
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "integrations" / "ddp_worker.py"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{i}.safetensors") for i in range(2)]
    meta = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert meta[0]["events"] >= 3 and meta[0]["recorded"], meta[0]
    assert meta[0]["plan"] == meta[1]["plan"]
    assert meta[0]["local_plan"] == meta[1]["local_plan"] and meta[0]["local_plan"]["steps"]
    first = meta[0]["settings"][0]  # rewrap keeps the wrapper's settings
    assert first["bucket_cap_mb"] == "1.0" and first["gradient_as_bucket_view"] == "True"
    assert all(s == first for s in meta[0]["settings"])
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:  # identical, not just close: same gradients, same updates
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    lit = [m["lightning"] for m in meta]
    if lit[0] is not None:  # Lightning's DDP strategy, same processes
        assert lit[0]["events"] >= 2 and lit[0]["plan"] == lit[1]["plan"]
        assert lit[0]["ddp_holds_current_params"] and lit[1]["ddp_holds_current_params"]
    want, plan = reference()
    assert plan == meta[0]["plan"]
    want.update({k: v for k, v in ranks[0].items() if k.startswith("lightning/")})
    assert set(want) == set(ranks[0])
    diff = max(float((ranks[0][k] - want[k]).abs().max()) for k in want)
    print(f"max abs diff DDP vs one process: {diff:.3e}")
    assert diff < 1e-10
