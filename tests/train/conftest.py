import pytest

import kernels


@pytest.fixture(autouse=True)
def _reference_kernels():
    """Training tests exercise the loops; the kernels themselves are tested (in the Triton interpreter too)
    under tests/kernels, so here CPU ops take the fast PyTorch reference path."""
    with kernels.use_backend("reference"):
        yield
