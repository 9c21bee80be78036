"""Transformers models: pruned, saved, and loaded both into a freshly built dense model and by
``ecospa.load(directory)`` alone (the dense model rebuilt from the saved config.json)."""
from __future__ import annotations

import json
import random

import pytest
import torch

import ecospa
from tests.checkpoint.helpers import assert_same_outputs, assert_same_params, outputs
from tests.helpers import random_plan

transformers = pytest.importorskip("transformers")
from tests.test_hf_models import HF  # noqa: E402


# two models on the default narrow path, two on the exact path (no narrow graphs to
# build: faster, and both paths are covered)
@pytest.mark.parametrize("name, narrow", [("gpt2", False), ("llama_gqa", True), ("bert", False), ("vit", True)])
def test_hf_round_trip(name, narrow, tmp_path):
    build, _, make_inputs = HF[name]
    model, inputs = build(), make_inputs()
    cg = ecospa.auto_couple(model, inputs)
    ecospa.prune(model, random_plan(cg, random.Random(1)), couplings=cg, narrow=narrow)
    ref = outputs(model, inputs)
    ecospa.save(model, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]

    torch.manual_seed(321)
    dense = build()
    ecospa.load(tmp_path / "ck", dense, example_inputs=inputs, narrow=narrow)
    assert_same_outputs(outputs(dense, inputs), ref)
    assert_same_params(dense, model)

    rebuilt = ecospa.load(tmp_path / "ck", example_inputs=inputs, narrow=narrow)
    assert type(rebuilt) is type(model) and not rebuilt.training
    assert rebuilt.config._attn_implementation == model.config._attn_implementation
    assert_same_outputs(outputs(rebuilt, inputs), ref)
    assert_same_params(rebuilt, model)


def test_dense_checkpoint_reads_with_from_pretrained(tmp_path):
    """An unpruned transformers checkpoint is also a plain Hugging Face directory (config.json,
    model.safetensors with format=pt; the tied lm_head is re-tied by transformers)."""
    build, _, make_inputs = HF["gpt2"]
    model, inputs = build(), make_inputs()
    ecospa.save(model, tmp_path / "ck")
    other = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ck", attn_implementation="sdpa").eval()
    assert_same_outputs(outputs(other, inputs), outputs(model, inputs))


def test_bf16_model_rebuilt_in_its_dtype(tmp_path):
    build, _, make_inputs = HF["llama_gqa"]
    model = build().to(torch.bfloat16)
    ecospa.save(model, tmp_path / "ck")
    rebuilt = ecospa.load(tmp_path / "ck")
    assert {p.dtype for p in rebuilt.parameters()} == {torch.bfloat16}
    assert_same_params(rebuilt, model)


def test_optional_submodule_left_out_by_the_constructor(tmp_path):
    """``BertModel(config, add_pooling_layer=False)``: the constructor argument is not in the
    config; the rebuilt model must leave the pooler out too, or its weights would not match."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 7))}
    cg = ecospa.auto_couple(model, inputs)
    ecospa.prune(model, random_plan(cg, random.Random(2)), couplings=cg)
    ecospa.save(model, tmp_path / "ck")
    rebuilt = ecospa.load(tmp_path / "ck", example_inputs=inputs)
    assert rebuilt.pooler is None
    assert_same_outputs(outputs(rebuilt, inputs), outputs(model, inputs))
    assert_same_params(rebuilt, model)
