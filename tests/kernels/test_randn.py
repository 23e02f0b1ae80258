"""``kernels.randn``: Philox normal noise.  Statistics, determinism, and reference == Triton."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

import kernels
from kernels import reference as ref

from .common import backends

BACKENDS = backends()


@pytest.mark.parametrize("backend", BACKENDS)
def test_randn_statistics(backend):
    with kernels.use_backend(backend):
        z = kernels.randn((64, 1024), seed=2024, offset=0)
    assert z.dtype == torch.float32 and z.shape == (64, 1024)
    flat = z.double().flatten()
    n = flat.numel()
    # mean within 5 standard errors, std within 1%, and a KS test against N(0, 1)
    assert abs(float(flat.mean())) < 5.0 / n**0.5
    assert abs(float(flat.std()) - 1.0) < 0.01
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    # neighbouring elements are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1])) < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_randn_determinism(backend):
    with kernels.use_backend(backend):
        a = kernels.randn((5, 3, 17, 19), seed=7, offset=11)
        b = kernels.randn((5, 3, 17, 19), seed=7, offset=11)
        other_seed = kernels.randn((5, 3, 17, 19), seed=8, offset=11)
        other_offset = kernels.randn((5, 3, 17, 19), seed=7, offset=12)
        tensor_args = kernels.randn((5, 3, 17, 19), seed=torch.tensor(7), offset=torch.tensor(11))
        # element i depends only on (seed, offset + i): a shifted offset is a shifted stream
        tail = kernels.randn((100,), seed=7, offset=11 + 50)
    assert torch.equal(a, b)
    assert torch.equal(a, tensor_args)
    assert not torch.equal(a, other_seed) and (a != other_seed).float().mean() > 0.99
    assert torch.equal(a.flatten()[1:], other_offset.flatten()[:-1])
    assert torch.equal(a.flatten()[50:150], tail)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789, 3), (2**40 + 17, 2**33 - 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_randn_triton_matches_reference(seed, offset, dtype):
    with kernels.use_backend("triton"):
        got = kernels.randn((3, 5, 77), seed, offset, dtype=dtype)
    expected = ref.randn((3, 5, 77), seed, offset, dtype=torch.float32)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


def test_randn_bad_arguments():
    with pytest.raises(TypeError, match="seed"):
        kernels.randn((2, 3), seed=1.5)
    with pytest.raises(TypeError, match="seed"):
        kernels.randn((2, 3), seed=torch.tensor(1.0))
    with pytest.raises(ValueError, match="offset"):
        kernels.randn((2, 3), seed=1, offset=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="shape"):
        kernels.randn((2, -3), seed=1)
    with pytest.raises(TypeError, match="dtype"):
        kernels.randn((2, 3), seed=1, dtype=torch.int32)
