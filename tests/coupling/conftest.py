"""Fixtures of tests/coupling: ``gpt``, the subject of the reliability tests."""
from __future__ import annotations

import pytest
import torch

import ecospa
from tests.coupling.tiny_gpt import example, tiny_gpt, train_step

_COUPLINGS: list = []


@pytest.fixture
def gpt():
    """A tiny GPT trained one AdamW step, its optimizer and couplings (found once: every copy
    is in the same state, so the same couplings apply)."""
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, 0)
    if not _COUPLINGS:
        _COUPLINGS.append(ecospa.auto_couple(model, example()))
    return model, opt, _COUPLINGS[0]
