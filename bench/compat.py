"""Compatibility matrix: ecospa on many architectures, built from small configs with random weights.

    python bench/compat.py                      # every row; writes bench/results/compat.json and
                                                # docs/compatibility.md
    python bench/compat.py --only llama,bert    # a few rows (substring match), nothing written
    .venv-timm/bin/python bench/compat.py --only timm_ --json bench/results/compat_timm.json --no-md
    python bench/compat.py --merge bench/results/compat_timm.json   # rows this env skips, from there

For each architecture (no downloads: transformers config classes, timm's own configs when timm
imports): ``auto_couple`` on example inputs, then ``prune`` with a random third of every exact
coupling's units removed, and the pruned model's outputs compared with the dense model whose
removed slices are zeroed (relative error, all output tensors, fp32). Uses only the public API.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import re
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import ecospa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench.` importable
    sys.path.insert(0, str(ROOT))
TOL = 1e-5
KINDS = ("qk", "vo", "ffn", "glu", "linear")

from bench.compat_archs import ARCHS, Arch  # noqa: E402  (after sys.path)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _run(model, inputs: dict):
    with torch.no_grad():
        return [t.detach().clone() for t in _tensors(model(**inputs)) if t.is_floating_point()]


def _rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    if len(got) != len(ref) or not ref:
        return float("inf")
    worst = 0.0
    for a, b in zip(got, ref):
        if a.shape != b.shape or not torch.isfinite(a).all():
            return float("inf")
        den = b.double().norm().item()
        num = (a.double() - b.double()).norm().item()
        worst = max(worst, num / den if den > 0 else num)
    return worst


def reason_group(reason: str) -> str:
    """A reason without the node and layer that make it unique: ``rms_norm over channels in
    model.layers.*.self_attn.q_norm``."""
    r = re.sub(r" at \S+ \((aten\.[\w.]+)\) in ", r" (\1) in ", reason)
    r = re.sub(r"(?<=\.)\d+(?=\.)|(?<=_)\d+\b", "*", r)
    r = re.sub(r"\bhead\d+\b", "head*", r)
    return r


def execution(cg) -> dict[str, int]:
    """How the exact couplings can run after pruning: how many are ``compact`` (channels simply
    vanish) and how many need their attention region rewritten (``scatter`` layout: narrow
    graph, or the exact scatter fallback)."""
    return dict(Counter({s.layout for s in c.sites}.pop() if len({s.layout for s in c.sites}) == 1
                        else "mixed" for c in cg if c.sites))


def regions(model) -> dict:
    """What the pruned model's attention regions ran (``ecospa.execution_report``), counting the
    outermost regions (an inner one only runs when its outer one falls back)."""
    reps = ecospa.execution_report(model)
    paths = [r.path for r in reps]
    outer = [r for r in reps if not any(p != r.path and (p == "" or r.path.startswith(p + ".")) for p in paths)]
    return {"narrow": sum(r.narrow for r in outer), "fallback": sum(not r.narrow for r in outer),
            "reasons": sorted({x for r in outer for x in r.reasons})[:3]}


def random_plan(cg, rng: random.Random, frac: float = 1 / 3) -> dict:
    """A random ``frac`` of every exact coupling's units (at least one, never all)."""
    plan = {}
    for c in cg:
        if c.width >= 2:
            plan[c] = sorted(rng.sample(range(c.width), min(c.width - 1, max(1, round(c.width * frac)))))
    return plan


def masked_copy(model, plan: dict):
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for c, idx in plan.items():
            units = c.units()
            for i in idx:
                for name, dim, j in units[i]:
                    params[name].select(dim, j).zero_()
    return ref


def _names(params) -> list[str]:
    """Parameter names with layer numbers folded: ``encoder.block.*.layer.*.x.weight``, unique."""
    return sorted({re.sub(r"(?<=\.)\d+(?=\.)", "*", p) for p in params})


def check(arch: Arch, seed: int = 0, **prune_kw) -> dict:
    """Build, discover, prune a third of every exact coupling, compare with the masked model."""
    row: dict[str, Any] = {"model": arch.name, "family": arch.family, "needs": arch.needs}
    try:
        __import__(arch.needs)
    except Exception as exc:  # noqa: BLE001  (torchvision may fail to import beside this torch)
        row.update(status="skipped", error=f"{arch.needs} not importable here ({type(exc).__name__})")
        return row
    stage = "build"
    try:
        torch.manual_seed(seed)
        model, inputs = arch.build()
        row["class"] = type(model).__name__
        row["params"] = sum(p.numel() for p in model.parameters())
        stage = "auto_couple"
        t0 = time.perf_counter()
        cg = ecospa.auto_couple(model, inputs)
        row["auto_couple_s"] = round(time.perf_counter() - t0, 3)
        row["couplings"] = {k: n for k in KINDS if (n := sum(c.kind == k for c in cg))}
        groups: dict[str, Counter] = {}
        for c in cg.inexact:
            groups.setdefault(reason_group(c.reason), Counter())[c.kind] += 1
        row["inexact"] = [{"reason": r, "kinds": dict(k), "count": sum(k.values())} for r, k in groups.items()]
        row["execution"] = execution(cg)
        used = {t.param for c in cg.all for t in c.tables}
        row["uncoupled"] = _names(n for n, _ in model.named_parameters() if n not in used)
        stage = "prune"
        plan = random_plan(cg, random.Random(f"{arch.name}-{seed}"))
        ref = _run(masked_copy(model, plan), inputs)
        t0 = time.perf_counter()
        ecospa.prune(model, plan, **prune_kw)
        row["prune_s"] = round(time.perf_counter() - t0, 3)
        row["params_after"] = sum(p.numel() for p in model.parameters())
        stage = "forward"
        row["max_rel_err"] = _rel_err(_run(model, inputs), ref)
        row["regions"] = regions(model)
        ok = row["max_rel_err"] <= TOL and (not plan or row["params_after"] < row["params"])
        row["status"] = "ok" if ok else "fail"
        if not ok:
            row["error"] = f"pruned != masked dense (rel err {row['max_rel_err']:.1e})"
    except Exception as exc:  # noqa: BLE001  (every failure is a row of the matrix)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        row.update(status="fail", stage=stage, error=f"{type(exc).__name__} in {stage}: {first[:400]}",
                   traceback=traceback.format_exc(limit=-4))
    return row


def diagnose(arch: Arch, row: dict) -> None:
    """For a row that failed after discovery: does the scatter executor (``narrow=False``) prune
    it exactly? Then the failure is the narrow executor's. Says so in ``row["diagnosis"]``."""
    if row["status"] != "fail" or row.get("stage") not in ("prune", "forward") and "max_rel_err" not in row:
        return
    try:
        again = check(arch, narrow=False)
    except TypeError:  # an ecospa without the narrow executor
        return
    if again["status"] == "ok":
        row["diagnosis"] = (f"the scatter executor (prune(..., narrow=False)) prunes it exactly "
                            f"(rel err {again['max_rel_err']:.1e}): the failure is in the narrow executor")
    else:
        row["diagnosis"] = f"the scatter executor fails too: {again.get('error', '')}"


# -- report -------------------------------------------------------------------------------------

def _fmt_counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) if d else "-"


def _fmt_err(row: dict) -> str:
    e = row.get("max_rel_err")
    return "-" if e is None else f"{e:.1e}"


def markdown(rows: list[dict], meta: dict) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    attn = [r for r in ok if not any({"qk", "vo"} & set(g["kinds"]) for g in r.get("inexact", []))]
    merged = sorted({r["env"] for r in rows if r.get("env")})
    lines = [
        "# Compatibility matrix",
        "",
        f"Produced by `{meta['command']}` ({meta['seconds']:.0f} s) with torch {meta['torch']}, "
        f"transformers {meta.get('transformers', '-')}, timm {meta.get('timm', 'not importable')}, on "
        f"{meta['machine']}" + (f"; rows marked * come from a run with {', '.join(merged)} (`--merge`)." if merged else "."),
        "Every model is built from a small config with random weights (hidden 64, 2 layers, 4 heads, "
        "2 KV heads where the architecture has GQA, FFN 96); `auto_couple` runs on example inputs, "
        "`prune` removes a random third of every exact coupling's units, and the pruned outputs are "
        "compared with the dense model whose removed slices are zeroed (max relative error over "
        f"all output tensors, fp32; pass: <= {TOL:.0e} and fewer parameters).",
        "",
        f"**{len(ok)} of {len(rows)} architectures prune exactly; {len(attn)} of them have no inexact "
        "qk or vo coupling.** Every model has one inexact coupling per residual stream (LayerNorm or "
        "RMSNorm over the hidden channels). Inexact couplings are never pruned; the reasons are "
        "listed below the table.",
        "",
        "Columns: *couplings*: the exact couplings by kind; *inexact*: how many are not exact; "
        "*execution*: how the exact ones run after pruning (`compact`: the channels simply vanish; "
        "`scatter`: their attention region is rewritten); *narrow regions*: of the attention "
        "regions (`ecospa.execution_report`), how many ran a narrow graph at the kept widths / how "
        "many ran the exact scatter fallback at the dense head width (reasons below); "
        "*auto_couple s*: the whole discovery (capture, channel flow, couplings).",
        "",
        "| model | family | status | couplings | inexact | execution | narrow regions | max rel err | params kept | auto_couple s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = f"{r['params_after'] / r['params']:.0%}" if r.get("params_after") else "-"
        inexact = sum(g["count"] for g in r.get("inexact", []))
        name = r["model"] + (" *" if r.get("env") else "")
        reg = r.get("regions")
        narrow = f"{reg['narrow']}/{reg['narrow'] + reg['fallback']}" if reg and (reg["narrow"] or reg["fallback"]) else "-"
        lines.append(f"| {name} | {r['family']} | {r['status']} | {_fmt_counts(r.get('couplings', {}))} | "
                     f"{inexact or '-'} | {_fmt_counts(r.get('execution', {}))} | {narrow} | {_fmt_err(r)} | "
                     f"{kept} | {r.get('auto_couple_s', '-')} |")
    fell = [r for r in rows if r.get("regions", {}).get("fallback")]
    lines += ["", "## Regions that ran the exact fallback", ""]
    lines += [f"- **{r['model']}**: {r['regions']['fallback']} region(s): " + "; ".join(r["regions"]["reasons"])
              for r in fell] or ["None: every attention region ran narrow."]
    bad = [r for r in rows if r["status"] != "ok"]
    lines += ["", "## Failures and skipped rows", ""]
    lines += [f"- **{r['model']}** ({r['status']}): {r.get('error', '')}."
              + (f" Diagnosis: {r['diagnosis']}." if r.get("diagnosis") else "") for r in bad] or ["None."]
    lines += ["", "## Inexact couplings, by reason", "",
              "Layer numbers, heads and node names are folded (`*`).", ""]
    for r in rows:
        for g in r.get("inexact", []):
            lines.append(f"- **{r['model']}**: {g['count']} ({_fmt_counts(g['kinds'])}): {g['reason']}")
    lines += ["", "## Parameters in no coupling", "",
              "Weights whose channels never meet a partner in a product (patch convolutions, position "
              "bias tables, scalars): ecospa leaves them alone.", ""]
    lines += [f"- **{r['model']}**: " + ", ".join(f"`{n}`" for n in r["uncoupled"]) for r in rows if r.get("uncoupled")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of row names")
    ap.add_argument("--json", default=str(ROOT / "bench/results/compat.json"))
    ap.add_argument("--md", default=str(ROOT / "docs/compatibility.md"))
    ap.add_argument("--no-md", action="store_true", help="write no Markdown")
    ap.add_argument("--merge", action="append", default=[],
                    help="a JSON written by another run: its rows replace the rows skipped here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pick = [s for s in args.only.split(",") if s]
    archs = [a for a in ARCHS if not pick or any(s in a.name for s in pick)]
    t0 = time.perf_counter()
    rows = []
    for a in archs:
        row = check(a)
        diagnose(a, row)
        rows.append(row)
        print(f"{a.name:14s} {row['status']:8s} {_fmt_counts(row.get('couplings', {})):40s} "
              f"err {_fmt_err(row):8s} {row.get('error', '')[:150]}", flush=True)
    meta = {"command": "python bench/compat.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": time.perf_counter() - t0, "torch": torch.__version__,
            "machine": f"{platform.machine()} CPU, 1 thread"}
    for lib in ("transformers", "timm"):
        try:
            meta[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001
            pass
    for path in args.merge:
        other = json.loads(Path(path).read_text())
        theirs = {r["model"]: {**r, "env": f"torch {other['meta']['torch']}"} for r in other["rows"]}
        rows = [theirs.get(r["model"], r) if r["status"] == "skipped" else r for r in rows]
    if pick and args.json == str(ROOT / "bench/results/compat.json") and not args.no_md:
        return 0  # a partial look writes nothing by default
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if not args.no_md:
        Path(args.md).write_text(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
