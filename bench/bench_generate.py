"""Decoding with the default KV cache: ``generate()`` tokens/s of pruned models against dense.

    python bench/bench_generate.py                      # writes bench/results/generate.{json,md}
    python bench/bench_generate.py --quick              # 2 layers, short prompt: a smoke run
    python bench/bench_generate.py --cache static --out generate_static   # generate() with a StaticCache
    python bench/bench_generate.py --plot-only          # redraw generate.png from generate.json

Subjects, built from their configs (random weights, eval, fp32, ``use_cache`` on as the configs
default): the GPT-2-small shape (``GPT2Config``: 12 layers, width 768, 12 heads, FFN 3072) and a
SmolLM2-135M-shaped Llama (``LlamaConfig``: 30 layers, width 576, 9 query / 3 KV heads of 64,
FFN 1536, tied embeddings). Variants: dense; ``uniform`` (half of every coupling removed, the
same units in every head); ``ragged`` (``bench/speed/plans.ragged_plan``: half of all units, per
head a random 25-75 %); ``kept-width dense``, the same model built dense at the uniform plan's
widths (the Llama: a ``LlamaConfig`` with ``head_dim`` 32, FFN 768; GPT-2: heads of 32 and FFN
1536, :func:`gpt2_kept`): what a model trained at that size runs; for the Llama also
``Torch-Pruning``, Torch-Pruning's model of the uniform variant's parameter count
(``bench/smollm2_tp.py``, magnitude importance; where it fails or runs past ``--tp-timeout``, the
report says so).
*ideal*: the decode speedup if a step cost only the bytes it reads (every parameter, the KV cache
at mid-decode length); *of ideal*: the measured CPU-time speedup over it.

Timed (variants interleaved round by round, ``--threads`` torch threads, median of per-round
ratios): greedy ``generate(max_new_tokens=n, min_new_tokens=n)`` after a ``--prompt``-token
prompt at batch ``--batch``, and the prefill alone (``max_new_tokens=1``); decode tokens/s is
``batch * (n - 1) / (t(n) - t(1))``. Also a default-config forward (``model(x)``, cache on) of
the pruned model against ``model(x, use_cache=False)``. Every variant's tokens are checked against
the dense model's masked copy (greedy tokens equal) and ``execution_report`` is recorded.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ecospa  # noqa: E402
from bench.speed.plans import masked_copy, ragged_plan, uniform_plan  # noqa: E402
from bench.speed.timing import interleaved, paired  # noqa: E402

OUT = Path(os.environ.get("ECOSPA_BENCH_OUT", Path(__file__).resolve().parent / "results"))


def gpt2(layers: int, ffn: int = 3072):
    import transformers

    cfg = transformers.GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_inner=ffn, vocab_size=50257,
                                  n_positions=1024)
    return transformers.GPT2LMHeadModel(cfg).eval()


def gpt2_kept(layers: int, head_dim: int = 32, ffn: int = 1536):
    """The GPT-2-small shape built dense at the uniform plan's widths: 12 heads of ``head_dim``
    and FFN ``ffn``. ``GPT2Config`` ties the head width to ``n_embd / n_head``, so each attention's
    ``c_attn``/``c_proj`` are rebuilt at ``12 * head_dim`` and its ``split_size``/``head_dim``/
    ``scaling`` set to match (what a model trained at that size runs)."""
    from transformers.pytorch_utils import Conv1D

    model = gpt2(layers, ffn)
    width = 12 * head_dim
    for block in model.transformer.h:
        attn = block.attn
        attn.c_attn, attn.c_proj = Conv1D(3 * width, 768), Conv1D(768, width)
        attn.split_size, attn.head_dim, attn.scaling = width, head_dim, head_dim ** -0.5
    return model.eval()  # (the new projections were built in train mode)


def smollm2(layers: int, head_dim: int = 64, ffn: int = 1536):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=ffn,
                                   num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                   head_dim=head_dim, max_position_embeddings=2048, rope_theta=100000.0,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5)
    return transformers.LlamaForCausalLM(cfg).eval()


CACHE: dict = {}  # extra generate() arguments: {"cache_implementation": "static"} with --cache static


def _gen(model, x, n: int):
    def run():
        with torch.inference_mode():
            return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, **CACHE)
    return run


def _fwd(model, x, **kw):
    def run():
        with torch.inference_mode():
            return model(x, **kw).logits
    return run


def _regions(model) -> list[dict]:
    return [dict(path=r.path, narrow_calls=r.narrow_calls, fallback_calls=r.fallback_calls,
                 reasons=list(r.reasons), kv_cache=r.kv_cache) for r in ecospa.execution_report(model)]


def _cache_bytes(model, x) -> int:
    with torch.inference_mode():
        cache = model(x).cache
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _torch_pruning(dense, target: int, timeout_s: int = 180):
    """Torch-Pruning's model of the same parameter count (``bench/smollm2_tp.py``: whole query
    heads, one per KV group, and MLP channels, magnitude importance; the residual width kept), or
    why there is none (torch_pruning missing, or it failed or ran past ``timeout_s``)."""
    try:
        from bench.smollm2_tp import tp_compress
        import torch_pruning  # noqa: F401
    except ImportError:
        return "torch_pruning is not installed"

    def stop(*_):
        raise TimeoutError(f"no result after {timeout_s} s (in its dependency graph)")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(timeout_s)
    try:
        return tp_compress(copy.deepcopy(dense), "tp_magnitude", target, log=lambda *_: None)[0].eval()
    except Exception as e:  # a baseline's failure is a result to report, not a crash of the benchmark
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _ideal(row: dict) -> dict:
    """Decode speedup over dense if a step cost only the bytes it reads: every parameter once
    (the tied LM head reads the whole embedding) and the KV cache at mid-decode length."""
    n = row["prompt"] + row["new_tokens"] / 2
    scale = n / row["prompt"]
    read = {k: 4 * p + row["kv_cache_bytes_prompt"][k] * scale for k, p in row["params"].items()}
    return {k: read["dense"] / v for k, v in read.items()}


def subject(name: str, a) -> dict:
    torch.manual_seed(0)
    layers = a.layers or (12 if name == "gpt2" else 30)
    build = gpt2 if name == "gpt2" else smollm2
    dense = build(layers)
    vocab = dense.config.vocab_size
    x = torch.randint(3, vocab, (a.batch, a.prompt), generator=torch.Generator().manual_seed(1))
    models = {"dense": dense}
    check = {}
    tp_failed = None  # why Torch-Pruning has no model here
    for kind, make in (("uniform", uniform_plan), ("ragged", ragged_plan)):
        m = copy.deepcopy(dense)
        cg = ecospa.auto_couple(m, {"input_ids": x[:, :8]})
        plan = make(cg)
        check[kind] = masked_copy(dense, cg, plan)
        ecospa.prune(m, plan, couplings=cg)
        models[kind] = m
    torch.manual_seed(0)
    models["kept-width dense"] = gpt2_kept(layers) if name == "gpt2" else smollm2(layers, head_dim=32, ffn=768)
    if name == "smollm2":
        tp_model = _torch_pruning(dense, sum(p.numel() for p in models["uniform"].parameters()), a.tp_timeout)
        if isinstance(tp_model, str):
            tp_failed = tp_model
        else:
            models["Torch-Pruning"] = tp_model
    row: dict = {"layers": layers, "prompt": a.prompt, "new_tokens": a.new_tokens, "batch": a.batch,
                 "torch_pruning": tp_failed,
                 "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}}
    # exactness of the timed path: greedy tokens of each pruned model equal its masked copy's
    n_check = min(a.new_tokens, 16)
    row["tokens_equal_masked_dense"] = {k: bool(torch.equal(_gen(models[k], x, n_check)(), _gen(ref, x, n_check)()))
                                        for k, ref in check.items()}
    t0 = time.perf_counter()
    for m in models.values():  # builds every narrow graph (prefill and decode variants) before timing
        _gen(m, x, 3)()
    row["warm_s"] = time.perf_counter() - t0
    fns = {}
    for k, m in models.items():
        fns[f"{k} n"] = _gen(m, x, a.new_tokens)
        fns[f"{k} 1"] = _gen(m, x, 1)
    loads: list = []
    t = interleaved(fns, rounds=a.rounds, warmup=1, loads=loads)
    for clock in ("wall", "cpu"):  # cpu: this process's CPU seconds, less sensitive to a loaded machine
        decode = {k: [a.batch * (a.new_tokens - 1) / (tn - t1)
                      for tn, t1 in zip(t[f"{k} n"][clock], t[f"{k} 1"][clock])] for k in models}
        sfx = "" if clock == "wall" else "_cpu"
        row[f"decode_tokens_per_s{sfx}"] = {k: statistics.median(v) for k, v in decode.items()}
        row[f"decode_speedup_vs_dense{sfx}"] = {k: paired([1 / r for r in decode["dense"]], [1 / r for r in v])
                                                for k, v in decode.items()}
        if "kept-width dense" in decode:
            row[f"decode_vs_kept_width{sfx}"] = {k: paired([1 / r for r in decode["kept-width dense"]], [1 / r for r in v])
                                                 for k, v in decode.items()}
        row[f"generate_speedup_vs_dense{sfx}"] = {k: paired(t["dense n"][clock], t[f"{k} n"][clock]) for k in models}
        row[f"prefill_speedup_vs_dense{sfx}"] = {k: paired(t["dense 1"][clock], t[f"{k} 1"][clock]) for k in models}
    row["generate_s"] = {k: statistics.median(t[f"{k} n"]["wall"]) for k in models}
    row["loads"] = loads
    row["kv_cache_bytes_prompt"] = {k: _cache_bytes(m, x) for k, m in models.items()}
    row["ideal_speedup_vs_dense"] = _ideal(row)
    row["regions"] = {k: _regions(models[k]) for k in ("uniform", "ragged")}
    # a default-config forward (cache on) against use_cache=False, pruned uniform and dense
    ff = {"dense cache": _fwd(dense, x), "uniform cache": _fwd(models["uniform"], x),
          "uniform no-cache": _fwd(models["uniform"], x, use_cache=False),
          "ragged cache": _fwd(models["ragged"], x), "ragged no-cache": _fwd(models["ragged"], x, use_cache=False)}
    tf = interleaved(ff, rounds=a.rounds, warmup=1)
    row["forward_speedup_vs_dense"] = {k: paired(tf["dense cache"]["wall"], v["wall"]) for k, v in tf.items()}
    row["forward_speedup_vs_dense_cpu"] = {k: paired(tf["dense cache"]["cpu"], v["cpu"]) for k, v in tf.items()}
    row["forward_s"] = {k: statistics.median(v["wall"]) for k, v in tf.items()}
    return row


def markdown(res: dict) -> str:
    lines = ["# generate() with the default KV cache", "",
             f"Command: `{res['command']}`. CPU, fp32, {res['threads']} thread(s), variants interleaved "
             "round by round, median of per-round ratios; decode tokens/s = batch x (n - 1) / (t(n) - t(1)).",
             ""]
    for name, row in res["subjects"].items():
        lines += [f"## {name} ({row['layers']} layers, batch {row['batch']}, prompt {row['prompt']}, "
                  f"{row['new_tokens']} new tokens)", "",
                  "Wall clock / this process's CPU time (the CPU figure is less sensitive to other jobs on "
                  "the machine).", "",
                  "| variant | params | decode tok/s | decode vs dense | ideal | of ideal (CPU) | generate vs dense | prefill vs dense | KV bytes (prompt) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        ideal = row.get("ideal_speedup_vs_dense") or _ideal(row)
        for k in row["decode_tokens_per_s"]:
            lines.append(f"| {k} | {row['params'][k] / 1e6:.1f}M | {row['decode_tokens_per_s'][k]:.1f} / "
                         f"{row['decode_tokens_per_s_cpu'][k]:.1f} | {row['decode_speedup_vs_dense'][k]:.2f}x / "
                         f"{row['decode_speedup_vs_dense_cpu'][k]:.2f}x | {ideal[k]:.2f}x | "
                         f"{row['decode_speedup_vs_dense_cpu'][k] / ideal[k]:.2f} | {row['generate_speedup_vs_dense'][k]:.2f}x / "
                         f"{row['generate_speedup_vs_dense_cpu'][k]:.2f}x | {row['prefill_speedup_vs_dense'][k]:.2f}x / "
                         f"{row['prefill_speedup_vs_dense_cpu'][k]:.2f}x | {row['kv_cache_bytes_prompt'][k] / 1e6:.2f} MB |")
        if "decode_vs_kept_width" in row:
            lines += ["", "Decode speed against the dense model built at the kept widths (wall / CPU): " +
                      ", ".join(f"{k} {v:.2f} / {row['decode_vs_kept_width_cpu'][k]:.2f}"
                                for k, v in row["decode_vs_kept_width"].items() if k != "kept-width dense")]
        lines += ["", "Forward of the prompt (`model(x)`), speedup vs the dense model with its cache on (wall / CPU): " +
                  ", ".join(f"{k} {v:.2f}x / {row['forward_speedup_vs_dense_cpu'][k]:.2f}x"
                            for k, v in row["forward_speedup_vs_dense"].items()), "",
                  *([f"Torch-Pruning, asked for the uniform variant's parameter count: {row['torch_pruning']}.", ""]
                    if row.get("torch_pruning") else []),
                  f"Greedy tokens equal to the masked dense model's: {row['tokens_equal_masked_dense']}. "
                  f"Load averages during the rounds: {row['loads']}.", ""]
        for k, regs in row["regions"].items():
            nar = sum(r["narrow_calls"] for r in regs)
            fb = sum(r["fallback_calls"] for r in regs)
            why = sorted({w for r in regs for w in r["reasons"]})
            lines.append(f"- {k}: {nar} narrow calls, {fb} fallback calls{(': ' + '; '.join(why)) if why else ''}; "
                         f"{regs[0]['kv_cache'] if regs else ''}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="gpt2,smollm2")
    ap.add_argument("--layers", type=int, default=0, help="0: the real depth (12 / 30)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 layers, 32-token prompt, 8 new tokens, 2 rounds")
    ap.add_argument("--out", default="generate", help="file stem under bench/results")
    ap.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                    help="the cache generate() uses: its default (dynamic) or cache_implementation='static'")
    ap.add_argument("--tp-timeout", type=int, default=180, help="seconds Torch-Pruning may take to prune")
    ap.add_argument("--plot-only", action="store_true", help="time nothing: redraw OUT.png from OUT.json")
    a = ap.parse_args(argv)
    if a.plot_only:
        print(f"wrote {plot(json.loads((OUT / f'{a.out}.json').read_text()), OUT / f'{a.out}.png')}")
        return
    if a.cache == "static":
        CACHE["cache_implementation"] = "static"
    if a.quick:
        a.layers, a.prompt, a.new_tokens, a.rounds = 2, 32, 8, 2
    torch.set_num_threads(a.threads)
    res = {"command": "python bench/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "threads": a.threads, "torch": torch.__version__, "cache": a.cache, "subjects": {}}
    for name in a.subjects.split(","):
        res["subjects"][name] = subject(name, a)
        print(json.dumps({name: {k: v for k, v in res["subjects"][name].items() if k != "regions"}}, indent=1),
              flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.out}.json").write_text(json.dumps(res, indent=1, default=str))
    (OUT / f"{a.out}.md").write_text(markdown(res))
    plot(res, OUT / f"{a.out}.png")
    print(markdown(res))


def plot(res: dict, path: Path) -> Path:
    """Bars of decode and prefill speed against dense (wall clock), one group per subject."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    subjects = list(res["subjects"])
    fig, axes = plt.subplots(1, len(subjects), figsize=(6.5 * len(subjects), 4.2), squeeze=False)
    for ax, name in zip(axes[0], subjects):
        row = res["subjects"][name]
        variants = [k for k in row["decode_speedup_vs_dense"] if k != "dense"]
        xs = range(len(variants))
        dec = [row["decode_speedup_vs_dense"][k] for k in variants]
        pre = [row["prefill_speedup_vs_dense"][k] for k in variants]
        ax.bar([x - 0.2 for x in xs], dec, width=0.4, label="decode tokens/s")
        ax.bar([x + 0.2 for x in xs], pre, width=0.4, label="prefill")
        for x, v in zip(xs, dec):
            ax.text(x - 0.2, v + 0.02, f"{v:.2f}x", ha="center", fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), variants)
        ax.set_ylabel("speed vs dense (wall clock)")
        ax.set_title(f"{name}: batch {row['batch']}, prompt {row['prompt']}, {row['new_tokens']} new")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"generate() with the {res.get('cache', 'dynamic')} KV cache, half of every coupling removed")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
