"""Discovery time on a LLaMA-2-7B-sized model built on the meta device, against torch_pruning.

    python bench/bench_discovery.py                 # 32 layers, writes bench/results/discovery.{json,md}
    python bench/bench_discovery.py --layers 4      # quicker look

The model is transformers' ``LlamaForCausalLM`` with LLaMA-2-7B's shape (32 layers, hidden 4096,
FFN 11008, 32 heads, 32 kv heads, vocab 32000) built under ``torch.device("meta")``: no weights
are allocated, so only the graph work is measured. Each tool runs in its own fresh subprocess so
that its peak RSS (``resource.getrusage``, the high-water mark of the process) is its own:

- ecospa: ``ecospa.auto_couple(model, example_inputs)``, the whole discovery (capture, channel
  flow, couplings).
- torch_pruning: ``DependencyGraph().build_dependency(model, example_inputs=...)``, and then
  ``get_all_groups()`` over the Linear layers (its equivalent of listing what can be pruned
  together). Both are capped by ``--tp-timeout``; a stage that does not finish is recorded as such.
  torch_pruning runs the model eagerly, and HF's mask code calls ``.item()`` (impossible on meta),
  so it gets a prepared 4-D attention mask besides ``input_ids``. Should meta fail anyway, it is
  run on real CPU models of 2 and 4 layers and its 32-layer time is extrapolated linearly; the
  result then says so.

Peak RSS includes the interpreter, torch and transformers; ``rss_before_mb`` is the high-water
mark just before the timed call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _emit(record: dict) -> None:
    """One JSON line on stdout, flushed, so a parent that kills us still sees what was done."""
    print("RESULT " + json.dumps(record), flush=True)


def _build(layers: int, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, use_cache=False, attn_implementation="sdpa", **LLAMA2_7B)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    return model


def _inputs(seq: int, device: str, *, with_mask: bool) -> dict:
    import torch

    inputs = {"input_ids": torch.zeros(1, seq, dtype=torch.long, device=device)}
    if with_mask:  # a prepared causal mask: HF skips its own mask code, which needs real data
        inputs["attention_mask"] = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None]
    return inputs


def worker_ecospa(layers: int, seq: int) -> None:
    t0 = time.perf_counter()
    import torch

    import ecospa

    t_import = time.perf_counter() - t0
    model = _build(layers, "meta")
    inputs = _inputs(seq, "meta", with_mask=False)
    rss_before = _peak_rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    cg = ecospa.auto_couple(model, inputs)
    t_discover, c_discover = time.perf_counter() - t0, time.process_time() - c0
    kinds: dict[str, int] = {}
    for c in cg:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    _emit(
        dict(
            tool="ecospa",
            stage="auto_couple",
            device="meta",
            layers=layers,
            seconds=t_discover,
            cpu_seconds=c_discover,
            import_seconds=t_import,
            couplings=len(cg),
            inexact=len(cg.inexact),
            kinds=kinds,
            rss_before_mb=rss_before,
            peak_rss_mb=_peak_rss_mb(),
            torch=torch.__version__,
        )
    )


def worker_tp(layers: int, seq: int, device: str) -> None:
    import torch
    import torch_pruning as tp
    import warnings

    warnings.filterwarnings("ignore")  # "Unwrapped parameters detected" for every norm weight
    model = _build(layers, device)
    if device == "cpu":
        torch.manual_seed(0)
    inputs = _inputs(seq, device, with_mask=True)
    rss_before = _peak_rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
    base = dict(tool="torch_pruning", device=device, layers=layers, rss_before_mb=rss_before, version=tp.__version__)
    _emit(dict(base, stage="build_dependency", seconds=t_build, cpu_seconds=c_build, peak_rss_mb=_peak_rss_mb()))
    c0, t0 = time.process_time(), time.perf_counter()
    n = 0
    for _ in dg.get_all_groups(root_module_types=[torch.nn.Linear]):
        n += 1
    t_groups, c_groups = time.perf_counter() - t0, time.process_time() - c0
    _emit(dict(base, stage="get_all_groups", seconds=t_groups, cpu_seconds=c_groups, groups=n, peak_rss_mb=_peak_rss_mb()))


def _run_worker(args: list[str], timeout: float) -> tuple[list[dict], str | None]:
    """Run this script as a worker; return its RESULT records and an error/timeout note."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, note = p.stdout, None if p.returncode == 0 else f"exit {p.returncode}: {p.stderr.strip()[-800:]}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        note = f"did not finish in {timeout:.0f} s"
    recs = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return recs, note


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def measure(layers: int, seq: int, tp_timeout: float, ecospa_timeout: float) -> dict:
    result: dict = dict(
        model="transformers LlamaForCausalLM, LLaMA-2-7B shape, meta device",
        config=dict(num_hidden_layers=layers, **LLAMA2_7B),
        seq=seq,
        host=dict(python=platform.python_version(), cpus=os.cpu_count(), load_before=_load()),
    )
    recs, note = _run_worker(["ecospa", "--layers", str(layers), "--seq", str(seq)], ecospa_timeout)
    result["ecospa"] = recs[0] if recs else dict(tool="ecospa", error=note)

    recs, note = _run_worker(["tp", "--layers", str(layers), "--seq", str(seq), "--device", "meta"], tp_timeout)
    tp_res: dict = {r["stage"]: r for r in recs}
    if "build_dependency" not in tp_res and note and "did not finish" not in note:
        # meta failed: real CPU models of 2 and 4 layers, extrapolated linearly to `layers`
        tp_res = dict(meta_error=note, extrapolated_from_cpu={})
        per = {}
        for n in (2, 4):
            r, nn = _run_worker(["tp", "--layers", str(n), "--seq", str(seq), "--device", "cpu"], tp_timeout)
            per[n] = {x["stage"]: x for x in r}
            if nn:
                per[n]["note"] = nn
        tp_res["extrapolated_from_cpu"] = per
        for stage in ("build_dependency", "get_all_groups"):
            if all(stage in per[n] for n in (2, 4)):
                t2, t4 = per[2][stage]["seconds"], per[4][stage]["seconds"]
                tp_res[stage] = dict(
                    stage=stage,
                    seconds=t2 + (t4 - t2) * (layers - 2) / 2,
                    extrapolated=True,
                    peak_rss_mb=max(per[n][stage]["peak_rss_mb"] for n in (2, 4)),
                )
    elif note:
        tp_res["note"] = note
    for stage in ("build_dependency", "get_all_groups"):
        tp_res.setdefault(stage, dict(stage=stage, seconds=None, did_not_finish=note))
    result["torch_pruning"] = tp_res
    result["host"]["load_after"] = _load()

    e = result["ecospa"].get("seconds")
    b = tp_res["build_dependency"].get("seconds")
    g = tp_res["get_all_groups"].get("seconds")
    result["ratio_ecospa_over_tp_build"] = e / b if e and b else None
    result["ratio_ecospa_over_tp_build_plus_groups"] = e / (b + g) if e and b and g else None
    result["ecospa_within_3s"] = e is not None and e <= 3.0  # the target of issue 9
    return result


def _fmt(x, unit="") -> str:
    return "—" if x is None else (f"{x:.2f}{unit}" if isinstance(x, float) else f"{x}{unit}")


def markdown(r: dict) -> str:
    e, tpr = r["ecospa"], r["torch_pruning"]
    rows = [
        "| tool | step | device | seconds (wall) | CPU seconds | peak RSS (MB) | found |",
        "|---|---|---|---|---|---|---|",
    ]
    if "seconds" in e:
        found = f"{e['couplings']} exact couplings {e['kinds']}, {e['inexact']} inexact"
        rows.append(
            f"| ecospa | auto_couple | meta | {_fmt(e['seconds'])} | {_fmt(e['cpu_seconds'])} | {_fmt(e['peak_rss_mb'])} | {found} |"
        )
    else:
        rows.append(f"| ecospa | auto_couple | meta | failed: {e.get('error')} | — | — | — |")
    for stage in ("build_dependency", "get_all_groups"):
        s = tpr[stage]
        dev = "cpu 2+4 layers, extrapolated" if s.get("extrapolated") else s.get("device", "meta")
        secs = _fmt(s.get("seconds")) if s.get("seconds") is not None else f"did not finish ({s.get('did_not_finish')})"
        found = f"{s['groups']} groups" if "groups" in s else ""
        rows.append(
            f"| torch_pruning | {stage} | {dev} | {secs} | {_fmt(s.get('cpu_seconds'))} | {_fmt(s.get('peak_rss_mb'))} | {found} |"
        )
    cfg = r["config"]
    lines = [
        "# Discovery on a LLaMA-2-7B-sized model (meta device)",
        "",
        f"`LlamaForCausalLM`: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, FFN "
        f"{cfg['intermediate_size']}, {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} kv heads, "
        f"vocab {cfg['vocab_size']}; example input (1, {r['seq']}). Each tool in a fresh process.",
        "",
        *rows,
        "",
        f"- ecospa / torch_pruning build_dependency: {_fmt(r['ratio_ecospa_over_tp_build'], '×')}",
        f"- ecospa / torch_pruning build_dependency + get_all_groups: {_fmt(r['ratio_ecospa_over_tp_build_plus_groups'], '×')}",
        f"- ecospa within 3 s (wall): {r['ecospa_within_3s']}",
        f"- host: {r['host']['cpus']} CPUs, Python {r['host']['python']}; {r['host']['load_before']} before, "
        f"{r['host']['load_after']} after (shared machine)",
        "",
        "Peak RSS is the process high-water mark (interpreter, torch and transformers included).",
        "torch_pruning's groups are its own notion (it groups a layer's q/k/v/o channels together, not per",
        "head and not q·k apart from v·o), so the counts are not comparable one to one.",
        "",
        "Produced by `python bench/bench_discovery.py`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--tp-timeout", type=float, default=300.0, help="seconds allowed to torch_pruning")
    ap.add_argument("--ecospa-timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--worker", choices=["ecospa", "tp"], help=argparse.SUPPRESS)
    ap.add_argument("--device", default="meta", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker == "ecospa":
        return worker_ecospa(a.layers, a.seq)
    if a.worker == "tp":
        return worker_tp(a.layers, a.seq, a.device)

    r = measure(a.layers, a.seq, a.tp_timeout, a.ecospa_timeout)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "discovery.json").write_text(json.dumps(r, indent=2) + "\n")
    md = markdown(r)
    (a.out / "discovery.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
