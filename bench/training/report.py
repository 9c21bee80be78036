"""The training benchmark's report: aggregation over seeds, findings, Markdown and plots.

Reads only the per-seed results of :mod:`bench.training.run` (or a saved ``training.json``);
:func:`report` writes ``training.json``, ``training.md`` and the plots to the output directory,
and the Markdown also to an extra path when asked (the root ``BENCHMARKS.md``).
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from bench.training import VARIANTS
from ecospa.recipes.train.plot import plot_curves

__all__ = ["METRICS", "aggregate", "markdown_table", "findings", "write_markdown", "make_plots", "report"]

ROOT = Path(__file__).resolve().parents[2]


METRICS = ("val_loss", "val_ppl", "params", "train_seconds", "train_time_vs_dense", "peak_state_bytes",
           "mean_state_bytes", "final_state_bytes", "forward_tokens_per_s", "generate_tokens_per_s",
           "forward_vs_dense", "generate_vs_dense")


def aggregate(seeds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{variant: {metric: {"mean", "std", "values"}}}`` over seeds (ratios taken per seed first)."""
    names = list(seeds[0]["variants"])
    agg: dict[str, dict[str, dict[str, float]]] = {}
    for n in names:
        per: dict[str, list[float]] = {m: [] for m in METRICS}
        for sd in seeds:
            v = sd["variants"][n]
            d = sd["variants"].get("dense")
            for m in METRICS:
                if m == "train_time_vs_dense":
                    x = v["train_seconds"] / d["train_seconds"] if d else float("nan")
                elif m == "forward_vs_dense":
                    x = v["forward_tokens_per_s"] / d["forward_tokens_per_s"] if d else float("nan")
                elif m == "generate_vs_dense":
                    x = v["generate_tokens_per_s"] / d["generate_tokens_per_s"] if d else float("nan")
                else:
                    x = float(v[m])
                per[m].append(x)
        agg[n] = {m: {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                      "values": xs} for m, xs in per.items()}
    return agg


def _pm(a: dict[str, float], fmt: str) -> str:
    return f"{a['mean']:{fmt}} ± {a['std']:{fmt}}"


def _setup(cfg: dict, agg: dict) -> str:
    """The model and text of a run, in words."""
    m = cfg["model"]
    dense = f"{agg['dense']['params']['mean']:,.0f} parameters if dense"
    if m.get("kind", "nanoGPT") == "nanoGPT":
        model = (f"nanoGPT-style character model (`ecospa.recipes.nanogpt.GPT`: {m['n_layer']} layers, width "
                 f"{m['n_embd']}, {m['n_head']} heads, FFN {4 * m['n_embd']}, context {m['block_size']}, tied "
                 f"embeddings, {dense})")
    else:
        model = (f"character LM built as `LlamaForCausalLM(LlamaConfig(...))` with the config's defaults "
                 f"(KV cache on, rotary, SwiGLU; bench/training/llama.py): {m['num_hidden_layers']} layers, width "
                 f"{m['hidden_size']}, {m['num_attention_heads']} heads, {m['num_key_value_heads']} key/value heads "
                 f"(GQA), FFN {m['intermediate_size']}, {dense})")
    if cfg.get("text", "shakespeare") == "wikitext2":
        text = ("on the WikiText-2 validation text (../shared/data/wikitext2_valid.txt): first 80% train, last 20% "
                "validation (never trained on; the loss is over all of it).")
    else:
        text = ("on the tiny-shakespeare text shipped with ecospa: first 90% train, last 10% validation (never "
                "trained on; the loss is over all of it).")
    return f"{model} {text}"


def _title(cfg: dict) -> str:
    kind = "char Llama (GQA)" if cfg["model"].get("kind", "nanoGPT") != "nanoGPT" else "char GPT"
    return f"{kind} on {'WikiText-2' if cfg.get('text') == 'wikitext2' else 'tinyshakespeare'}"


def _schedule(knobs: dict, steps: int) -> str:
    """EcoSpa's schedule, in words."""
    start = f"starting at step {knobs['start']} of {steps}, every {knobs['every']} steps"
    if knobs.get("end") is not None:
        return (f"{start}, reaching the target at {knobs['end']:.0%} of the steps on the cubic schedule "
                "(`EcoSpa(end=..., total_steps=...)`).")
    return f"{start}, at Algorithm 1's own pace (top_k {knobs['top_k']}, theta {knobs['theta']})."


def markdown_table(agg: dict[str, Any]) -> str:
    """The main Markdown table, one row per variant."""
    head = ("| variant | val loss | val ppl | params | train wall clock (s) | vs dense | peak state (MiB) "
            "| final state (MiB) | fwd tokens/s | gen tokens/s |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    mib = lambda a: {k: (v / 2 ** 20 if k in ("mean", "std") else v) for k, v in a.items()}
    for n, a in agg.items():
        rows.append(
            f"| {n} | {_pm(a['val_loss'], '.4f')} | {_pm(a['val_ppl'], '.3f')} | {a['params']['mean']:,.0f} "
            f"| {_pm(a['train_seconds'], '.1f')} | {_pm(a['train_time_vs_dense'], '.2f')}× "
            f"| {_pm(mib(a['peak_state_bytes']), '.2f')} | {_pm(mib(a['final_state_bytes']), '.2f')} "
            f"| {a['forward_tokens_per_s']['mean']:,.0f} ({a['forward_vs_dense']['mean']:.2f}×) "
            f"| {a['generate_tokens_per_s']['mean']:,.0f} ({a['generate_vs_dense']['mean']:.2f}×) |")
    return "\n".join(rows)


def findings(agg: dict[str, Any], seeds: list[dict[str, Any]]) -> list[str]:
    """Plain statements computed from the numbers: where EcoSpa wins and where it loses."""
    out: list[str] = []
    if "ecospa" not in agg:
        return out
    e = agg["ecospa"]
    el, es = e["val_loss"]["mean"], e["val_loss"]["std"]

    def diff(n: str) -> str:
        o = agg[n]["val_loss"]
        per = [a - b for a, b in zip(e["val_loss"]["values"], o["values"])]
        wins = sum(1 for x in per if x < 0)
        sd = statistics.stdev(per) if len(per) > 1 else 0.0
        return (f"{n} {o['mean']:.4f} ± {o['std']:.4f} (paired per seed: EcoSpa − {n} = "
                f"{statistics.fmean(per):+.4f} ± {sd:.4f} nats, EcoSpa lower in {wins}/{len(per)} seeds)")

    out.append(f"EcoSpa validation loss {el:.4f} ± {es:.4f} at {e['params']['mean']:,.0f} parameters.")
    for n in agg:
        if n != "ecospa":
            out.append("vs " + diff(n) + ".")
    if "dense" in agg:
        d = agg["dense"]
        gap = (el - d["val_loss"]["mean"]) / d["val_loss"]["mean"] * 100
        out.append(f"Against dense: {gap:+.2f}% validation loss with "
                   f"{e['params']['mean'] / d['params']['mean']:.1%} of the parameters; training wall clock "
                   f"{e['train_time_vs_dense']['mean']:.2f}× dense; peak training state "
                   f"{e['peak_state_bytes']['mean'] / d['peak_state_bytes']['mean']:.2f}× dense (EcoSpa starts "
                   f"dense), averaged over the steps {e['mean_state_bytes']['mean'] / d['mean_state_bytes']['mean']:.2f}×, "
                   f"final {e['final_state_bytes']['mean'] / d['final_state_bytes']['mean']:.2f}×; "
                   f"forward {e['forward_vs_dense']['mean']:.2f}× and generation "
                   f"{e['generate_vs_dense']['mean']:.2f}× dense tokens/s.")
    if "small-dense" in agg:
        s = agg["small-dense"]
        out.append(f"Against small-dense (same final widths, trained small from the start): training "
                   f"wall clock {e['train_seconds']['mean'] / s['train_seconds']['mean']:.2f}× small-dense's; "
                   f"peak state {e['peak_state_bytes']['mean'] / s['peak_state_bytes']['mean']:.2f}×.")
    same = all(sd["variants"]["ecospa"].get("plan_identical_to_phase0") for sd in seeds)
    out.append(f"Phase-1 EcoSpa repeated phase 0's plan exactly in every seed: {same}.")
    return out


def _link(target: Path, md: Path) -> str:
    """A Markdown link to ``target`` relative to the file ``md``, labelled by its repository path."""
    target = target.resolve()
    try:
        label = target.relative_to(ROOT).as_posix()
    except ValueError:
        label = target.name
    return f"[{label}]({Path(os.path.relpath(target, md.resolve().parent)).as_posix()})"


def write_markdown(result: dict[str, Any], path: Path, plots: list[str], json_path: Path) -> None:
    """The report: what was run, the table, the plots, the findings; links relative to ``path``."""
    agg, cfg = result["aggregate"], result["config"]
    host = result["host"]
    results = ROOT / "bench" / "results"
    lines = [
        "# Benchmarks: sparse training at equal final size",
        "",
        f"Generated by `{result['command']}` on {result['date']}. Raw numbers: "
        f"{_link(json_path, path)}. Other benchmarks: "
        f"{_link(results / 'speed.md', path)} (CPU speed of pruned models: forward, train step, generate; against the FLOP ideal, Torch-Pruning and dense models at the kept widths), "
        f"{_link(results / 'discovery.md', path)}.",
        "",
        "**Question.** At the same final parameter count and the same number of training steps, on the "
        "same data and seeds, does EcoSpa train a better model, faster, than the alternatives?",
        "",
        f"**Setup.** {_setup(cfg, agg)} "
        f"{cfg['train']['steps']} AdamW steps of {cfg['train']['batch_size']} × {cfg['train']['block_size']} "
        f"characters, lr {cfg['train']['lr']}, seeds {cfg['seeds']}, fp32, {cfg['threads']} CPU thread, "
        f"device: CPU ({host['cpu_count']} cores, shared with other jobs; load average "
        f"{host['loadavg_before']} before, {host['loadavg_after']} after). Pruned variants go to "
        f"{cfg['target']:.0%} of the prunable parameters (those inside exact couplings), i.e. "
        f"{agg['ecospa']['params']['mean'] / agg['dense']['params']['mean']:.1%} of all parameters "
        "(embeddings, norms and the residual width are not prunable), " + _schedule(cfg['ecospa'], cfg['train']['steps']),
        "",
        "## Results (mean ± std over seeds)",
        "",
        markdown_table(agg),
        "",
        "- *train wall clock*: sum of per-step times (forward, backward, AdamW, pruning) plus coupling "
        "discovery; evaluation excluded. All variants of a seed were trained in lockstep (one step each, "
        "rotating order), so their times share the machine's load; *vs dense* is the per-seed ratio.",
        "- *state*: weights + gradients + AdamW moments (+ masks for `uncoupled`), from tensor sizes; "
        "*peak* is the largest over training, *final* at the end. Activations are not counted.",
        "- *fwd tokens/s*: forward of 8 × 64 tokens in eval mode; *gen tokens/s*: `GPT.generate`, 4 prompts "
        "× 48 new tokens (no KV cache in this model). Median of rounds interleaved across all variants; "
        "(×) is relative to dense.",
        "",
    ]
    for p in plots:
        rel = Path(os.path.relpath(Path(p).resolve(), path.resolve().parent)).as_posix()
        lines += [f"![{Path(p).stem}]({rel})", ""]
    lines += ["## Findings (computed from the numbers above)", ""]
    lines += [f"- {f}" for f in result["findings"]]
    lines += ["", "## Variants", ""]
    lines += [f"- `{n}`: {d}" for n, d in VARIANTS.items() if n in agg]
    lines += ["", "Exact definitions (what `uncoupled`, `tp-l1` and `svd` do precisely) are in the docstring "
              f"of {_link(ROOT / 'bench' / 'bench_training.py', path)}.", ""]
    extra = result.get("analysis")
    if extra:
        lines += ["## Where EcoSpa loses, and why", "", extra, ""]
    path.write_text("\n".join(lines) + _kept_tail(path))


# BENCHMARKS.md may carry other benchmarks' sections below this line; rewriting the training
# report keeps them
KEEP_MARKER = "<!-- other benchmarks: kept when bench_training.py rewrites the part above -->"


def _kept_tail(path: Path) -> str:
    """The part of an existing ``path`` from :data:`KEEP_MARKER` on ('' when there is none)."""
    old = path.read_text() if path.exists() else ""
    at = old.find(KEEP_MARKER)
    return "" if at < 0 else "\n" + old[at:]


def make_plots(seeds: list[dict[str, Any]], agg: dict[str, Any], out_dir: Path, title: str = "char GPT on tinyshakespeare") -> list[str]:
    """Curves (mean over seeds, min-max band) and a bar chart of the final validation loss."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    series = []
    for n in agg:
        hs = [sd["variants"][n]["history"] for sd in seeds]
        k = min(len(h) for h in hs)
        hist = [{"step": hs[0][i]["step"],
                 "train_seconds": statistics.fmean(h[i]["train_seconds"] for h in hs),
                 "val_loss": statistics.fmean(h[i]["val_loss"] for h in hs)} for i in range(k)]
        band = {"step": [hs[0][i]["step"] for i in range(k)],
                "lo": [min(h[i]["val_loss"] for h in hs) for i in range(k)],
                "hi": [max(h[i]["val_loss"] for h in hs) for i in range(k)]}
        series.append({"label": n, "history": hist, "band": band,
                       "param_trace": seeds[0]["variants"][n]["param_trace"],
                       "state_trace": seeds[0]["variants"][n].get("state_trace")})
    curves = plot_curves(series, out_dir / "training_curves.png",
                         title=f"{title}: mean over seeds (band: min-max); sizes: seed "
                               f"{seeds[0]['seed']}")
    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(agg)
    means = [agg[n]["val_loss"]["mean"] for n in names]
    stds = [agg[n]["val_loss"]["std"] for n in names]
    ax.bar(names, means, yerr=stds, capsize=4, color=["#888" if n in ("dense", "small-dense") else "#1f77b4"
                                                      for n in names])
    lo, hi = min(means) - 3 * max(stds + [0.005]), max(means) + 3 * max(stds + [0.005])
    ax.set_ylim(lo, hi)
    ax.set_ylabel("final validation loss (nats/char)")
    ax.set_title("final validation loss, mean ± std over seeds (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=20)
    fig.tight_layout()
    bars = out_dir / "training_final.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    return [str(curves), str(bars)]


def report(result: dict[str, Any], out_dir: Path, *, analysis: Path | None = None,
           also_md: Path | None = None) -> list[Path]:
    """Findings, analysis text, plots, ``training.json`` and ``training.md`` from a finished ``result``.

    Args:
        result: what :func:`bench.training.run.main` gathered (``aggregate``, ``seeds``, ...).
        out_dir: where everything is written.
        analysis: a Markdown file whose text goes under "Where EcoSpa loses, and why" (default
            ``out_dir/training_analysis.md`` when it exists).
        also_md: a second path for the Markdown report (the root ``BENCHMARKS.md``), or None.

    Returns:
        The Markdown files written.
    """
    result["findings"] = findings(result["aggregate"], result["seeds"])
    analysis = analysis or out_dir / "training_analysis.md"
    if analysis.is_file():
        result["analysis"] = analysis.read_text().strip()
    plots = make_plots(result["seeds"], result["aggregate"], out_dir, _title(result["config"]))
    json_path = out_dir / "training.json"
    json_path.write_text(json.dumps(result, indent=1, default=float))
    written = []
    for md in [out_dir / "training.md"] + ([also_md] if also_md is not None else []):
        write_markdown(result, md, plots, json_path)
        written.append(md)
    return written
