"""``save_pretrained`` on a pruned transformers model never writes an unloadable folder in
silence: it writes the exported form (loadable by ``from_pretrained``); with ``state_dict=`` (a
Trainer checkpoint, resumed by ecospa's callback) it writes the raw tensors and warns once."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import ecospa
from ecospa.errors import EcospaWarning
from tests.export.models import inputs, pruned

transformers = pytest.importorskip("transformers")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_save_pretrained_of_a_pruned_model_writes_a_loadable_export(tmp_path):
    m = pruned("llama", "uniform")
    m.save_pretrained(tmp_path / "plain")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert back.config.num_key_value_heads == 1 and back.config.intermediate_size == 32
    with torch.no_grad():
        assert rel(back(inputs()).logits, m(inputs()).logits) <= 1e-5


def test_padded_export_through_save_pretrained_warns_with_the_size(tmp_path):
    m = pruned("llama", "ragged")
    with pytest.warns(EcospaWarning, match="padded by"):
        m.save_pretrained(tmp_path / "plain")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert rel(back(inputs()).logits, m(inputs()).logits) <= 1e-5


def test_save_pretrained_with_a_state_dict_writes_raw_tensors_and_warns_once(tmp_path):
    m = pruned("llama", "uniform")
    with pytest.warns(EcospaWarning, match="ecospa.export"):
        m.save_pretrained(tmp_path / "a", state_dict=m.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", EcospaWarning)
        m.save_pretrained(tmp_path / "b", state_dict=None)  # as the Trainer passes it
    with pytest.raises(Exception, match="mismatch"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")


def test_the_guard_follows_deepcopy_and_leaves_dense_models_and_the_class_alone(tmp_path):
    m = pruned("gpt2", "uniform")
    c = copy.deepcopy(m)
    assert c.save_pretrained.model is c
    c.save_pretrained(tmp_path / "copy")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "copy").n_inner == 85
    dense = transformers.GPT2LMHeadModel(m.config)
    assert "save_pretrained" not in dense.__dict__
    dense.save_pretrained(tmp_path / "dense")  # plain transformers
    assert transformers.AutoConfig.from_pretrained(tmp_path / "dense").n_inner is None


def test_export_refuses_what_is_not_a_transformers_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.raises(ecospa.EcospaError, match="ecospa.save"):
        ecospa.export(model, tmp_path / "x")


def test_gguf_refuses_architectures_outside_the_llama_family_before_writing(tmp_path):
    m = pruned("gpt2", "uniform")
    with pytest.raises(ecospa.EcospaError, match="Llama family"):
        ecospa.export(m, tmp_path / "g", gguf=True)
    assert not (tmp_path / "g" / "model.safetensors").exists()
