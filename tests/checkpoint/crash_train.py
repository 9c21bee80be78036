"""A training run with EcoSpa that checkpoints every few steps and resumes from its last
checkpoint; killed with SIGKILL by ``test_crash.py``.

    python -m tests.checkpoint.crash_train CKPT FINAL [--pause PHASE:N]

A tiny MLP language model with dropout (CPU, one thread, deterministic: batches depend on the
step only, dropout on torch's generator, saved with ``rng=True``), AdamW, EcoSpa pruning every 3
steps. At start it resumes from ``CKPT`` when ``ecospa.checkpoint.exists(CKPT)``. Every
``SAVE_EVERY`` steps it saves model, optimizer, EcoSpa, RNG states and the step to ``CKPT``; at
the end it saves the final model to ``FINAL``. Markers on stdout (``start N``, ``step N``,
``saving N``, ``saved N``, ``pause PHASE``) let the test time its kills.

``--pause PHASE:N`` stops (sleeps) inside the N-th save of this process, at ``PHASE``:
``write`` after the first file of the new checkpoint is fsync-ed (a partial temporary
directory), ``swap`` between the two renames (the checkpoint directory is missing, the previous
one is at its ``.ecospa-old`` name), ``swapped`` after both renames, before the old directory
is deleted. The test kills the process there.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.checkpoint import exists, read_extra

STEPS, SAVE_EVERY, VOCAB, SEQ = 16, 2, 11, 6


class TinyLM(nn.Module):
    """Embedding, a dropout MLP block, and a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.fc2(self.drop(F.gelu(self.fc1(h))))
        return self.head(h)


def build():
    """``(model, optimizer, EcoSpa)`` of a fresh run."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp = ecospa.EcoSpa(model, opt, target=0.5, every=3, example_inputs=(torch.zeros(1, SEQ, dtype=torch.long),))
    return model, opt, sp


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randint(0, VOCAB, (8, SEQ + 1), generator=g)


def run(ckpt: str | None, final: str, say=lambda s: None) -> nn.Module:
    """Train to ``STEPS`` (resuming from ``ckpt`` when it holds a checkpoint); save to ``final``."""
    torch.set_num_threads(1)
    model, opt, sp = build()
    start = 0
    if ckpt is not None and exists(ckpt):
        ecospa.load(ckpt, model, optimizer=opt, ecospa=sp, rng=True)
        start = read_extra(ckpt)["step"]
    say(f"start {start}")
    for step in range(start + 1, STEPS + 1):
        model.train()
        x = batch(step)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        sp.step()
        say(f"step {step}")
        if ckpt is not None and step % SAVE_EVERY == 0:
            say(f"saving {step}")
            ecospa.save(model, ckpt, ecospa=sp, extra={"step": step}, rng=True)
            say(f"saved {step}")
    ecospa.save(model, final)
    say("done")
    return model


def _pause_in_saves(phase: str, nth: int, ckpt: str, say) -> None:
    """Make the ``nth`` save of this process sleep at ``phase`` (see the module docstring)."""
    target = os.path.realpath(ckpt)
    count = {"save": 0, "fsync": 0}
    real_fsync, real_rename, real_save = os.fsync, os.rename, ecospa.save

    def stop(where: str) -> None:
        if count["save"] == nth and phase == where:
            say(f"pause {phase}")
            time.sleep(60)

    def counting_save(*args, **kwargs):
        count["save"] += 1
        count["fsync"] = 0
        return real_save(*args, **kwargs)

    def fsync(fd):
        real_fsync(fd)
        count["fsync"] += 1
        if count["fsync"] == 1:
            stop("write")

    def rename(src, dst):
        real_rename(src, dst)
        if os.fspath(src) == target:
            stop("swap")
        elif os.fspath(dst) == target and ".ecospa-tmp." in os.fspath(src):  # not a recovery
            stop("swapped")

    os.fsync, os.rename = fsync, rename
    ecospa.save = counting_save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("final")
    ap.add_argument("--pause", default=None, help="PHASE:N (write, swap, swapped)")
    args = ap.parse_args()

    def say(s: str) -> None:
        print(s, flush=True)

    if args.pause:
        phase, nth = args.pause.split(":")
        _pause_in_saves(phase, int(nth), args.ckpt, say)
    run(args.ckpt, args.final, say)


if __name__ == "__main__":
    sys.exit(main())
