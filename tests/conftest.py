"""Shared fixtures: a fixed seed for every test and the hypothesis profile of the suite."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, settings

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
