"""``kernels`` is also the import name of the Hugging Face Hub kernel loader that diffusers and transformers
probe for.  With this project installed (distribution ``nft-engine``), both libraries must see no Hub kernels
package, import normally, and keep their own attention paths working."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import kernels


def test_our_kernels_package_is_the_one_imported():
    assert hasattr(kernels, "sde_step") and hasattr(kernels, "use_backend")
    assert importlib.metadata.version("nft-engine") == "0.1.0"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("kernels")  # no distribution named "kernels" is installed


def test_diffusers_does_not_mistake_us_for_hub_kernels():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.utils import is_kernels_available

    assert diffusers.__version__
    assert is_kernels_available() is False


def test_transformers_does_not_mistake_us_for_hub_kernels():
    transformers = pytest.importorskip("transformers")
    from transformers.utils.import_utils import is_kernels_available

    assert transformers.__version__
    assert is_kernels_available() is False


def test_diffusers_native_attention_dispatch_runs_and_matches_sdpa():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    g = torch.Generator().manual_seed(0)
    # diffusers' layout: [batch, seq, heads, head_dim]
    q, k, v = (torch.randn(2, 7, 3, 16, generator=g) for _ in range(3))
    out = dispatch_attention_fn(q, k, v, backend=AttentionBackendName.NATIVE)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
