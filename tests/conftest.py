import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """The ``slow`` tests run first (a stable sort), so that under xdist (CI runs ``-n auto``) none starts
    near the end and runs alone while the other workers idle; GPU tests skip cleanly without CUDA."""
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def interpret_mode(monkeypatch):
    """Run Triton kernels in the CPU interpreter for the duration of a test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# Under pytest-xdist (CI runs ``-n 2``) each worker gets one thread: two workers on a 2-core machine
# would otherwise oversubscribe it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
