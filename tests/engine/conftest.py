"""Fixtures shared by the engine tests."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every engine test runs with one torch thread (see tests/conftest.py)."""
