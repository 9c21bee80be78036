"""Bad input to the ``ecospa`` command as a new user types it (issue 17): every case exits 2 with
one line naming the argument and the way out, before the model is loaded (or, for what needs the
model's couplings, before the perplexity pass); and ``compress`` on a GGUF file, as docs/cli.md
promises."""
from __future__ import annotations

import json
import sys

import pytest
import torch

import ecospa
import ecospa.cli.compress as cli_compress
from tests.cli.test_errors import one_line_error

SMALL = ["--seq", "32", "--batches", "2", "--rounds", "1", "--eval-windows", "1", "--no-progress"]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model is loaded (the bad input must be refused before)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(cli_compress, "load_model", refuse)


@pytest.fixture
def no_perplexity(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the perplexity pass started before the bad input was refused")
    monkeypatch.setattr(cli_compress, "perplexity", refuse)


# ----------------------------------------------------------------------------- compress --out / --target


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_out_that_cannot_be_created_is_refused_before_loading(cli, llama_dir, text_file, no_loading):
    r = cli("compress", llama_dir, "--text", text_file, "--target", "0.7", "--out", "/proc/ecospa-x")
    one_line_error(r, "compress", "--out", "cannot save to /proc/ecospa-x", "choose a folder you can write to")


def test_out_under_a_file_is_refused_before_loading(cli, llama_dir, text_file, tmp_path, no_loading):
    (tmp_path / "f").write_text("x")
    r = cli("compress", llama_dir, "--text", text_file, "--target", "0.7", "--out", tmp_path / "f" / "o")
    one_line_error(r, "compress", "is a file, not a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_target_larger_than_the_model_is_refused_before_loading(cli, llama_dir, text_file, tmp_path, no_loading):
    r = cli("compress", llama_dir, "--text", text_file, "--target", "100000000000", "--out", tmp_path / "o",
            *SMALL)
    one_line_error(r, "compress", "--target 100000000000 parameters is larger than the model", "ask for at most")
    assert not (tmp_path / "o").exists()


def test_target_below_the_smallest_size_is_refused_before_perplexity(cli, llama_dir, text_file, tmp_path,
                                                                     no_perplexity):
    r = cli("compress", llama_dir, "--text", text_file, "--target", "1000", "--out", tmp_path / "o", *SMALL)
    one_line_error(r, "compress", "--target: target 1000", "smallest")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "missing.txt", "no such text file"),
    (lambda d: (d / "w.bin").write_bytes(b"\xff\xfe\x00\x80" * 64) and d / "w.bin", "is not UTF-8 text"),
])
def test_bad_text_file(cli, llama_dir, tmp_path, make, fragment, no_loading):
    r = cli("compress", llama_dir, "--text", make(tmp_path), "--target", "0.7", "--out", tmp_path / "o")
    one_line_error(r, "compress", fragment)


def test_missing_tokenizer_folder(cli, llama_dir, text_file, tmp_path, no_loading):
    r = cli("compress", llama_dir, "--text", text_file, "--target", "0.7", "--out", tmp_path / "o",
            "--tokenizer", tmp_path / "nope")
    one_line_error(r, "compress", "--tokenizer", "no such folder")


@pytest.mark.parametrize("what", ["missing", "file"])
def test_model_dir_that_is_not_a_model(cli, text_file, tmp_path, what, no_loading):
    src = tmp_path / "m.bin"
    if what == "file":
        src.write_bytes(b"0")
    r = cli("compress", src, "--text", text_file, "--target", "0.7", "--out", tmp_path / "o")
    one_line_error(r, "compress", "MODEL_DIR", "no such file or folder" if what == "missing" else ".gguf")


# ----------------------------------------------------------------------------- compress on GGUF


@pytest.mark.parametrize("as_folder", [False, True])
def test_compress_a_gguf_file_with_its_own_tokenizer(cli, gguf_with_tokenizer, text_file, tmp_path, as_folder):
    src = gguf_with_tokenizer.parent if as_folder else gguf_with_tokenizer
    out = tmp_path / "o"
    r = cli("compress", src, "--text", text_file, "--target", "0.7", "--out", out, *SMALL)
    assert r.code == 0, r.err
    s = json.loads((out / "compress.json").read_text())
    assert s["params_after"] <= s["target_params"] < s["params_before"]
    assert s["ppl_after"] == s["ppl_after"] and s["ppl_after"] > 1.0
    assert (out / "tokenizer.json").is_file()  # the GGUF's tokenizer, saved beside the model
    model = ecospa.load(out)
    assert sum(p.numel() for p in model.parameters()) == s["params_after"]
    assert model(torch.zeros(1, 8, dtype=torch.long)).logits.isfinite().all()


def test_compress_a_gguf_without_tokenizer(cli, gguf_file, llama_dir, text_file, tmp_path):
    r = cli("compress", gguf_file, "--text", text_file, "--target", "0.7", "--out", tmp_path / "o", *SMALL)
    one_line_error(r, "compress", "no usable tokenizer", "--tokenizer")
    r = cli("compress", gguf_file, "--text", text_file, "--target", "0.7", "--out", tmp_path / "o",
            "--tokenizer", llama_dir, *SMALL)
    assert r.code == 0, r.err
    assert (tmp_path / "o" / "ecospa.json").is_file()


# ----------------------------------------------------------------------------- abbreviations, --set


@pytest.mark.parametrize("args, full", [
    (["inspect", "gpt2", "--graph", "{tmp}/g.png", "--no-narrow"], "--graphml"),
    (["inspect", "gpt2", "--no-narr"], "--no-narrow"),
    (["compress", "{tmp}", "--text", "t.txt", "--target", "0.5", "--out", "{tmp}/o", "--recover", "3"],
     "--recover-steps"),
    (["train", "t.txt", "--step", "3"], "--steps"),
    (["demo", "--qui"], "--quick"),
    (["plot", "run.json", "--mod", "m:f"], "--model"),
])
def test_option_prefixes_are_refused(cli, tmp_path, args, full):
    r = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    one_line_error(r, args[0], "unrecognized arguments", f"did you mean {full}")
    assert list(tmp_path.iterdir()) == []  # nothing written (the GraphML went nowhere)


def test_top_level_prefix_refused(cli):
    r = cli("--vers")
    assert r.code == 2 and "unrecognized arguments: --vers" in r.err and len(r.err.strip().splitlines()) == 1


def test_unknown_set_key_is_refused_with_the_valid_ones(cli):
    r = cli("inspect", "gpt2", "--set", "nosuchkey=3", "--no-narrow")
    one_line_error(r, "inspect", "--set nosuchkey", "GPT2Config", "n_layer", "n_embd")
    r = cli("inspect", "llama", "--set", "num_layers=1", "--no-narrow")
    one_line_error(r, "inspect", "did you mean num_hidden_layers")
    assert cli("inspect", "gpt2", "--set", "n_layer=1", "--set", "num_attention_heads=2", "--no-narrow").code == 0


def test_set_where_there_is_no_config_is_refused(cli, llama_dir, tmp_path):
    one_line_error(cli("inspect", llama_dir, "--set", "n_layer=1"), "inspect", "no config to override")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64}))
    one_line_error(cli("inspect", cfg, "--set", "bogus=1", "--no-narrow"), "inspect", "--set bogus")


def test_train_out_that_cannot_be_created_is_refused_before_training(cli, text_file, tmp_path, monkeypatch):
    import ecospa.recipes.demo as demo

    def refuse(cfg):
        raise AssertionError("training started before the bad --out was refused")
    monkeypatch.setattr(demo, "run_demo", refuse)
    (tmp_path / "f").write_text("x")
    r = cli("train", text_file, "--quick", "--out", tmp_path / "f" / "run")
    one_line_error(r, "train", "--out", "cannot create this folder")
