"""Runs the independent contract check of ``../shared/tools/contract_check.py`` when present."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

import ecospa

CHECK = Path(__file__).resolve().parents[2] / "shared" / "tools" / "contract_check.py"


@pytest.fixture(scope="module")
def contract_check():
    """The contract_check module, or skip when the shared tools are not there."""
    if not CHECK.exists():
        pytest.skip(f"{CHECK} not found")
    spec = importlib.util.spec_from_file_location("contract_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases(cc):
    return {
        "gpt_block": (cc.GPTBlock, (2, 7, 48)),
        "gqa_swiglu_block": (cc.GQABlock, (2, 5, 32)),
        "mlp": (cc.MLP, (3, 20)),
    }


@pytest.mark.parametrize("name", ["gpt_block", "gqa_swiglu_block", "mlp"])
@pytest.mark.parametrize("seed", [0, 1])
def test_contract_check_model(contract_check, name, seed):
    """Each model of the contract check passes its check (shrinks, equals the masked model)."""
    cls, shape = _cases(contract_check)[name]
    torch.manual_seed(seed)
    model, inputs = cls(), (torch.randn(*shape),)
    res = contract_check.check(ecospa, name, model, inputs, random.Random(seed))
    assert res.startswith("ok"), res


def test_contract_check_main(contract_check, capsys):
    """The script's main() exits 0."""
    assert contract_check.main() == 0, capsys.readouterr().out
