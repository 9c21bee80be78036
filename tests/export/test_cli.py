"""``ecospa export CHECKPOINT OUT``: an ecospa checkpoint of a pruned model becomes a standard
transformers checkpoint (and GGUF); bad input exits 2 with one line."""
from __future__ import annotations

import json

import pytest
import torch

import ecospa
from ecospa.cli import main
from tests.export.models import inputs, pruned

transformers = pytest.importorskip("transformers")


def test_export_command_writes_a_loadable_checkpoint_and_gguf(tmp_path, capsys):
    m = pruned("llama", "uniform")
    ecospa.save(m, tmp_path / "ck")
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "hf"), "--gguf", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == d["pruned_params"] < d["dense_params"] and d["overhead"] == 0.0
    assert d["config_changes"]["num_key_value_heads"] == [2, 1]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = m(inputs()).logits
        assert float((back(inputs()).logits - ref).norm() / ref.norm()) <= 1e-5
    assert (tmp_path / "hf" / "model.gguf").is_file()


def test_export_command_refuses_a_folder_that_is_no_ecospa_checkpoint(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["export", str(tmp_path / "x"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not an ecospa checkpoint" in err and len(err.strip().splitlines()) == 1


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]"] + [f"w{i}" for i in range(20)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_the_checkpoints_tokenizer_goes_along(tmp_path, capsys):
    m = pruned("gpt2", "ragged")
    ecospa.save(m, tmp_path / "ck")
    _tokenizer().save_pretrained(tmp_path / "ck")
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    # GPT-2's heads cannot shrink (head width = n_embd / n_head): said, with the way out
    assert "padded transformer.h.*.attn.c_attn.weight dim 1" in out and "to export without padding" in out
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("w3 w7")["input_ids"] == [4, 8]
