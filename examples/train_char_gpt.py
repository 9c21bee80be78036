"""Train a nanoGPT-style character model on tiny-shakespeare with EcoSpa, on CPU, in minutes.

The model starts dense; every ``--every`` steps EcoSpa scores the couplings (Eq. 6), removes the
weakest units (Eq. 9, Algorithm 1) from the parameters and the AdamW state, and training goes on
with the same model and optimizer objects until half of the prunable parameters are gone.

    python examples/train_char_gpt.py                  # about 1500 steps
    python examples/train_char_gpt.py --steps 300 --every 5 --start 20    # a quick look

Only the public API is used (``ecospa.EcoSpa``), with the model and the text of ``ecospa.recipes``;
needs the demo extra (tqdm): ``pip install -e '.[demo]'``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time

import torch
from tqdm import tqdm

import ecospa
from ecospa.recipes.data import load_tinyshakespeare
from ecospa.recipes.nanogpt import GPT, GPTConfig


def get_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="EcoSpa on a character-level GPT (tiny-shakespeare)")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=64, help="context length")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--target", type=float, default=0.5, help="fraction of prunable params to keep")
    ap.add_argument("--every", type=int, default=25, help="prune every N steps")
    ap.add_argument("--start", type=int, default=200, help="first pruning step")
    ap.add_argument("--theta", type=float, default=0.9)
    ap.add_argument("--top-k", type=float, default=0.3)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads; one is about as fast for this small model and does not slow "
                         "to a crawl when other jobs share the cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan-out", default=None, help="write the removal plan (JSON) here")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every pruning event")
    return ap.parse_args()


def main() -> None:
    args = get_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    text = load_tinyshakespeare()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_train = int(0.9 * len(data))
    train, val = data[:n_train], data[n_train:]
    gen = torch.Generator().manual_seed(args.seed)

    def batch(split: torch.Tensor) -> torch.Tensor:
        ix = torch.randint(len(split) - args.block - 1, (args.batch,), generator=gen)
        return torch.stack([split[i:i + args.block + 1] for i in ix.tolist()])  # (B, T+1)

    @torch.no_grad()
    def evaluate(model: GPT) -> float:
        model.eval()
        g = torch.Generator().manual_seed(1234)  # same validation batches every time
        losses = []
        for _ in range(args.eval_batches):
            ix = torch.randint(len(val) - args.block - 1, (args.batch,), generator=g)
            xb = torch.stack([val[i:i + args.block + 1] for i in ix.tolist()])
            losses.append(float(model.loss(xb[:, :-1], xb[:, 1:])))
        model.train()
        return sum(losses) / len(losses)

    cfg = GPTConfig(block_size=args.block, vocab_size=len(chars), n_layer=args.layers,
                    n_head=args.heads, n_embd=args.width)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))

    # --- EcoSpa: line 1 of 3 (the other two: sp.step() below, and nothing else) ---------------
    sp = ecospa.EcoSpa(model, opt, target=args.target, example_inputs=(batch(train)[:, :-1],),
                       every=args.every, start=args.start, theta=args.theta, top_k=args.top_k,
                       seed=args.seed)
    dense = sp.dense_params
    print(f"model: {dense / 1e6:.3f}M params, {len(sp.couplings)} exact couplings; target "
          f"{sp.target_params / 1e6:.3f}M params (keep {args.target:.0%} of the prunable ones)")
    val0 = evaluate(model)

    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        xb = batch(train)
        loss = model.loss(xb[:, :-1], xb[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        event = sp.step()  # --- EcoSpa: accumulate Eq. 6, prune when due -----------------
        if event is not None or step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", params=f"{sp.num_params / 1e6:.3f}M",
                            rounds=len(sp.events))
    bar.close()
    seconds = time.perf_counter() - t0

    val1 = evaluate(model)
    kept = sp.num_params
    print(f"trained {args.steps} steps in {seconds:.0f}s ({args.steps * args.batch * args.block / seconds:.0f} tokens/s)")
    print(f"pruning rounds: {len(sp.events)}; params {dense} -> {kept} ({kept / dense:.1%} of dense, "
          f"target {sp.target_params}, reached: {sp.done})")
    print(f"val loss: {val0:.3f} at init -> {val1:.3f} after training")
    for kind in ("qk", "vo", "ffn"):
        kept_w = [c.width for c in sp.couplings if c.kind == kind]
        dense_w = [sp.dense_widths[c.name] for c in sp.couplings if c.kind == kind]
        print(f"  {kind}: {sum(kept_w)}/{sum(dense_w)} units kept, widths {kept_w}")
    ctx = torch.tensor([[stoi["\n"]]])
    sample = model.generate(ctx, 200, temperature=0.8, generator=torch.Generator().manual_seed(0))[0]
    print("sample:\n" + "".join(chars[i] for i in sample.tolist()))
    if args.plan_out:
        with open(args.plan_out, "w") as f:
            json.dump(sp.plan.to_dict(), f)
        print(f"plan written to {args.plan_out} ({len(sp.plan)} steps)")


if __name__ == "__main__":
    main()
