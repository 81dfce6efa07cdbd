"""Fixtures shared by several test files."""

import pytest
import torch
from torch._dynamo.utils import counters


@pytest.fixture
def fresh_dynamo():
    """A test that compiles starts and ends with dynamo's caches and counters empty, so that its
    graph and recompile counts are its own."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
