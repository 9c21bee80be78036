"""What exportable plans cost: SmolLM2-135M compressed with and without ``exportable=True``.

For each size (the kept fraction of the prunable parameters: 90%, 70%, 50%) and each setting:

- ``ecospa.compress(model, size, calib, rounds=R, calibration_batches=..., exportable=...)`` from
  the dense model (defaults otherwise: mask-Fisher scores, global allocation, least-squares
  refit), calibration windows from the first 80% of WikiText-2 validation;
- perplexity on evenly spaced windows of the last 20% (the same windows for every model);
- ``ecospa.export`` to a folder: parameters written vs the pruned model's (padding overhead);
- decode speed of the exported folder loaded by plain transformers
  (``AutoModelForCausalLM.from_pretrained``, no ecospa forward in it) against the dense model:
  greedy, batch 1, ``--threads`` threads, ``--new`` tokens after a ``--prompt``-token prompt,
  the two models interleaved for ``--speed-rounds`` rounds, median tokens/s.

    python bench/export_cost.py [--calib 8] [--seq 256] [--eval 32] [--rounds 1]

Writes ``bench/results/export_cost.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ecospa  # noqa: E402
from smollm2_common import load_model, perplexity, token_splits, windows  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SIZES = (0.9, 0.7, 0.5)


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, new: int) -> float:
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                   pad_token_id=0)
    return time.perf_counter() - t0


def speed(dense, exported, prompt, new: int, rounds: int) -> dict:
    """Median tokens/s of both models, interleaved round by round (after one warm-up each)."""
    for m in (dense, exported):
        decode_seconds(m, prompt, 4)
    td, te = [], []
    for _ in range(rounds):
        td.append(decode_seconds(dense, prompt, new))
        te.append(decode_seconds(exported, prompt, new))
    d, e = new / statistics.median(td), new / statistics.median(te)
    return {"dense_tok_s": d, "exported_tok_s": e, "speedup": e / d}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=8, help="calibration windows")
    ap.add_argument("--seq", type=int, default=256, help="tokens per calibration / evaluation window")
    ap.add_argument("--eval", type=int, default=32, help="evaluation windows")
    ap.add_argument("--rounds", type=int, default=1, help="compress calibration rounds")
    ap.add_argument("--threads", type=int, default=1, help="threads of the decode timing")
    ap.add_argument("--compress-threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--speed-rounds", type=int, default=5)
    ap.add_argument("--sizes", type=float, nargs="*", default=list(SIZES))
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    calib_ids, eval_ids = token_splits()
    calib = list(windows(calib_ids, args.seq, args.calib, seed=0).split(2))
    ev = windows(eval_ids, args.seq, args.eval)
    prompt = eval_ids[:args.prompt].unsqueeze(0)
    torch.set_num_threads(args.compress_threads)
    dense = load_model()
    dense_gen = copy.deepcopy(dense)
    dense_gen.config.use_cache = True
    res = {"command": "python bench/export_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "args": vars(args), "torch": torch.__version__, "dense_params": sum(p.numel() for p in dense.parameters()),
           "dense_ppl": perplexity(dense, ev), "runs": []}
    print(f"dense ppl {res['dense_ppl']:.2f}", flush=True)
    for size in args.sizes:
        for exportable in (False, True):
            torch.set_num_threads(args.compress_threads)
            m = copy.deepcopy(dense)
            t0 = time.perf_counter()
            m, rep = ecospa.compress(m, size, calib, rounds=args.rounds, exportable=exportable)
            secs = time.perf_counter() - t0
            run = {"size": size, "exportable": exportable, "params": rep.params_after, "target": rep.target_params,
                   "kept_fraction": rep.kept_fraction, "compress_s": secs, "ppl": perplexity(m, ev)}
            with tempfile.TemporaryDirectory() as d:
                er = ecospa.export(m, d)
                run.update(exported_params=er.params, overhead=er.overhead,
                           config={k: list(v) for k, v in er.config_changes.items()})
                del m
                gc.collect()
                out = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            out.config.use_cache = True
            torch.set_num_threads(args.threads)
            run.update(speed(dense_gen, out, prompt, args.new, args.speed_rounds))
            del out
            gc.collect()
            res["runs"].append(run)
            print(json.dumps(run), flush=True)
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "export_cost.json").write_text(json.dumps(res, indent=1))
    (OUT / "export_cost.md").write_text(markdown(res))


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [
        "# What exportable plans cost (SmolLM2-135M, WikiText-2)", "",
        f"Command: `{res['command']}` (torch {res['torch']}, 2-core shared machine).", "",
        f"`ecospa.compress(model, size, calib, rounds={a['rounds']}, exportable=...)`, defaults otherwise; "
        f"calibration: {a['calib']} windows of {a['seq']} tokens from the first 80% of WikiText-2 validation; "
        f"perplexity: {a['eval']} evenly spaced windows of {a['seq']} tokens of the last 20%. Size: kept "
        "fraction of the prunable parameters. Export: `ecospa.export`; overhead: exported parameters over "
        f"the pruned model's - 1. Decode: the exported folder loaded by `AutoModelForCausalLM.from_pretrained`, "
        f"greedy, batch 1, {a['threads']} thread, {a['new']} new tokens after {a['prompt']} prompt tokens, "
        f"interleaved with the dense model for {a['speed_rounds']} rounds, median tokens/s. Short calibration "
        "and evaluation to stay affordable on a shared 2-core machine: compare the rows with each other, not "
        "with bench/results/smollm2.md.", "",
        f"Dense: {res['dense_params']:,} parameters, perplexity {res['dense_ppl']:.2f}.", "",
        "| size | exportable | params (pruned) | exported params | padding | perplexity | dense tok/s | "
        "exported tok/s | speed-up | config |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        cfg = ", ".join(f"{k} {v[0]}->{v[1]}" for k, v in sorted(r["config"].items()))
        lines.append(f"| {r['size']:.0%} | {'yes' if r['exportable'] else 'no'} | {r['params']:,} | "
                     f"{r['exported_params']:,} | {r['overhead']:.1%} | {r['ppl']:.2f} | {r['dense_tok_s']:.1f} | "
                     f"{r['exported_tok_s']:.1f} | {r['speedup']:.2f}x | {cfg} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
