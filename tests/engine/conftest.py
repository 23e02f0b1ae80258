"""Engine tests run the kernels' PyTorch reference backend.

The root conftest turns on ``TRITON_INTERPRET=1`` on CPU-only machines, which would send every CPU op
through the (slow) Triton interpreter; rollouts call the solver kernels hundreds of times, so each test here
is wrapped in ``kernels.use_backend("reference")``; ``test_rollout_through_triton_kernels`` chooses its own.
"""

import contextlib

import pytest

import kernels


@pytest.fixture(autouse=True)
def _reference_backend(request):
    use_backend = getattr(kernels, "use_backend", None)
    if use_backend is None or request.node.name.startswith("test_rollout_through_triton_kernels"):
        ctx = contextlib.nullcontext()
    else:
        ctx = use_backend("reference")
    with ctx:
        yield
