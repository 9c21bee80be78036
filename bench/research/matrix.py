"""Research-code compatibility matrix: ecospa on models built by torchtune, litgpt, x-transformers
and torchtitan (tiny configs, random weights, no downloads). Public ecospa API only.

    /tmp/venv-xt/bin/python bench/research/matrix.py            # every row; writes the JSON, the
                                                               # Markdown and docs/compatibility.md
    /tmp/venv-xt/bin/python bench/research/matrix.py --only litgpt --no-write   # a few rows

The venv comes from ``bench/research/setup_venv.sh VENV``. For each model: ``auto_couple`` on
a small input; couplings found by kind against the counts the config implies; half of every
exact coupling's units removed (the same number in every head group: uniform widths) with
``ecospa.prune`` (the optimizer passed along); pruned vs the dense model with the removed slices
zeroed (max relative error of the logits, fp32, at two sequence lengths); which path each
attention region ran (``ecospa.execution_report``) for the prefill and, where the library has a
KV cache, for a teacher-forced decode (compared with the masked model's decode); forward speed
pruned / dense (interleaved rounds, median ratio, 1 x 256 tokens, 1 thread); one training step
after the prune; ``ecospa.save`` / ``ecospa.load`` round trip; and what Torch-Pruning's
``MetaPruner`` (generic call: 50% channels, embeddings and the LM head ignored) does to the
same dense model, in a child process with a timeout.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

import ecospa

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.compat import masked_copy  # noqa: E402
from bench.research.models import Spec, _call, _tokens, all_specs, logits_of  # noqa: E402

TOL = 1e-5
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- research-matrix:begin -->", "<!-- research-matrix:end -->"


# -- helpers (public API only) ------------------------------------------------------------------

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape or not torch.isfinite(a).all():
        return float("inf")
    den = b.double().norm().item()
    num = (a.double() - b.double()).norm().item()
    return num / den if den > 0 else num


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(_call(model, inputs)).detach().float().clone()


def uniform_half_plan(cg, seed: str) -> dict:
    """A random half of every exact coupling's units: every head group keeps the same count."""
    rng = random.Random(seed)
    return {c: sorted(rng.sample(range(c.width), c.width // 2)) for c in cg if c.width >= 2}


def fold(reason: str) -> str:
    r = re.sub(r" at \S+ \((aten\.[\w.]+)\) in ", r" (\1) in ", reason)
    r = re.sub(r"(?<=\.)\d+(?=\.)|(?<=_)\d+\b", "*", r)
    return re.sub(r"\bhead\d+\b", "head*", r)


def region_snapshot(model) -> dict:
    """Outermost attention regions (an inner one only runs when its outer one falls back)."""
    reps = ecospa.execution_report(model)
    paths = [r.path for r in reps]
    outer = [r for r in reps if not any(p != r.path and (p == "" or r.path.startswith(p + ".")) for p in paths)]
    return {r.path: (r.narrow_calls, r.fallback_calls, r.reasons, r.kv_cache) for r in outer}


def region_delta(before: dict, after: dict) -> dict:
    narrow = fallback = 0
    reasons: Counter = Counter()
    kv = set()
    for path, (n, f, rs, k) in after.items():
        n0, f0, _, _ = before.get(path, (0, 0, (), None))
        dn, df = n - n0, f - f0
        if dn or df:
            if df == 0:
                narrow += 1
            else:
                fallback += 1
                reasons.update(fold(x) for x in rs[:1])
            if k:
                kv.add(k)
    return {"narrow": narrow, "fallback": fallback, "reasons": [r for r, _ in reasons.most_common()],
            "kv_cache": sorted(kv)}


def kinds(cg) -> dict:
    c = Counter("ffn" if x.kind in ("ffn", "glu") else x.kind for x in cg)
    return {k: c.get(k, 0) for k in ("qk", "vo", "ffn")} | ({"other": sum(v for k, v in c.items()
                                                              if k not in ("qk", "vo", "ffn"))}
                                                          if any(k not in ("qk", "vo", "ffn") for k in c) else {})


def speed_ratio(dense, pruned, inputs, rounds: int = 7, reps: int = 3) -> dict:
    """pruned / dense forward time: per round each model runs ``reps`` times (order alternating
    round by round), the best of each counts; the ratio is the median over rounds."""
    for m in (dense, pruned):
        forward(m, inputs)
    ratios, td, tp_ = [], [], []
    for r in range(rounds):
        times = {}
        order = (("dense", dense), ("pruned", pruned)) if r % 2 == 0 else (("pruned", pruned), ("dense", dense))
        for name, m in order:
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                forward(m, inputs)
                best = min(best, time.perf_counter() - t0)
            times[name] = best
        ratios.append(times["pruned"] / times["dense"])
        td.append(times["dense"])
        tp_.append(times["pruned"])
    return {"ratio": statistics.median(ratios), "dense_ms": 1e3 * statistics.median(td),
            "pruned_ms": 1e3 * statistics.median(tp_)}


def train_step(model, spec: Spec, opt, inputs) -> float:
    model.train()
    out = logits_of(_call(model, inputs))
    targets = _tokens(out.shape[0], out.shape[1], seed=7)
    loss = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), targets.reshape(-1) % out.shape[-1])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


# -- Torch-Pruning (child process) --------------------------------------------------------------

def _tp_child(model, inputs, q):
    try:
        torch.set_num_threads(1)
        import torch_pruning as tp
        zeroed = copy.deepcopy(model)
        names = {m: n for n, m in model.named_modules()}
        zmods = dict(zeroed.named_modules())
        ignored = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)
                   or (isinstance(m, torch.nn.Linear) and m.out_features == 256)]
        ex = inputs if isinstance(inputs, dict) else tuple(inputs)
        pruner = tp.pruner.MetaPruner(model, example_inputs=ex, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=ignored)
        unmodelled = set()
        n_groups = 0
        for group in pruner.step(interactive=True):
            n_groups += 1
            for dep, idxs in group:
                mod = dep.target.module
                h = getattr(dep.handler, "__name__", str(dep.handler))
                zm = zmods.get(names.get(mod, None)) if names.get(mod) is not None else None
                with torch.no_grad():
                    if isinstance(mod, torch.nn.Linear) and zm is not None:
                        if "out" in h:
                            zm.weight[idxs] = 0
                            if zm.bias is not None:
                                zm.bias[idxs] = 0
                        elif "in" in h:
                            zm.weight[:, idxs] = 0
                    elif isinstance(mod, torch.nn.Embedding) and zm is not None and "out" in h:
                        zm.weight[:, idxs] = 0
                    elif zm is not None and "out" in h and hasattr(zm, "weight") and zm.weight is not None \
                            and zm.weight.dim() == 1:
                        zm.weight[idxs] = 0
                        if getattr(zm, "bias", None) is not None:
                            zm.bias[idxs] = 0
                    elif ("out" in h or "in" in h) and not type(mod).__name__.startswith("_"):
                        unmodelled.add(type(mod).__name__)
            group.prune()
        n_before = sum(p.numel() for p in zeroed.parameters())
        n_after = sum(p.numel() for p in model.parameters())
        got = forward(model, inputs)
        ref = forward(zeroed, inputs)
        err = rel_err(got, ref)
        q.put({"groups": n_groups, "kept": n_after / n_before, "rel_err": err,
               "unmodelled": sorted(unmodelled)})
    except BaseException as exc:  # noqa: BLE001
        q.put({"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"})


def torch_pruning(dense, inputs, timeout: float = 60) -> dict:
    try:
        import torch_pruning  # noqa: F401
    except Exception:  # noqa: BLE001
        return {"word": "n/a", "reason": "torch-pruning not importable"}
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_tp_child, args=(copy.deepcopy(dense), inputs, q))
    p.start()
    try:
        res = q.get(timeout=timeout)
    except Exception:  # noqa: BLE001
        res = {"error": f"timeout after {timeout:.0f} s"}
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    if "error" in res:
        return {"word": "crash", "reason": res["error"]}
    if res["groups"] == 0 or res["kept"] >= 1:
        return {"word": "no-op", "reason": "pruned nothing"}
    if res["rel_err"] <= 1e-4:
        return {"word": "works", "reason": f"kept {res['kept']:.0%} of params, matches zeroed dense "
                                           f"({res['rel_err']:.0e})"}
    why = "changes the function" if res["rel_err"] < float("inf") else "output shape/NaN"
    return {"word": "inexact", "reason": f"{why}: rel err {res['rel_err']:.2g} vs the dense model with "
                                         f"its removed channels zeroed (kept {res['kept']:.0%})"
                                         + (f"; unmodelled {','.join(res['unmodelled'])}" if res["unmodelled"] else "")}


# -- one row ------------------------------------------------------------------------------------

def run_spec(spec: Spec, *, speed: bool = True, tp: bool = True, seed: int = 0) -> dict:
    row: dict = {"model": spec.name, "lib": spec.lib, "notes": spec.notes, "expected": spec.expected}
    try:
        mod = __import__(spec.lib)
        row["lib_version"] = getattr(mod, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        row.update(status="skipped", error=f"{spec.lib} not importable ({type(exc).__name__})")
        return row
    stage = "build"
    try:
        torch.manual_seed(seed)
        model = spec.build().float().eval()
        ex = spec.inputs(2, 16)
        check = spec.inputs(1, 23)
        dense = copy.deepcopy(model)
        row["params"] = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if spec.trainable:
            stage = "dense train step"
            train_step(model, spec, opt, ex)
            dense = copy.deepcopy(model)
        stage = "auto_couple"
        t0 = time.perf_counter()
        cg = ecospa.auto_couple(model, ex)
        row["auto_couple_s"] = round(time.perf_counter() - t0, 2)
        row["found"] = kinds(cg)
        row["couplings_ok"] = all(row["found"].get(k, 0) == v for k, v in spec.expected.items())
        inexact = Counter((c.kind, fold(c.reason)) for c in cg.inexact)
        row["inexact"] = [{"kind": k, "reason": r, "count": n} for (k, r), n in inexact.items()]
        stage = "prune"
        plan = uniform_half_plan(cg, spec.name)
        masked = masked_copy(model, plan)
        refs = [forward(masked, x) for x in (ex, check)]
        t0 = time.perf_counter()
        ecospa.prune(model, plan, optimizer=opt)
        row["prune_s"] = round(time.perf_counter() - t0, 2)
        row["params_after"] = sum(p.numel() for p in model.parameters())
        stage = "prefill"
        before = region_snapshot(model)
        row["rel_err"] = max(rel_err(forward(model, x), r) for x, r in zip((ex, check), refs))
        row["exact"] = row["rel_err"] <= TOL
        row["prefill"] = region_delta(before, region_snapshot(model))
        if spec.decode is not None:
            stage = "decode"
            try:
                prompt, cont = _tokens(2, 12, seed=3), _tokens(2, 4, seed=4)
                ref = spec.decode(masked, prompt, cont)
                before = region_snapshot(model)
                got = spec.decode(model, prompt, cont)
                row["decode"] = region_delta(before, region_snapshot(model))
                row["decode"]["rel_err"] = max(rel_err(a, b) for a, b in zip(got, ref))
            except Exception as exc:  # noqa: BLE001
                row["decode"] = {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"}
        if speed:
            stage = "speed"
            row["speed"] = speed_ratio(dense, model, spec.inputs(1, 256))
        stage = "train"
        if spec.trainable:
            try:
                loss = train_step(model, spec, opt, ex)
                after = forward(model, ex)
                row["train"] = "ok" if (torch.isfinite(after).all() and loss == loss) else "non-finite"
            except Exception as exc:  # noqa: BLE001
                row["train"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        else:
            row["train"] = "n/a"
        stage = "save/load"
        try:
            with tempfile.TemporaryDirectory() as d:
                ecospa.save(model, Path(d) / "ck")
                torch.manual_seed(seed + 1)
                fresh = spec.build().float().eval()
                loaded = ecospa.load(Path(d) / "ck", fresh, example_inputs=ex)
                row["save_load_err"] = rel_err(forward(loaded.eval(), ex), forward(model, ex))
        except Exception as exc:  # noqa: BLE001
            row["save_load_err"] = None
            row["save_load_error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        if tp:
            stage = "torch-pruning"
            row["torch_pruning"] = torch_pruning(dense, ex)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        row.update(status="fail", stage=stage, error=f"{type(exc).__name__} in {stage}: {first[:400]}",
                   traceback=traceback.format_exc(limit=-6))
    return row


# -- report -------------------------------------------------------------------------------------

def _counts(d: dict | None) -> str:
    return "-" if not d else " ".join(f"{k} {v}" for k, v in d.items())


def _path(d: dict | None) -> str:
    if not d:
        return "-"
    if "error" in d:
        return "error"
    s = f"{d['narrow']}/{d['narrow'] + d['fallback']} narrow"
    if "rel_err" in d:
        s += f", err {d['rel_err']:.0e}"
    return s


def _saveload(r: dict) -> str:
    e = r.get("save_load_err")
    return "error" if e is None else ("ok" if e <= TOL else f"err {e:.0e}")


def markdown(rows: list[dict], meta: dict) -> str:
    out = [
        f"Produced by `{meta['command']}` ({meta['seconds']:.0f} s) with torch {meta['torch']}, "
        + ", ".join(f"{k} {v}" for k, v in meta["libs"].items())
        + f", on {meta['machine']}, 1 thread. Tiny random-weight models (hidden 128, 2 layers, 4 heads of 32, "
        "FFN 256, vocab 256) built from each library's own builders/configs; half of every exact "
        "coupling's units removed (same count per head group); *exact*: max relative error of the "
        "logits against the dense model with the removed slices zeroed (fp32, two sequence lengths, "
        f"pass <= {TOL:g}); *couplings*: found (expected from the config); *prefill* / *decode*: "
        "attention regions that ran narrow (`ecospa.execution_report`), decode teacher-forced through "
        "the library's own KV cache and compared with the masked model's; *speed*: pruned / dense "
        "forward time at 1 x 256 tokens (median of 7 interleaved rounds; < 1 is faster); *train*: a "
        "loss.backward + AdamW step after the prune (optimizer passed to `prune`); *save/load*: "
        "`ecospa.save` then `ecospa.load` into a fresh dense model, same logits; *Torch-Pruning*: "
        "a generic `MetaPruner` call (50% channels, embeddings and LM head ignored) on the same dense "
        "model, compared with that model with the channels it removed zeroed.",
        "",
        "| model | couplings qk / vo / ffn (expected) | exact | prefill | decode | speed | train | save/load | Torch-Pruning |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['model']} | {r.get('status')}: {r.get('error', '')[:120]} | | | | | | | |")
            continue
        f, e = r["found"], r["expected"]
        cpl = " / ".join(f"{f.get(k, 0)}" + ("" if f.get(k, 0) == e[k] else f" ({e[k]})") for k in ("qk", "vo", "ffn"))
        if f.get("other"):
            cpl += f" + {f['other']} other"
        sp = r.get("speed")
        tpr = r.get("torch_pruning", {})
        out.append(
            f"| {r['model']} | {cpl}{'' if r['couplings_ok'] else ' ✗'} | "
            f"{'yes' if r['exact'] else 'NO'} {r['rel_err']:.0e} | {_path(r['prefill'])} | {_path(r.get('decode'))} | "
            f"{'-' if not sp else format(sp['ratio'], '.2f') + 'x'} | {r['train']} | {_saveload(r)} | "
            f"{tpr.get('word', '-')} |")
    notes = []
    for r in rows:
        if r["status"] != "ok":
            notes.append(f"- **{r['model']}** {r['status']}: `{r.get('error', '')}`")
            continue
        for where in ("prefill", "decode"):
            d = r.get(where) or {}
            if d.get("fallback"):
                notes.append(f"- **{r['model']}** {where} fallback: " + "; ".join(f"`{x}`" for x in d["reasons"]))
            if d.get("error"):
                notes.append(f"- **{r['model']}** {where} error: `{d['error']}`")
            if where == "decode" and d.get("rel_err", 0) > TOL:
                notes.append(f"- **{r['model']}** decode inexact: rel err {d['rel_err']:.1e}")
        if not r["exact"]:
            notes.append(f"- **{r['model']}** prefill inexact: rel err {r['rel_err']:.1e}")
        if r.get("save_load_error"):
            notes.append(f"- **{r['model']}** save/load: `{r['save_load_error']}`")
        if r["train"] not in ("ok", "n/a"):
            notes.append(f"- **{r['model']}** train: `{r['train']}`")
        if not r["couplings_ok"]:
            inex = "; ".join(f"{i['count']} {i['kind']}: `{i['reason']}`" for i in r["inexact"]
                             if "over channels" not in i["reason"])  # not the residual-stream norms
            notes.append(f"- **{r['model']}** couplings {_counts(r['found'])}, expected {_counts(r['expected'])}"
                         + (f"; inexact: {inex}" if inex else ""))
        sp = r.get("speed")
        if sp and sp["ratio"] > 1:
            notes.append(f"- **{r['model']}** pruned slower than dense: {sp['ratio']:.2f}x "
                         f"({sp['pruned_ms']:.2f} vs {sp['dense_ms']:.2f} ms)")
    out += ["", "Notes (rows that are inexact, fall back, are slower than dense, or differ from the expected counts):", ""]
    out += notes or ["- none"]
    out += ["", "Torch-Pruning, by row:", ""]
    out += [f"- **{r['model']}**: {r['torch_pruning']['word']}: {r['torch_pruning']['reason']}"
            for r in rows if r.get("torch_pruning")]
    return "\n".join(out) + "\n"


def write_doc(md: str) -> None:
    text = DOC.read_text()
    section = f"{BEGIN}\n## Research code\n\n{md}{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of model names")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--from-json", action="store_true",
                    help="re-render the Markdown and the docs section from bench/results/research_matrix.json")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads((RESULTS / "research_matrix.json").read_text())
        md = markdown(data["rows"], data["meta"])
        print(md)
        if not args.no_write:
            (RESULTS / "research_matrix.md").write_text("# Research-code compatibility matrix\n\n" + md)
            write_doc(md)
        return 0
    torch.set_num_threads(1)
    specs = all_specs()
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        specs = [s for s in specs if any(k in s.name for k in keys)]
    t0 = time.perf_counter()
    rows = []
    for s in specs:
        t1 = time.perf_counter()
        r = run_spec(s, speed=not args.no_speed, tp=not args.no_tp)
        r["seconds"] = round(time.perf_counter() - t1, 1)
        print(f"{s.name}: {r.get('status')} {r.get('error', '')} ({r['seconds']} s)", file=sys.stderr, flush=True)
        rows.append(r)
    libs = {}
    for name in ("torchtune", "litgpt", "x_transformers", "torchtitan", "torch_pruning"):
        try:
            from importlib.metadata import version
            libs[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001
            pass
    meta = {"command": "python bench/research/matrix.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
            "seconds": time.perf_counter() - t0, "torch": torch.__version__, "libs": libs,
            "machine": f"{platform.machine()} CPU", "ecospa": ecospa.__version__}
    md = markdown(rows, meta)
    print(md)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "research_matrix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        (RESULTS / "research_matrix.md").write_text("# Research-code compatibility matrix\n\n" + md)
        write_doc(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
