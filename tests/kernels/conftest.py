"""Kernel tests start from the default ``auto`` backend whatever another package's tests left set."""

import pytest

import kernels


@pytest.fixture(autouse=True)
def _auto_backend():
    with kernels.use_backend("auto"):
        yield
