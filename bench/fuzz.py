"""Fuzzing beyond the CI budget: the hypothesis properties of the test suite, thousands of examples each.

    python bench/fuzz.py --time-budget 4000               # 2,000 examples per property, or 4000 s
    python bench/fuzz.py --max-examples 20 --time-budget 300   # a quick look
    python bench/fuzz.py --only prune_attention,optimizer_mlp

Properties (random MLP stacks and attention blocks from ``tests/strategies.py``; the bodies are
the suite's own property tests, run here with a larger budget):

- ``discovery_*``: ``auto_couple`` finds exactly the couplings the generator built in
  (``tests/analysis/test_discover_properties.py``);
- ``prune_*``: any removal gives the dense model with those slices zeroed, for another input
  shape too, and attention runs on the narrow graph (``tests/pruning/test_prune_properties.py``);
- ``optimizer_*``: a pruned model trained a few steps with Adam/AdamW/SGD (its optimizer state
  sliced by ``prune``), one or two rounds of pruning, equals the dense model trained with the
  removed slices held at zero (parameters, gradients, moments) on every kept entry
  (``tests/training/test_reliability_properties.py``);
- ``save_load_*``: ``ecospa.save`` then ``ecospa.load`` into a fresh dense copy gives the same
  parameters, optimizer state and outputs; run only when ``ecospa.save``/``ecospa.load`` exist.
- ``narrow_calls``: sequences of 2-6 calls of a pruned attention block (kept across examples, so
  that narrow programs built for earlier calls are there to be wrongly reused), each varying the
  properties a capture can specialise on (``tests/narrow/guard_block.py``), every call equal to
  the masked dense model's (issue 17).

Each property runs in chunks (at most ``--chunk`` examples, a new hypothesis seed per chunk) until
``--max-examples`` examples, or until ``--time-budget`` wall seconds have gone on the whole run:
the unfinished property that has used the least time runs next, each chunk sized to its share of
the time left, so the cheap (MLP) properties reach the target and the time they leave goes to the
attention ones. A failing chunk is shrunk by hypothesis and recorded (error, falsifying example,
``@reproduce_failure`` blob), and fuzzing goes on with the next chunk. "examples" counts generated
examples that ran to the end (passed, or the first failure of a chunk); the replays of shrinking,
and the cases hypothesis abandoned because they ran out of data (overruns), are counted apart.

**Cost.** An example's time is almost all ``torch.export``: the capture of ``auto_couple``
(static shapes) and, for attention, the narrow program of each pruned block and call signature
(every dimension dynamic, several times dearer; ``ecospa/narrow/program.py`` turns
torch's fake-tensor cache off for it, about 35% less CPU, the same graph). CPU seconds per
example in bench/results/fuzz.json: MLP properties 0.04-0.07; attention discovery 0.12, prune
0.40, optimizer surgery 0.44, save/load 0.62 (two narrow exports, and the capture that ``load``
replays the removals with). Nothing is skipped or cached across examples: random specs almost
never repeat (1,472 distinct attention specs in 2,000 examples).
Results: ``bench/results/fuzz.json`` and ``bench/results/fuzz.md`` (rewritten after each chunk).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# name: (description, strategies, test module, test function or check function)
PROPERTIES = {
    "discovery_mlp": ("auto_couple == ground truth, random MLP stacks",
                      "mlp", "tests.analysis.test_discover_properties", "test_random_mlp_stack_discovery"),
    "discovery_attention": ("auto_couple == ground truth, random attention blocks",
                            "attn", "tests.analysis.test_discover_properties", "test_random_attention_block_discovery"),
    "prune_mlp": ("pruned == masked dense, random MLP stacks",
                  "mlp+data", "tests.pruning.test_prune_properties", "test_random_mlp_stack_prune"),
    "prune_attention": ("pruned == masked dense (ragged/uniform heads, 2 input shapes, narrow graph), "
                        "random attention blocks",
                        "attn+data+heads", "tests.pruning.test_prune_properties", "test_random_attention_block_prune"),
    "optimizer_mlp": ("optimizer surgery == masked dense training, random MLP stacks",
                      "mlp+data", "tests.training.test_reliability_properties", "check_optimizer_surgery"),
    "optimizer_attention": ("optimizer surgery == masked dense training, random attention blocks",
                            "attn+data", "tests.training.test_reliability_properties", "check_optimizer_surgery"),
    "save_load_mlp": ("save/load round trip (model, optimizer, outputs), random MLP stacks",
                      "mlp+data", "tests.training.test_reliability_properties", "check_save_load"),
    "save_load_attention": ("save/load round trip (model, optimizer, outputs), random attention blocks",
                            "attn+data", "tests.training.test_reliability_properties", "check_save_load"),
    "narrow_calls": ("a pruned block called with sequences that vary, after the first call, every "
                     "property a narrow program can specialise on (aliasing, optional and keyword "
                     "arguments, grad, train/eval, strides, autocast, sizes, attributes, buffers, "
                     "hooks) == masked dense, every call",
                     "calls", "tests.narrow.guard_block", "check_call_sequence"),
}
# slowest first, so that two processes finish together
ORDER = ["narrow_calls", "prune_attention", "optimizer_attention", "save_load_attention", "discovery_attention",
         "optimizer_mlp", "prune_mlp", "save_load_mlp", "discovery_mlp"]


def _strategies(kind: str):
    from hypothesis import strategies as st

    from tests.strategies import attention_blocks, mlp_stacks

    if kind == "calls":
        from tests.narrow.guard_block import call_specs

        return [st.lists(call_specs(), min_size=2, max_size=6), st.sampled_from(["ragged", "uniform"]),
                st.integers(0, 2), st.integers(0, 24).map(lambda i: i == 0)]
    parts = kind.split("+")
    out = [mlp_stacks() if parts[0] == "mlp" else attention_blocks()]
    if "data" in parts:
        out.append(st.data())
    if "heads" in parts:
        out.append(st.sampled_from(["ragged", "uniform"]))
    return out


def _body(module: str, name: str):
    import importlib

    fn = getattr(importlib.import_module(module), name)
    inner = getattr(getattr(fn, "hypothesis", None), "inner_test", None)
    return inner if inner is not None else fn


def _skip_reason(name: str) -> str | None:
    import ecospa

    if name.startswith("save_load") and not (hasattr(ecospa, "save") and hasattr(ecospa, "load")):
        return "not run: ecospa.save / ecospa.load do not exist in this checkout"
    return None


class _Property:
    """One property being fuzzed: its hypothesis body, strategies and running record."""

    def __init__(self, name: str, target: int, seed: int):
        desc, kind, module, fn_name = PROPERTIES[name]
        self.name, self.target, self.seed = name, target, seed
        self.rec = {"property": name, "description": desc, "target": target, "examples": 0,
                    "shrink_replays": 0, "overruns": 0, "chunks": 0, "failures": [], "seconds": 0.0,
                    "cpu_seconds": 0.0, "stopped": None}
        self.skip = _skip_reason(name)
        if self.skip:
            self.rec["stopped"] = self.skip
            return
        self.inner = _body(module, fn_name)
        self.strategies = _strategies(kind)

    @property
    def finished(self) -> bool:
        return self.skip is not None or self.rec["examples"] >= self.target

    def per_example(self) -> float | None:
        """Wall seconds per example so far (None before the first)."""
        n = self.rec["examples"] + self.rec["shrink_replays"]
        return self.rec["seconds"] / n if n else None

    def run_chunk(self, n: int) -> None:
        """``n`` examples under a new hypothesis seed; a failure is shrunk and recorded."""
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hseed

        rec, inner = self.rec, self.inner
        failed = [False]

        def counted(*args):
            try:
                inner(*args)
            except Exception:
                rec["shrink_replays" if failed[0] else "examples"] += 1
                failed[0] = True  # what hypothesis runs from now on is shrinking
                raise
            except BaseException:  # hypothesis ran out of data for this case: not an example
                rec["overruns"] += 1
                raise
            rec["shrink_replays" if failed[0] else "examples"] += 1

        # given() needs named positional parameters, one per strategy
        body = {1: lambda a: counted(a), 2: lambda a, b: counted(a, b),
                3: lambda a, b, c: counted(a, b, c),
                4: lambda a, b, c, d: counted(a, b, c, d)}[len(self.strategies)]
        chunk_seed = self.seed * 1_000_003 + rec["chunks"]
        test = hseed(chunk_seed)(settings(
            max_examples=n, deadline=None, database=None, print_blob=True, report_multiple_bugs=False,
            phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))(
                given(*self.strategies)(body)))
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            test()
        except Exception as e:  # a falsified property (after shrinking)
            notes = "\n".join(getattr(e, "__notes__", []))
            rec["failures"].append({
                "chunk": rec["chunks"], "seed": chunk_seed, "error": f"{type(e).__name__}: {e}"[:4000],
                "falsifying_example": notes[:6000],
                "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:],
            })
            print(f"[{self.name}] FAILURE in chunk {rec['chunks']}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        rec["seconds"] = round(rec["seconds"] + time.perf_counter() - w0, 1)
        rec["cpu_seconds"] = round(rec["cpu_seconds"] + time.process_time() - c0, 1)
        rec["chunks"] += 1


def fuzz(names: list[str], target: int, budget: float, chunk: int, seed: int, on_chunk=None) -> list[dict]:
    """Fuzz ``names`` until each has ``target`` examples or ``budget`` wall seconds are spent in all.

    Scheduling: the unfinished property that has used the least time runs next, a chunk sized to
    its fair share of the time left (at most ``chunk`` examples), so cheap properties reach the
    target and the time they leave goes to the expensive ones; no chunk starts after the budget.
    ``on_chunk(records)`` is called after every chunk (to write partial results).
    """
    import torch

    torch.set_num_threads(1)
    props = [_Property(n, target, seed) for n in names]
    t0 = time.perf_counter()
    while True:
        todo = [p for p in props if not p.finished]
        left = budget - (time.perf_counter() - t0)
        if not todo or left <= 0:
            break
        p = min(todo, key=lambda q: q.rec["seconds"])
        share = left / len(todo)
        rate = p.per_example()
        fits = 3 if rate is None else max(1, int(share / rate))
        n = max(1, min(chunk, p.target - p.rec["examples"], fits))
        p.run_chunk(n)
        r = p.rec
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(f"[{p.name}] {r['examples']}/{p.target} examples, {len(r['failures'])} failures, "
              f"{r['seconds']:.0f} s ({r['cpu_seconds']:.0f} s CPU); total {time.perf_counter() - t0:.0f} s, "
              f"max RSS {rss:.0f} MiB", flush=True)
        if on_chunk is not None:
            on_chunk([q.rec for q in props])
    for p in props:
        if p.rec["stopped"] is None:
            p.rec["stopped"] = "target reached" if p.finished else f"total time budget ({budget:.0f} s)"
    return [p.rec for p in props]


def _worker(args) -> list[dict]:
    names, target, budget, chunk, seed = args
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        return fuzz(names, target, budget, chunk, seed)
    except Exception as e:  # the harness itself broke: report it
        return [{"property": n, "description": PROPERTIES[n][0], "target": target, "examples": 0,
                 "shrink_replays": 0, "overruns": 0, "chunks": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                 "stopped": f"harness error: {e!r}",
                 "failures": [{"chunk": None, "seed": None, "error": f"harness: {type(e).__name__}: {e}",
                               "falsifying_example": "", "traceback": traceback.format_exc()[-4000:]}]}
                for n in names]


def _environment(args) -> dict:
    import hypothesis
    import torch

    import ecospa

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "max_examples": args.max_examples, "time_budget_s": args.time_budget, "chunk": args.chunk,
            "seed": args.seed, "jobs": args.jobs, "ecospa": ecospa.__version__, "torch": torch.__version__,
            "hypothesis": hypothesis.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "note": args.note}


def _markdown(env: dict, records: list[dict]) -> str:
    lines = ["# Fuzzing the properties (issue 10)", "",
             f"`{env['command']}`: {env['date']}, ecospa {env['ecospa']}, torch {env['torch']}, hypothesis "
             f"{env['hypothesis']}, {env['machine']}, {env['jobs']} process(es). Target {env['max_examples']} "
             f"examples per property, total time budget {env['time_budget_s']:.0f} s, wall time "
             f"{env.get('wall_seconds', 0):.0f} s, chunks of at most {env['chunk']} examples (a new seed "
             "each). See bench/fuzz.py for what each property checks and how time is shared.", "",
             *([env["note"], ""] if env.get("note") else []),
             "| property | examples | failures | shrink replays | overruns | wall s | CPU s | stopped |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        lines.append(f"| `{r['property']}`: {r['description']} | {r['examples']} | {len(r['failures'])} | "
                     f"{r['shrink_replays']} | {r.get('overruns', 0)} | {r['seconds']:.0f} | "
                     f"{r.get('cpu_seconds', 0):.0f} | {r['stopped']} |")
    total = sum(r["examples"] for r in records)
    fails = sum(len(r["failures"]) for r in records)
    lines += ["", f"Total: {total} examples, {fails} failures."]
    for r in records:
        for f in r["failures"]:
            lines += ["", f"## Failure: `{r['property']}` (chunk {f['chunk']}, seed {f['seed']})", "",
                      "```", f["error"][:1500], "", f["falsifying_example"][:3000], "```"]
    return "\n".join(lines) + "\n"


def _write(out: Path, env: dict, records: list[dict]) -> None:
    order = {n: i for i, n in enumerate(PROPERTIES)}
    records = sorted(records, key=lambda r: order.get(r["property"], 99))
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "properties": records}, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(env, records))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-examples", type=int, default=2000, help="examples per property (default 2000)")
    ap.add_argument("--time-budget", type=float, default=4 * 3600.0,
                    help="wall seconds for the whole run (all properties, per process); properties "
                         "not at --max-examples by then stop short (default 4 h)")
    ap.add_argument("--chunk", type=int, default=100, help="most examples per hypothesis run (a new seed each)")
    ap.add_argument("--seed", type=int, default=0, help="base seed of the chunks")
    ap.add_argument("--jobs", type=int, default=1, help="processes; the properties are split among them")
    ap.add_argument("--only", default="", help="comma-separated property names (default: all)")
    ap.add_argument("--out", default=str(RESULTS / "fuzz"), help="results path without suffix")
    ap.add_argument("--note", default="", help="a sentence for the report (for example how busy the machine was)")
    args = ap.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    names = [n for n in ORDER if not args.only or n in args.only.split(",")]
    unknown = sorted(set(filter(None, args.only.split(","))) - set(PROPERTIES))
    if unknown:
        ap.error(f"unknown properties {unknown}; known: {sorted(PROPERTIES)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = _environment(args)
    t0 = time.perf_counter()

    def write(records):
        env["wall_seconds"] = round(time.perf_counter() - t0, 1)
        env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        _write(out, env, records)

    if args.jobs <= 1:
        records = fuzz(names, args.max_examples, args.time_budget, args.chunk, args.seed, on_chunk=write)
    else:  # ORDER is slowest first: deal the properties out so each process gets a mix
        groups = [names[i::args.jobs] for i in range(args.jobs)]
        tasks = [(g, args.max_examples, args.time_budget, args.chunk, args.seed) for g in groups if g]
        records = []
        with mp.get_context("spawn").Pool(len(tasks), maxtasksperchild=1) as pool:
            for recs in pool.imap_unordered(_worker, tasks):
                records += recs
                write(records)
                for rec in recs:
                    print(f"== {rec['property']}: {rec['examples']} examples, {len(rec['failures'])} failures, "
                          f"{rec['stopped']}", flush=True)
    write(records)
    fails = sum(len(r["failures"]) for r in records)
    print(f"{sum(r['examples'] for r in records)} examples, {fails} failures in {env['wall_seconds']:.0f} s "
          f"-> {out}.json, {out}.md")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
