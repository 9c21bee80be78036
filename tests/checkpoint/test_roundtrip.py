"""Save and load round trips on every model of the tests: the zoo and the transformers models.

Each model is trained a step, pruned with a random third of every coupling (with its Adam
optimizer), saved, and loaded into a freshly built dense model with other random weights:
outputs are bit-identical (torch.equal: the removals are replayed in one prune, the saved model
may have been pruned in several, and both run the same code at the same widths), parameter
names and shapes are the same, the Adam state is restored, and a further step gives identical
parameters.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

import ecospa
from tests.checkpoint.helpers import (
    assert_same_optimizer,
    assert_same_outputs,
    assert_same_params,
    outputs,
    train_step,
)
from tests.helpers import random_plan
from tests.models import CASES


def _pruned(model, inputs, opt, seed=1, narrow=True):
    cg = ecospa.auto_couple(model, inputs)
    ecospa.prune(model, random_plan(cg, random.Random(seed)), opt, couplings=cg, narrow=narrow)
    return cg


def _round_trip(name, tmp_path, narrow):
    """Train a step, prune (the step's Adam moments are sliced), save, load into a fresh model."""
    case = CASES[name]
    model, inputs = case.factory().eval(), case.inputs()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, opt, inputs)
    _pruned(model, inputs, opt, narrow=narrow)
    ref = outputs(model, inputs)
    ecospa.save(model, tmp_path / "ck", optimizer=opt)

    torch.manual_seed(123)  # other random weights: everything must come from the checkpoint
    fresh = case.factory().eval()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1.0)
    out = ecospa.load(tmp_path / "ck", fresh, optimizer=fresh_opt, example_inputs=inputs, narrow=narrow)
    assert out is fresh
    assert_same_outputs(outputs(fresh, inputs), ref)
    assert_same_params(fresh, model)
    assert {n: r.to_dict() for n, r in ecospa.param_records(fresh).items()} == \
        {n: r.to_dict() for n, r in ecospa.param_records(model).items()}
    assert_same_optimizer(model, opt, fresh, fresh_opt)
    return case, inputs, model, opt, fresh, fresh_opt


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_round_trip(name, tmp_path):
    """Every zoo model, on the exact (scatter) path, which runs without compiling a narrow graph;
    then one more Adam step on both gives identical parameters."""
    case, inputs, model, opt, fresh, fresh_opt = _round_trip(name, tmp_path, narrow=False)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        torch.manual_seed(9)  # same dropout masks
        train_step(m, o, inputs)
    assert_same_params(fresh, model)
    assert_same_optimizer(model, opt, fresh, fresh_opt)


@pytest.mark.parametrize("name", ["nanogpt", "llama_rope_interleaved", "nn_multihead_attention", "cross_attention"])
def test_zoo_round_trip_narrow(name, tmp_path):
    """The default narrow path: the saved and the loaded model run narrow graphs built for the
    same kept widths, and compute bit-identically."""
    _round_trip(name, tmp_path, narrow=True)


def test_manifest_keys_removals_by_parameter_name(tmp_path):
    """The removals JSON is param_records keyed by name, with the format and model class."""
    case = CASES["nanogpt"]
    model, inputs = case.factory().eval(), case.inputs()
    _pruned(model, inputs, None, narrow=False)
    ecospa.save(model, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "ecospa.json").read_text())
    assert manifest["format"] == "ecospa.checkpoint" and manifest["format_version"] == 1
    assert manifest["ecospa_version"] == ecospa.__version__
    assert manifest["model"]["class"] == type(model).__qualname__
    assert manifest["model"]["removals"] == {n: r.to_dict() for n, r in ecospa.param_records(model).items()}
    # nanoGPT ties wte and lm_head: stored once, the other name is an alias
    assert manifest["model"]["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["ecospa.json", "model.safetensors"]


def test_dense_model_round_trip_without_inputs(tmp_path):
    """A checkpoint with nothing removed needs no couplings, so no example inputs."""
    case = CASES["llama_rope_half"]
    model, inputs = case.factory().eval(), case.inputs()
    ecospa.save(model, tmp_path / "ck")
    torch.manual_seed(7)
    fresh = ecospa.load(tmp_path / "ck", case.factory().eval())
    assert_same_outputs(outputs(fresh, inputs), outputs(model, inputs))


def test_pruned_twice_and_loaded_into_less_pruned(tmp_path):
    """A model pruned in two rounds loads into a dense one, and into one that went through the
    first round only (the rest of the removals is replayed)."""
    case = CASES["nanogpt_block"]
    model, inputs = case.factory().eval(), case.inputs()
    cg = _pruned(model, inputs, None, seed=1)
    state_after_first = {k: v.clone() for k, v in model.state_dict().items()}
    first_plan = {n: r.to_dict() for n, r in ecospa.param_records(model).items()}
    cg2 = ecospa.auto_couple(model, inputs)
    ecospa.prune(model, random_plan(cg2, random.Random(2), frac=0.25), couplings=cg2)
    ref = outputs(model, inputs)
    ecospa.save(model, tmp_path / "ck")
    for partly in (False, True):
        fresh = case.factory().eval()
        if partly:
            ecospa.prune(fresh, {c.name: u for c, u in random_plan(cg, random.Random(1)).items()},
                         couplings=ecospa.auto_couple(fresh, inputs))
            assert {n: r.to_dict() for n, r in ecospa.param_records(fresh).items()} == first_plan
            fresh.load_state_dict(state_after_first)
        ecospa.load(tmp_path / "ck", fresh, example_inputs=inputs)
        assert_same_outputs(outputs(fresh, inputs), ref)
