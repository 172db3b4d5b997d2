"""Fixtures shared by the engine tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Two torch threads on a shared 2-core machine spin against other processes;
    # one is faster here. Restoring also undoes in-process CLI runs' --threads.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
