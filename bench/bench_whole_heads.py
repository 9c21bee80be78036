"""Whole heads removed: does ecospa's pruned model run like a model built with fewer heads?

    python bench/bench_whole_heads.py            # writes bench/results/whole_heads.{json,md}

Subject: the nn.Linear GPT-2 of ``bench/speed/subjects.py`` (12 layers, width 768, 12 heads of
64, FFN 3072). Plan: every second head (all its q.k and v.o units) and half of every FFN removed,
with ``ecospa.prune`` (public API). References, timed interleaved round by round with it (median
of per-round ratios, ``--threads`` torch threads, no grad): the dense model, and the physical
reference, a model of the same class built directly with 6 heads and FFN 1536 (same parameter
count). The narrow graph leaves the removed heads out (``execution_report`` must show every
attention region narrow), so the target is the physical reference's speed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ecospa  # noqa: E402
from bench.speed.subjects import LinearGPT  # noqa: E402

OUT = Path(os.environ.get("ECOSPA_BENCH_OUT", Path(__file__).resolve().parent / "results"))


def plan_for(cg) -> dict:
    plan = {}
    for c in cg:
        if c.kind in ("qk", "vo"):
            if int(c.name.rsplit("head", 1)[1]) % 2 == 0:
                plan[c] = list(range(c.width))
        else:
            plan[c] = list(range(c.width // 2))
    return plan


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dense = LinearGPT(n_layer=a.layers).eval()
    pruned = copy.deepcopy(dense)
    cg = ecospa.auto_couple(pruned, (torch.zeros(1, 8, dtype=torch.long),))
    ecospa.prune(pruned, plan_for(cg), couplings=cg)
    physical = LinearGPT(n_layer=a.layers, n_head=6, ffn=1536).eval()
    x = torch.randint(0, 50257, (a.batch, a.tokens))
    models = {"dense": dense, "ecospa (heads left out)": pruned, "physical reference": physical}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m.body(x[:, :64])  # warm-up: the narrow graph is built at the first call
            m.body(x)
        for r in range(a.rounds):
            for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                t0 = time.perf_counter()
                models[k].body(x)
                times[k].append(time.perf_counter() - t0)
    rep = ecospa.execution_report(pruned)
    res = {"command": "python bench/bench_whole_heads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "torch": torch.__version__, "threads": a.threads, "tokens": a.tokens, "batch": a.batch,
           "layers": a.layers, "rounds": a.rounds, "params": params,
           "all_narrow": bool(rep) and all(r.narrow for r in rep),
           "median_s": {k: statistics.median(v) for k, v in times.items()},
           "speedup_vs_dense": {k: statistics.median(d / t for d, t in zip(times["dense"], v)) for k, v in times.items()},
           "vs_physical": statistics.median(p / t for p, t in zip(times["physical reference"],
                                                                 times["ecospa (heads left out)"]))}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "whole_heads.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["# Whole heads removed: ecospa vs a model built with fewer heads", "",
             f"`{res['command'].strip()}`: nn.Linear GPT-2 ({a.layers} layers, width 768), body forward "
             f"(no lm_head) at {a.batch}x{a.tokens} tokens, torch {torch.__version__}, {a.threads} thread(s), "
             f"{a.rounds} rounds interleaved, median of per-round ratios. Every attention region narrow: "
             f"{res['all_narrow']}.", "",
             "| model | parameters (M) | median s | speedup vs dense |", "|---|---|---|---|"]
    for k in models:
        lines.append(f"| {k} | {params[k] / 1e6:.2f} | {res['median_s'][k]:.3f} | {res['speedup_vs_dense'][k]:.2f}x |")
    lines += ["", f"ecospa's pruned model runs at **{res['vs_physical']:.2f}x** the physical reference's speed.", ""]
    (OUT / "whole_heads.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
