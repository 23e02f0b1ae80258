"""engine.BatchInvariantDenoiser: fixed-size chunks, the padded last chunk, and no host-to-device copy."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine import BatchInvariantDenoiser
from models.conditioning import Conditioning


class _Recorder:
    """A toy denoiser: remembers the batch sizes it saw; each row's output depends on that row only."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, timestep, cond):
        self.batches.append(x.shape[0])
        return x * 2.0 + timestep[:, None, None, None] + cond.pooled_embeds.sum(-1)[:, None, None, None]


def _inputs(b, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, 4, 4, generator=g)
    t = torch.rand(b, generator=g) * 1000
    cond = Conditioning(torch.randn(b, 5, 8, generator=g), torch.randn(b, 8, generator=g))
    return x.to(device), t.to(device), cond.to(device)


def test_every_chunk_has_the_same_size_and_rows_are_their_own():
    inner = _Recorder()
    den = BatchInvariantDenoiser(inner, chunk=4)
    x, t, cond = _inputs(6)
    out = den(x, t, cond)
    assert inner.batches == [4, 4]
    want = x * 2.0 + t[:, None, None, None] + cond.pooled_embeds.sum(-1)[:, None, None, None]
    assert torch.equal(out, want)


class _CrossDevice(TorchDispatchMode):
    """Records every op whose tensors live on more than one device (a copy between host and device)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {t.device.type for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            self.seen.append((str(func), sorted(devices)))
        return out


def test_the_padded_chunk_copies_nothing_between_host_and_device():
    """The rollout captures this forward in a CUDA graph, where a host-to-device copy fails the capture (the
    padding index was built on the host: every GRPO rollout with a partial chunk ran eagerly on the H200).
    ``meta`` stands in for the GPU: an index made on the CPU shows as a cpu -> meta copy."""
    den = BatchInvariantDenoiser(_Recorder(), chunk=4)
    x, t, cond = _inputs(6, device="meta")
    with _CrossDevice() as mode:
        out = den(x, t, cond)
    assert out.shape == x.shape and out.device.type == "meta"
    assert mode.seen == []
