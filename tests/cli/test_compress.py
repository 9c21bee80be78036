"""``ecospa compress`` on a tiny random Llama saved with save_pretrained, and a tiny text."""
from __future__ import annotations

import json

import pytest
import torch

import ecospa


def test_compress_reaches_the_target_and_reports_perplexity(compressed):
    assert compressed.code == 0, compressed.err
    s = json.loads((compressed.directory / "compress.json").read_text())
    assert s["params_after"] <= s["target_params"] < s["params_before"]
    assert s["report"]["kept_fraction"] == pytest.approx(0.7, abs=0.05)
    assert s["params_after"] == sum(p.numel() for p in compressed.model.parameters())
    for k in ("ppl_before", "ppl_after"):
        assert s[k] > 1.0 and s[k] == s[k]  # finite, not NaN
    assert "before" in compressed.out and "after" in compressed.out and f"{s['params_after']:,}" in compressed.out
    assert (compressed.directory / "tokenizer.json").is_file()  # ready to use with its tokenizer
    for stage in ("perplexity before", "calibrate", "perplexity after"):  # progress bars, on stderr only
        assert stage in compressed.err and stage not in compressed.out


def test_the_saved_model_loads_and_equals_the_compressed_one(compressed):
    assert compressed.code == 0, compressed.err
    loaded = ecospa.load(compressed.directory)
    model = compressed.model.eval()
    assert not loaded.training
    assert [(n, p.shape) for n, p in loaded.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_compress_refuses_bad_input_before_working(cli, llama_dir, text_file, tmp_path):
    base = [llama_dir, "--text", text_file, "--out", tmp_path / "o"]
    r = cli("compress", *base, "--target", "0.7", "--seq", "100000")
    assert r.code == 2 and "--seq 100000" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    r = cli("compress", llama_dir, "--text", text_file, "--out", tmp_path / "busy", "--target", "0.7")
    assert r.code == 2 and "not an ecospa checkpoint" in r.err, r.err
    assert (tmp_path / "busy" / "x.txt").read_text() == "mine"
    r = cli("compress", tmp_path, "--text", text_file, "--out", tmp_path / "o", "--target", "0.7")
    assert r.code == 2 and "neither a pretrained transformers folder" in r.err, r.err
    assert not (tmp_path / "o").exists()
