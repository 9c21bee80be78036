"""Export matrix: every transformers architecture of the compatibility matrix whose inputs are
token ids, pruned with a *uniform* plan (every unit of the second key/value head's couplings and
every third FFN unit, in every layer: what a config can express) and a *ragged* one (a seeded
third of every coupling's units), exported with ``ecospa.export`` and loaded back by
transformers in ONE fresh process where ``ecospa`` cannot be imported. Per row: parameters of
the dense, pruned and exported models, the padding overhead (exported / pruned - 1), the config
fields changed, and the relative error of the reloaded model's outputs against the pruned
model's (fp32; pass: <= 1e-5).

    python bench/export_matrix.py                 # bench/results/export_matrix.{json,md} + docs/compatibility.md
    python bench/export_matrix.py --only llama,gpt2 --no-doc
    python bench/export_matrix.py --render bench/results/export_matrix.json   # only rewrite the Markdown

The section of docs/compatibility.md sits between two markers and is replaced on each run (a run
of bench/compat.py rewrites that file: run this one after it).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def uniform_plan(cg) -> dict:
    out = {}
    for c in cg:
        if c.kind in ("ffn", "glu"):
            out[c.name] = list(range(0, c.width, 3))
        elif c.kind in ("qk", "vo") and c.name.endswith(".head1"):
            out[c.name] = list(range(c.width))
    return out


def ragged_plan(cg) -> dict:
    rng = random.Random(0)
    return {c.name: sorted(rng.sample(range(c.width), c.width // 3)) for c in cg}


def _output(out) -> torch.Tensor:
    t = getattr(out, "logits", None)
    return (t if t is not None else out[0]).detach().float()


def export_row(arch, kind: str, folder: Path) -> dict:
    import ecospa

    model, inputs = arch.build()
    cg = ecospa.auto_couple(model, inputs)
    ecospa.prune(model, (uniform_plan if kind == "uniform" else ragged_plan)(cg))
    with torch.no_grad():
        ref = _output(model(**inputs))
    t0 = time.perf_counter()
    r = ecospa.export(model, folder, inputs=inputs)
    return {"model": arch.name, "plan": kind, "dense": r.dense_params, "pruned": r.pruned_params,
            "exported": r.params, "overhead": r.overhead, "export_s": time.perf_counter() - t0,
            "changes": {k: list(v) for k, v in r.config_changes.items()}, "padded": dict(r.padded),
            "check_err": r.rel_err, "folder": str(folder)}, inputs, ref


def load_blocked(argv: list[str]) -> None:
    """In the subprocess: block ecospa, load each folder with its config's class, write outputs."""

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "ecospa" or name.startswith("ecospa."):
                raise ImportError(f"{name} is blocked")
            return None

    sys.meta_path.insert(0, Block())
    import transformers
    from safetensors.torch import load_file, save_file

    out = {}
    for folder in argv[1:]:
        cfg = transformers.AutoConfig.from_pretrained(folder)
        cls = getattr(transformers, cfg.architectures[0])
        model = cls.from_pretrained(folder, dtype=torch.float32).eval()
        inputs = load_file(str(Path(folder) / "inputs.safetensors"))
        with torch.no_grad():
            out[folder] = _output(model(**inputs)).contiguous()
    save_file(out, argv[0])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "## Exported checkpoints (ecospa.export)",
        "",
        f"Produced by `{meta['command']}` ({meta['seconds']:.0f} s) with torch {meta['torch']}, transformers "
        f"{meta['transformers']}, on {meta['machine']}. The models of the matrix above whose inputs are token ids, "
        "pruned with a *uniform* plan (every unit of the second key/value head's couplings and every third FFN unit, "
        "in every layer) and a *ragged* one (a random third of every coupling's units), exported with "
        "`ecospa.export` and loaded back by transformers in one fresh process where `ecospa` cannot be imported; "
        f"*reload err*: max relative error of its outputs against the pruned model's (fp32, pass <= {TOL:g}). "
        "*overhead*: exported parameters / pruned parameters - 1 (zero heads or units the config needs to "
        "express what was kept). Uniform plans export exactly as small where the config has a head-count and "
        "head-width field per attention (Llama, Mistral, Mixtral, Qwen2, Gemma, Gemma2, OLMo, Starcoder2, Phi); "
        "where the head width is the hidden size / heads (GPT-2, GPT-Neo, GPT-J, GPT-NeoX, StableLM, Bloom, the "
        "BERT family), the projections are fused in a way no field expresses (Phi-3's qkv_proj, Falcon), or "
        "whole heads cannot go (Qwen3: q/k norms make qk inexact), the heads are exported dense with zeros; "
        "FFN widths shrink wherever the config has a field for them (not Bloom: 4 x hidden). "
        "Seconds are wall time on a shared 2-core machine.",
        "",
        "| model | plan | dense | pruned | exported | overhead | config changes | reload err | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['plan']} | | | | | | | {r['error'][:120]} |")
            continue
        ch = ", ".join(f"{k} {a}->{b}" for k, (a, b) in sorted(r["changes"].items())) or "-"
        lines.append(f"| {r['model']} | {r['plan']} | {r['dense']:,} | {r['pruned']:,} | {r['exported']:,} | "
                     f"{r['overhead']:.1%} | {ch} | {r['reload_err']:.1e} | {r['status']} |")
    lines += ["", "Padding, by model: the dims exported wider than what was kept, grouped by the config fields "
              "that set their size (`ExportReport.padded` has every dim with its kept and exported widths):", ""]
    for r in rows:
        by_why: dict[str, list[str]] = {}
        for k, v in sorted(r.get("padded", {}).items()):
            pattern, _, dim = k.rpartition(" dim ")
            short = ".".join(pattern.split(".")[-2:]) + f"[{dim}]"
            by_why.setdefault(v.split(": ", 1)[-1], []).append(short)
        for why, dims in by_why.items():
            lines.append(f"- **{r['model']}** ({r['plan']}): {', '.join(f'`{d}`' for d in dims)}: {why}")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- export-matrix: bench/export_matrix.py -->", "<!-- /export-matrix -->"


def put_in_doc(doc: Path, md: str) -> None:
    """Replace (or append) the export section of ``doc``."""
    text = doc.read_text() if doc.is_file() else ""
    block = f"{BEGIN}\n{md}{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.write_text(text)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--load-blocked":
        load_blocked(sys.argv[2:])
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    from compat_archs import ARCHS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of row names")
    ap.add_argument("--json", default=str(ROOT / "bench/results/export_matrix.json"))
    ap.add_argument("--md", default=str(ROOT / "bench/results/export_matrix.md"))
    ap.add_argument("--doc", default=str(ROOT / "docs/compatibility.md"))
    ap.add_argument("--no-doc", action="store_true", help="leave docs/compatibility.md alone")
    ap.add_argument("--render", metavar="JSON", help="only write the Markdown of a JSON this script wrote")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        md = markdown(data["rows"], data["meta"])
        Path(args.md).write_text(md)
        if not args.no_doc:
            put_in_doc(Path(args.doc), md)
        return 0
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file

    pick = [s for s in args.only.split(",") if s]
    archs = [a for a in ARCHS if a.family in ("decoder", "encoder") and a.needs == "transformers"
             and (not pick or any(s in a.name for s in pick))]
    t0 = time.perf_counter()
    rows, refs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for a in archs:
            for kind in ("uniform", "ragged"):
                folder = Path(tmp) / f"{a.name}-{kind}"
                try:
                    row, inputs, ref = export_row(a, kind, folder)
                    save_file({k: v.contiguous() for k, v in inputs.items()}, str(folder / "inputs.safetensors"))
                    refs[str(folder)] = ref
                except Exception as e:  # noqa: BLE001 - a row records its failure and the matrix goes on
                    row = {"model": a.name, "plan": kind, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                rows.append(row)
                print(f"{a.name:12s} {kind:8s} {row.get('overhead', float('nan')):7.1%} {row.get('error', '')[:120]}",
                      flush=True)
        out = Path(tmp) / "out.safetensors"
        proc = subprocess.run([sys.executable, __file__, "--load-blocked", str(out), *refs], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        got = load_file(str(out))
        for r in rows:
            if "error" in r:
                continue
            ref, back = refs[r["folder"]], got[r["folder"]]
            r["reload_err"] = float(((back - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
            r["status"] = "ok" if r["reload_err"] <= TOL else "MISMATCH"
            del r["folder"]
    import transformers

    meta = {"command": "python bench/export_matrix.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": time.perf_counter() - t0, "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": f"{platform.machine()} CPU, 1 thread"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = markdown(rows, meta)
    Path(args.md).write_text(md)
    if not args.no_doc and not pick:
        put_in_doc(Path(args.doc), md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
