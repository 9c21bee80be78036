"""Cost of EcoSpa's per-step work (Eq. 6 accumulation) relative to a training step.

GPT-2-small shape (12 layers, width 768, 12 heads, vocab 50257) from ``ecospa.recipes.nanogpt``, fp32,
AdamW, on CPU by default. Each round times, in alternating order, a plain training step (A) and
a training step followed by ``sp.step()`` (B, with pruning disabled), and inside B the
``sp.step()`` call alone, in wall time and in process CPU time (steadier when other jobs share
the machine). Reported: median ``sp.step()`` time / median plain step time (wall and CPU), and
the median of the per-round ratios ``B / A - 1`` (noisiest).

    python bench/bench_importance_overhead.py --rounds 5 --batch 4 --seq 256
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ecospa
from ecospa.recipes.nanogpt import GPT, GPTConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--score", default="fisher", help="coupling score (taylor adds |w*g|)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig.gpt2_small(n_layer=args.layers, block_size=max(args.seq, 64))
    model = GPT(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=args.device)
    t0 = time.perf_counter()
    cg = ecospa.auto_couple(model, (x[:1, :args.seq],))
    t_couple = time.perf_counter() - t0
    sp = ecospa.EcoSpa(model, opt, 0.5, couplings=cg, every=10 ** 9, coupling_score=args.score)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    train_step()
    sp.step()  # warm-up (allocations, first-touch)
    wall = {"A": [], "B": [], "sp": []}
    cpu = {"A": [], "B": [], "sp": []}  # process CPU time: less sensitive to other jobs on the machine
    for r in range(args.rounds):
        for variant in (("A", "B") if r % 2 == 0 else ("B", "A")):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            train_step()
            sync()
            t1, c1 = time.perf_counter(), time.process_time()
            if variant == "B":
                sp.step()
                sync()
                t2, c2 = time.perf_counter(), time.process_time()
                wall["B"].append(t2 - t0), cpu["B"].append(c2 - c0)
                wall["sp"].append(t2 - t1), cpu["sp"].append(c2 - c1)
            else:
                wall["A"].append(t1 - t0), cpu["A"].append(c1 - c0)
        print(f"round {r}: step {wall['A'][-1]:.3f}s (cpu {cpu['A'][-1]:.3f}s), step+sp.step "
              f"{wall['B'][-1]:.3f}s, sp.step {wall['sp'][-1] * 1e3:.1f}ms (cpu {cpu['sp'][-1] * 1e3:.1f}ms)",
              flush=True)
    med = statistics.median
    res = {
        "shape": f"GPT-2 small ({args.layers} layers), batch {args.batch} x {args.seq}, {args.device}, "
                 f"{args.threads} threads",
        "couplings": len(cg), "auto_couple_s": round(t_couple, 2),
        "params": sum(p.numel() for p in model.parameters()), "tracked_params": sp.importance.tracked_params,
        "step_s_median": med(wall["A"]), "sp_step_ms_median": 1e3 * med(wall["sp"]),
        "overhead_wall": med(wall["sp"]) / med(wall["A"]),
        "overhead_cpu": med(cpu["sp"]) / med(cpu["A"]),
        "overhead_paired_wall": med(b / a - 1 for a, b in zip(wall["A"], wall["B"])),
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
