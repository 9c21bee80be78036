"""speed.md (every number of speed.json, the targets and whether they are met) and speed.png."""
from __future__ import annotations

from pathlib import Path

from bench.speed.timing import ratio

TARGETS = {"uniform": 0.9, "ragged": 0.8}  # efficiency vs the FLOP ideal (GPT-2 section)
REFERENCE = 0.9  # ecospa uniform speed / physical reference speed
MEASURES = (("forward", "forward, whole model"), ("body", "forward, body (no lm_head)"), ("train", "train step"))


def _f(x, nd=2, suf=""):
    return "—" if x is None else f"{x:.{nd}f}{suf}"


def targets(r: dict) -> list[dict]:
    """Every target of the benchmark: ``{what, value, target, met}`` (value: median of per-round
    ratios; ``alt``: the ratio of the minima)."""
    out = []

    def add(what, value, target, alt=None):
        out.append(dict(what=what, value=value, target=target, met=value >= target, alt=alt))

    for row in r.get("gpt2", {}).get("lengths", []):
        for key, label in MEASURES:
            for v, t in TARGETS.items():
                if key in row and v in row[key]:
                    x = row[key][v]
                    add(f"gpt2 {v} {label} {row['batch']}x{row['seq']}: speedup / ideal", x["efficiency"], t, x["efficiency_min"])
    for sec, pairs in (("linear_gpt", [("ecospa-uniform", "tp-head-dims"), ("ecospa-uniform", "tp-num-heads"),
                                       ("ecospa-ragged", "tp-head-dims"), ("ecospa-ragged", "tp-num-heads")]), ("tiny", [])):
        eco = [k for k in ("uniform", "ragged", "ragged-grouped", "ecospa-uniform", "ecospa-ragged")]
        uni = "ecospa-uniform" if sec == "linear_gpt" else "uniform"
        for row in r.get(sec, {}).get("lengths", []):
            shape = f"{row['batch']}x{row['seq']}"
            for key, label in MEASURES:
                if key not in row:
                    continue
                s = row[key]
                for e, tp in pairs:
                    q = ratio(s, e, tp)
                    add(f"{sec} {e} vs {tp}, {label} {shape}: time(TP) / time(ecospa)", q["round"], 1.0, q["min"])
                if "reference" in s and uni in s:
                    q = ratio(s, uni, "reference")
                    add(f"{sec} {uni} vs physical reference, {label} {shape}: time(ref) / time(ecospa)", q["round"], REFERENCE,
                        q["min"])
                for e in eco:
                    if e in s:
                        add(f"{sec} {e} vs dense, {label} {shape}: speedup", s[e]["speedup"], 1.0, s[e]["speedup_min"])
    for row in r.get("gpt2", {}).get("lengths", []):
        for key, label in MEASURES:
            for e in ("uniform", "ragged"):
                if key in row and e in row[key]:
                    add(f"gpt2 {e} vs dense, {label} {row['batch']}x{row['seq']}: speedup",
                        row[key][e]["speedup"], 1.0, row[key][e]["speedup_min"])
    return out


def _timing_table(s: dict, with_ideal: bool) -> list[str]:
    head = "| variant | median s | min s | CPU s | speedup (per round) | (medians) | (minima) | (CPU) |"
    sep = "|---|---|---|---|---|---|---|---|"
    if with_ideal:
        head += " FLOP ideal | / ideal (per round) | / ideal (minima) |"
        sep += "---|---|---|"
    lines = [head, sep]
    for k, x in s.items():
        line = (f"| {k} | {x['median_s']:.3f} | {x['min_s']:.3f} | {x['cpu_s']:.3f} | **{x['speedup']:.2f}×** | "
                f"{x['speedup_median']:.2f}× | {x['speedup_min']:.2f}× | {x['speedup_cpu']:.2f}× |")
        if with_ideal:
            line += f" {x['ideal']:.2f}× | **{x['efficiency']:.2f}** | {x['efficiency_min']:.2f} |"
        lines.append(line)
    return lines


def _variants_table(sec: dict) -> list[str]:
    lines = ["| variant | params | removed units | per-coupling removed | rel. err eval | rel. err train | first call eval / train (s) |",
             "|---|---|---|---|---|---|---|"]
    for k, v in sec["variants"].items():
        fr = v.get("per_coupling_removed_min_max")
        extra = ", ".join(f"{a}={b}" for a, b in v.items() if a in ("heads", "head_dim", "ffn"))
        lines.append(f"| {k}{' (' + extra + ')' if extra else ''} | {v['params'] / 1e6:.3f} M | "
                     + (f"{v['removed_units']} ({v['removed_fraction']:.1%})" if "removed_units" in v else "—") + " | "
                     + (f"{fr[0]:.2f}–{fr[1]:.2f}" if fr else "—") + " | "
                     + (f"{v['rel_err_eval']:.1e} | {v['rel_err_train']:.1e} | {v['first_call_eval_s']:.1f} / {v['first_call_train_s']:.1f}"
                        if "rel_err_eval" in v else "— | — | —") + " |")
    return lines


def _section(name: str, sec: dict, title: str) -> list[str]:
    lines = ["", f"## {title}", "", f"Couplings: {sec['couplings']['count']} exact {sec['couplings']['kinds']}; "
             f"auto_couple {sec['auto_couple_s']:.1f} s.", ""]
    lines += _variants_table(sec)
    ex = sec.get("execution", {})
    lines += ["", "Execution (`ecospa.execution_report` after all timed calls):", ""]
    for k, e in ex.items():
        lines.append(f"- {k}: {'every region ran narrow' if e['all_narrow'] else 'NOT all narrow'} "
                     f"({e['regions']} regions, {e['narrow_calls']} narrow calls, {e['fallback_calls']} fallback calls)")
        for row in e["not_narrow"]:
            lines.append(f"  - {row['path']}: {row['narrow_calls']} narrow, {row['fallback_calls']} fallback: {'; '.join(row['reasons'])}")
    for row in sec.get("lengths", []):
        fl = row["flops"]
        lines += ["", f"### {row['batch']} × {row['seq']} tokens (load {row['load_before']} → {row['load_after']})", "",
                  "| variant | GFLOPs linear | attention core | lm_head | body | total | body with ragged padding (est.) |",
                  "|---|---|---|---|---|---|---|"]
        for k, f in fl.items():
            lines.append(f"| {k} | {f['linear'] / 1e9:.1f} | {f['attention'] / 1e9:.1f} | {f['lm_head'] / 1e9:.1f} | "
                         f"{f['body'] / 1e9:.1f} | {f['total'] / 1e9:.1f} | {f['body_padded'] / 1e9:.1f} |")
        for key, label in MEASURES:
            if key in row:
                n = len(next(iter(row[key].values()))["wall_runs_s"])
                lines += ["", f"{label.capitalize()}, {n} interleaved rounds "
                          f"(ideal: {'body' if key == 'body' else 'whole-model'} FLOP ratio):", ""]
                lines += _timing_table(row[key], with_ideal=True)
                lr = row.get("load_per_round", {}).get(key)
                if lr:
                    lines += ["", f"Load average (1 min) per round: {', '.join(f'{x:.1f}' for x in lr)}."]
    return lines


def _layouts(r: dict) -> list[str]:
    lines = ["", "## Ragged heads: padded vs grouped vs per-head (plain PyTorch, GPT-2-small blocks)", "",
             "The per-head kept widths of the ragged plan above, run four ways (bench/speed/layouts.py): `padded` "
             "(ecospa's layout: one SDPA per layer at the widest head rounded up to 8, q/k and v padded to one width "
             "for the call), `padded_unequal` (the same, SDPA at unequal q/k and v widths: its math kernel), `grouped` "
             "(one SDPA per width group, widths rounded up to 8), `per_head` (one SDPA per head, exact widths); "
             "`uniform` (every head 32) for comparison. FLOP ideal: the ragged plan's exact FLOPs for every ragged "
             "layout.", "",
             "Groups per layer (grouped): " + ", ".join(str(len(g)) for g in r["groups"]["grouped"]) + "; padded (q/k, v) "
             "widths per layer: " + ", ".join(f"{g[0][1]}/{g[0][2]}" for g in r["groups"]["padded"]) + "."]
    for row in r["lengths"]:
        fl = row["flops"]
        lines += ["", f"### {row['batch']} × {row['seq']} tokens", "",
                  "GFLOPs executed: " + ", ".join(f"{k} {f / 1e9:.1f}" for k, f in fl.items()) + "."]
        for key, label in (("forward", "forward"), ("train", "forward + backward")):
            lines += ["", f"{label.capitalize()}:", ""] + _timing_table(row[key], with_ideal=True)
            lines += ["", f"Load average (1 min) per round: {', '.join(f'{x:.1f}' for x in row['load_per_round'][key])}."]
    return lines


def _generate(g: dict) -> list[str]:
    lines = ["", "## generate(): greedy decoding after a long context (HF GPT-2)", "",
             f"Context {g['context']} tokens, batch 1. Cached: `generate(max_new_tokens={g['new_tokens']}, use_cache=True)`; "
             f"prefill = the same with 1 new token; decode rate = ({g['new_tokens']} − 1) / (t − t_prefill). "
             f"No cache: {g['no_cache_new_tokens']} new tokens, the whole sequence recomputed per token.", "",
             "| variant | KV cache (MB) measured | at kept widths | at padded widths | cached tok/s | prefill s | decode tok/s | no-cache tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for k, v in g["variants"].items():
        lines.append(f"| {k} | {v['kv_bytes'] / 2**20:.1f} | {v['kv_bytes_at_kept_widths'] / 2**20:.1f} | "
                     f"{v['kv_bytes_at_padded_widths'] / 2**20:.1f} | {v['tokens_per_s']:.2f} | {v['prefill_s']:.3f} | "
                     f"{_f(v['decode_tokens_per_s'])} | {v['no_cache_tokens_per_s']:.2f} |")
    for key, label in (("cached", "cached generate"), ("prefill", "prefill (1 new token)"), ("no_cache", "no-cache loop")):
        lines += ["", f"{label}:", ""] + _timing_table(g[key], with_ideal=False)
    for key in ("cached_execution", "no_cache_execution"):
        lines += ["", f"Execution during the {key.split('_execution')[0].replace('_', '-')} calls:", ""]
        for k, e in g[key].items():
            lines.append(f"- {k}: {e['narrow_calls']} narrow calls, {e['fallback_calls']} fallback calls"
                         + (f"; reasons: {'; '.join(e['reasons'])}" if e["reasons"] else "")
                         + (f"; {'; '.join(e['kv_cache'])}" if key == "cached_execution" and e.get("kv_cache") else ""))
    return lines


def _profiles(title: str, profs: dict) -> list[str]:
    lines = ["", f"### {title}", ""]
    for k, p in profs.items():
        for what, t in p.items():
            lines.append(f"- {k} {what}: total self CPU {t['total_ms']:.1f} ms; " + ", ".join(
                f"{o['op']} {o['self_ms']:.1f} ms ({o['share']:.0%}, {o['calls']}×)" for o in t["top"][:8]))
    return lines


def markdown(r: dict) -> str:
    m = r["meta"]
    lines = ["# Speed of pruned transformers on CPU (ecospa narrow execution)", "",
             f"`{m['command']}` on {m['date']}: torch {m['torch']}, transformers {m['transformers']}, torch_pruning "
             f"{m['torch_pruning']}, Python {m['python']}; fp32, {m['threads']} torch threads, {m['cpus']} CPUs. "
             f"Load average {m['load_before']} before, {m['load_after']} after ({m['duration_s'] / 60:.1f} min; a shared "
             "machine: other jobs ran beside this one, hence interleaved rounds, per-round ratios, minima and CPU time).", "",
             "Every variant of a table was timed in the same rounds, the order rotating every round ("
             f"{m['warmup']} warm-up round(s) dropped before the forward rounds, {m.get('train_warmup', m['warmup'])} "
             "before the train-step rounds; every variant was first called once at each shape, untimed, which builds "
             "its narrow graphs). Speedup = the median over rounds of time(dense) / "
             "time(variant) in the same round (the ratios of the medians, minima and CPU times beside it). "
             "FLOP ideal = FLOPs(dense) / FLOPs(variant), matmuls "
             "only, attention core counted (QKᵀ and AV per head at the kept widths, full T×T); the train step's ideal "
             "is the whole-model ratio. Removal: half of every coupling (uniform: the same units in every head; ragged: "
             "random fractions in [0.25, 0.75] per coupling, half overall). See bench/speed/*.py.", ""]
    for u in m.get("updates", []):
        lines += [f"Sections {', '.join(u['sections'])} re-run by `{u['command']}` on {u['date']} ({u['threads']} threads; "
                  f"load {u['load_before']} before, {u['load_after']} after, {u['duration_s'] / 60:.1f} min): their "
                  "tables below come from that run.", ""]
    t = targets(r)
    missed = [x for x in t if not x["met"]]
    lines += ["## Targets", "", f"{len(t) - len(missed)} of {len(t)} met (median of per-round ratios; the ratio of the minima in brackets).", "",
              "| target | value | needed | met |", "|---|---|---|---|"]
    lines += [f"| {x['what']} | {x['value']:.2f} ({_f(x['alt'])}) | ≥ {x['target']:.2f} | {'yes' if x['met'] else '**no**'} |" for x in t]
    if "notes" in r:
        lines += ["", "## Findings", "", r["notes"]]
    if "gpt2" in r:
        lines += _section("gpt2", r["gpt2"], "GPT-2-small shape (HF GPT2LMHeadModel, SDPA)")
    if "layouts" in r:
        lines += _layouts(r["layouts"])
    if "generate" in r:
        lines += _generate(r["generate"])
    if "linear_gpt" in r:
        lines += _section("linear_gpt", r["linear_gpt"], "GPT-2-small shape of nn.Linear layers: ecospa vs Torch-Pruning vs physical reference")
    if "tiny" in r:
        lines += _section("tiny", r["tiny"], "Small research-style LM (width 192, 4 layers, GQA 6/2, interleaved rotary, fused SwiGLU)")
    probe = r.get("probes", {}).get("inference_mode")
    if probe:
        lines += ["", "## Probe: a pruned model's first call under torch.inference_mode", ""]
        for k, rows in probe.items():
            lines.append(f"- {k.replace('_', ' ')}: " + "; ".join(f"{x['path']} narrow {x['narrow_calls']}, fallback "
                                                                  f"{x['fallback_calls']} {x['reasons']}" for x in rows))
    if r.get("gpt2", {}).get("profiles"):
        p = r["gpt2"]["profiles"]
        lines += ["", "## Op profiles (torch.profiler, self CPU time, top ops)"]
        lines += _profiles(f"GPT-2, body forward and train step, {p['batch']} × {p['seq']}", p["ops"])
    if r.get("tiny", {}).get("profiles"):
        lines += _profiles("Tiny LM, first length", r["tiny"]["profiles"])
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    ax = axes[0]
    rows = r.get("gpt2", {}).get("lengths", [])
    labels = [f"{x['batch']}×{x['seq']}" for x in rows]
    w = 0.13
    for i, (v, key) in enumerate([(v, k) for v in ("uniform", "ragged") for k, _ in MEASURES]):
        vals = [x[key][v]["efficiency"] if key in x else 0 for x in rows]
        ax.bar([j + (i - 2.5) * w for j in range(len(rows))], vals, w, label=f"{v} {key}")
    for v, t in TARGETS.items():
        ax.axhline(t, ls="--", lw=0.8, color="k")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_title("HF GPT-2-small: speedup / FLOP ideal")
    ax.legend(fontsize=7)
    for ax, sec in zip(axes[1:], ("linear_gpt", "tiny")):
        rows = r.get(sec, {}).get("lengths", [])
        if not rows:
            continue
        names = list(rows[0]["forward"])
        cols = [(x, key) for x in rows for key, _ in MEASURES if key in x]
        w = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar([j + (i - len(names) / 2 + 0.5) * w for j in range(len(cols))],
                   [x[key][n]["speedup"] for x, key in cols], w, label=n)
        ax.axhline(1.0, ls="--", lw=0.8, color="k")
        ax.set_xticks(range(len(cols)), [f"{x['batch']}×{x['seq']}\n{key}" for x, key in cols], fontsize=7)
        ax.set_title(f"{sec}: speedup vs dense (median per round)")
        ax.legend(fontsize=7)
    ax, rows = axes[3], r.get("layouts", {}).get("lengths", [])
    if rows:
        names = list(rows[0]["forward"])
        cols = [(x, key) for x in rows for key in ("forward", "train")]
        w = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar([j + (i - len(names) / 2 + 0.5) * w for j in range(len(cols))],
                   [x[key][n]["efficiency"] for x, key in cols], w, label=n)
        ax.set_xticks(range(len(cols)), [f"{x['batch']}×{x['seq']}\n{key}" for x, key in cols], fontsize=7)
        ax.set_title("ragged head layouts (plain PyTorch): speedup / FLOP ideal")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(r: dict, out: Path) -> list[Path]:
    md, png = out / "speed.md", out / "speed.png"
    md.write_text(markdown(r))
    plot(r, png)
    return [md, png]
