"""A checkpoint that does not match the model, or is damaged or malicious, raises CheckpointError
before anything changes (model state_dict, parameter objects, optimizer state and groups), and
loading never unpickles."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

import ecospa
from ecospa.checkpoint.tensorfile import write_tensors
from tests.checkpoint.helpers import assert_unchanged, snapshot, train_step
from tests.helpers import random_plan
from tests.models import CASES

CASE = CASES["nanogpt"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A pruned nanoGPT with its Adam state and an EcoSpa-free manifest."""
    torch.manual_seed(0)
    model, inputs = CASE.factory().eval(), CASE.inputs()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_step(model, opt, inputs)
    cg = ecospa.auto_couple(model, inputs)
    ecospa.prune(model, random_plan(cg, random.Random(1)), opt, couplings=cg, narrow=False)
    return ecospa.save(model, tmp_path_factory.mktemp("ck") / "ck", optimizer=opt, extra={"step": 3})


@pytest.fixture
def ck(saved, tmp_path) -> Path:
    """A private copy of the checkpoint to damage."""
    return Path(shutil.copytree(saved, tmp_path / "ck"))


@pytest.fixture
def target():
    """A freshly built dense model with some optimizer state, and its snapshot."""
    model, inputs = CASE.factory().eval(), CASE.inputs()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_step(model, opt, inputs)
    return model, opt, inputs, snapshot(model, opt)


def _manifest(ck: Path) -> dict:
    return json.loads((ck / "ecospa.json").read_text())


def _write_manifest(ck: Path, m: dict) -> None:
    (ck / "ecospa.json").write_text(json.dumps(m))


def _refresh_size(ck: Path, name: str) -> None:
    m = _manifest(ck)
    m["files"][name]["bytes"] = (ck / name).stat().st_size
    _write_manifest(ck, m)


def _fails(ck, target, match: str | None, **kwargs) -> None:
    model, opt, inputs, snap = target
    with pytest.raises(ecospa.CheckpointError, match=match):
        ecospa.load(ck, model, optimizer=opt, example_inputs=inputs, **kwargs)
    assert_unchanged(model, snap, opt)


def test_loads_when_intact(ck, target):
    """The fixture checkpoint itself is fine (so each failure below is the damage's doing)."""
    model, opt, inputs, _ = target
    ecospa.load(ck, model, optimizer=opt, example_inputs=inputs, narrow=False)


def _edit(path: str, value):
    def apply(m):
        node = m
        keys = path.split("/")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value(node[keys[-1]]) if callable(value) else value
    return apply


def _first_removal(m):
    return next(iter(m["model"]["removals"]))


SCHEMA = {
    "not an ecospa manifest": (_edit("format", "something else"), "not an ecospa checkpoint"),
    "newer format": (_edit("format_version", 99), "newer ecospa"),
    "format version a string": (_edit("format_version", "1"), "format_version"),
    "removals a list": (_edit("model/removals", []), r"model\.removals: expected dict"),
    "dense shape of strings": (
        lambda m: m["model"]["removals"][_first_removal(m)].update(dense_shape=["a"]), "dense_shape"),
    "kept indices out of range": (
        lambda m: m["model"]["removals"][_first_removal(m)]["kept"].update({"0": [0, 10 ** 6]}), "increasing"),
    "unknown file": (lambda m: m["files"].update({"evil.pkl": {"bytes": 1}}), "unknown file"),
    "training not a bool": (_edit("model/training", "no"), "training"),
    "optimizer state dangling tensor": (
        lambda m: next(iter(m["optimizer"]["state"].values())).update(exp_avg={"__tensor__": "nope"}),
        "refers to tensor 'nope'"),
    "optimizer groups not a list": (_edit("optimizer/param_groups", {}), "param_groups"),
}


@pytest.mark.parametrize("case", list(SCHEMA))
def test_manifest_schema(case, ck, target):
    edit, match = SCHEMA[case]
    m = _manifest(ck)
    edit(m)
    _write_manifest(ck, m)
    _fails(ck, target, match)


MISMATCH = {
    "a parameter the model lacks": (
        lambda m: m["model"]["removals"].update({"no.such.weight": m["model"]["removals"][_first_removal(m)]}),
        "does not have"),
    "another dense shape": (
        lambda m: m["model"]["removals"][_first_removal(m)].update(
            dense_shape=[k + 1 for k in m["model"]["removals"][_first_removal(m)]["dense_shape"]]),
        "dense shape"),
    "another model class": (_edit("model/class", "GPT2LMHeadModel"), "holds a GPT2LMHeadModel"),
    "removals that split a unit": (
        lambda m: m["model"]["removals"][_first_removal(m)]["kept"].update(
            {d: k[1:] + [] for d, k in m["model"]["removals"][_first_removal(m)]["kept"].items()}),
        "shape|only some of its slices"),
}


@pytest.mark.parametrize("case", list(MISMATCH))
def test_checkpoint_of_another_model(case, ck, target):
    edit, match = MISMATCH[case]
    m = _manifest(ck)
    edit(m)
    _write_manifest(ck, m)
    _fails(ck, target, match)


def test_weights_of_the_wrong_shape(ck, target):
    from ecospa.checkpoint.load import read_checkpoint

    weights = read_checkpoint(ck).weights
    key = "transformer.h.0.mlp.c_fc.weight" if "transformer.h.0.mlp.c_fc.weight" in weights else sorted(
        k for k, v in weights.items() if v.dim() == 2)[0]
    weights[key] = torch.zeros(weights[key].shape[0] + 1, *weights[key].shape[1:])
    with open(ck / "model.safetensors", "wb") as f:
        write_tensors(f, weights)
    _refresh_size(ck, "model.safetensors")
    _fails(ck, target, "has shape")


def test_missing_and_truncated_files(ck, target, tmp_path):
    _fails(tmp_path / "nothing here", target, "no checkpoint")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:-10])
    _fails(ck, target, "truncated")
    _refresh_size(ck, "model.safetensors")  # a consistent manifest does not help a cut file
    _fails(ck, target, "truncated|cover")
    (ck / "model.safetensors").unlink()
    _fails(ck, target, "missing")


def test_optimizer_and_ecospa_that_were_not_saved_or_differ(ck, target):
    model, _, inputs, snap = target
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ecospa.CheckpointError, match="saved from a Adam"):
        ecospa.load(ck, model, optimizer=sgd, example_inputs=inputs)
    sp = ecospa.EcoSpa(model, None, example_inputs=inputs)
    with pytest.raises(ecospa.CheckpointError, match="no EcoSpa state"):
        ecospa.load(ck, model, ecospa=sp, example_inputs=inputs)
    with pytest.raises(ecospa.CheckpointError, match="no RNG state"):
        ecospa.load(ck, model, example_inputs=inputs, rng=True)
    assert_unchanged(model, snap)


def test_plain_module_needs_example_inputs(ck, target):
    model, opt, _, snap = target
    with pytest.raises(ecospa.CheckpointError, match="example_inputs"):
        ecospa.load(ck, model)
    with pytest.raises(ecospa.CheckpointError, match="not a transformers model"):
        ecospa.load(ck)
    assert_unchanged(model, snap, opt)


class _Evil:
    """Unpickling this writes a file: proof that something was unpickled."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("victim", ["model.safetensors", "ecospa.json", "state.safetensors"])
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickles_are_never_unpickled(victim, how, ck, target, tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    if how == "pickle":
        (ck / victim).write_bytes(pickle.dumps({"weights": evil}))
    else:
        torch.save({"weights": evil}, ck / victim)
    if victim != "ecospa.json":
        _refresh_size(ck, victim)
    _fails(ck, target, None)
    assert not marker.exists(), "a pickle was executed"


def test_symlinked_file_refused(ck, target, tmp_path):
    real = tmp_path / "elsewhere.safetensors"
    os.replace(ck / "model.safetensors", real)
    os.symlink(real, ck / "model.safetensors")
    _fails(ck, target, "symbolic link")


def test_save_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ecospa.CheckpointError, match="refusing to replace"):
        ecospa.save(torch.nn.Linear(2, 2), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    with pytest.raises(ecospa.CheckpointError, match="neither JSON data"):
        ecospa.save(torch.nn.Linear(2, 2), tmp_path / "ck", extra={"f": object()})
    assert not (tmp_path / "ck").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
