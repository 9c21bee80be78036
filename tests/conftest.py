"""Shared fixtures: a fixed seed for every test, the hypothesis profile of the suite, ``gpt`` (the
subject of the reliability tests); the modules with a ``slow`` test run first."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, settings

import ecospa
from tests.tiny_gpt import example, tiny_gpt, train_step

settings.register_profile(
    "ecospa",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("ecospa")

# The test models are tiny: intra-op threads only add overhead, and on a shared 2-core machine
# they make a 2 ms forward take 200 ms.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed():
    """Seed torch and random so that every test builds the same weights and inputs."""
    torch.manual_seed(0)
    random.seed(0)
    return 0


def pytest_collection_modifyitems(config, items):
    """Modules holding a test marked ``slow`` first, whole and otherwise in collection order.

    pytest-xdist (``-n``, pyproject.toml) hands tests out in this order, alternating between the
    workers: the longest tests then start early, one after the other on each worker, instead of
    one of them running alone at the end of the run. Whole modules move, so that a worker sets
    up a module's fixtures once.
    """
    module = lambda item: item.nodeid.split("::")[0]
    slow = {module(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: module(item) not in slow)

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
