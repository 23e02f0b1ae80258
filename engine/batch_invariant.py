"""A batch-invariant denoiser forward: the same sample gives the same prediction bit for bit, whatever batch
it is evaluated in (math.md §3: ``logp_new == logp_old`` exactly before the first update).

GEMM, attention and normalisation kernels pick their blocking, vector paths and reduction order from the
*shape* of the call (a batch of 1 takes a GEMV path, for example), so a row's result can change with the
number of rows next to it.  :class:`BatchInvariantDenoiser` evaluates the wrapped denoiser in fixed-size
chunks of ``chunk`` rows, padding the last chunk with copies of one of its rows, so every sample is always
computed inside a tensor of the same shape; rows of such a tensor do not interact in a denoiser (per-sample
attention, per-token linear layers and norms), so the prediction of a row depends on that row alone.
An optional autocast dtype is applied inside the wrapper, so rollout and training run the same precision.

:func:`guided_prediction` is the rollout loop's prediction (CFG batched into one forward, combined in fp32,
cast to the state's dtype); training re-scores stored transitions through it, so both paths share one code
path and one arithmetic.
"""

from __future__ import annotations

import contextlib

import torch

from models.conditioning import Conditioning

__all__ = ["BatchInvariantDenoiser", "guided_prediction"]

_AUTOCAST = {None: None, "none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BatchInvariantDenoiser:
    """``denoiser(x [B, ...], timestep [B], cond) -> prediction`` in chunks of exactly ``chunk`` rows.

    ``autocast``: ``None``/``"none"``, ``"bfloat16"`` or ``"float16"`` (mixed precision for both rollout and
    training).  ``prediction_type`` and the CUDA-graph key are those of the wrapped denoiser (plus the chunk
    size and autocast dtype).
    """

    def __init__(self, denoiser, chunk: int, autocast: str | None = None):
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
        if autocast not in _AUTOCAST:
            raise ValueError(f"autocast: expected none, bfloat16 or float16, got {autocast!r}")
        self.inner = denoiser
        self.chunk = chunk
        self.autocast = _AUTOCAST[autocast]
        self.prediction_type = getattr(denoiser, "prediction_type", "flow")

    def graph_key(self):
        gk = getattr(self.inner, "graph_key", None)
        key = gk() if callable(gk) else getattr(self.inner, "active_adapter", None)
        return (key if not isinstance(key, list) else tuple(key), self.chunk, str(self.autocast))

    def _precision(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b = x.shape[0]
        timestep = torch.as_tensor(timestep, device=x.device, dtype=torch.float32)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        if timestep.shape != (b,):
            raise ValueError(f"timestep: expected shape [{b}] (the batch of x), got {tuple(timestep.shape)}")
        if len(cond) != b:
            raise ValueError(f"cond: expected batch {b} (that of x), got {len(cond)}")
        outs = []
        with self._precision(x.device):
            for lo in range(0, b, self.chunk):
                n = min(self.chunk, b - lo)
                if n == self.chunk:
                    idx = slice(lo, lo + n)
                    out = self.inner(x[idx], timestep[idx], cond[idx])
                else:  # pad with copies of the chunk's first row: the shape, not the content, must match
                    # (the index is made on x's device: a host-to-device copy cannot be CUDA-graph captured)
                    rows = torch.arange(lo, lo + self.chunk, device=x.device)
                    rows[n:] = lo
                    out = self.inner(x[rows], timestep[rows], cond[rows])[:n]
                outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def guided_prediction(
    denoiser,
    x: torch.Tensor,
    timestep: torch.Tensor,
    cond: Conditioning,
    *,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The rollout loop's model prediction (``engine.rollout``'s step): ``denoiser(x, t, cond)`` cast to
    ``x``'s dtype, or with CFG (``guidance_scale != 1``) one forward over ``[x; x]`` with ``[cond; uncond]``
    and ``pred_u + g (pred_c - pred_u)`` in fp32, cast to ``x``'s dtype."""
    if float(guidance_scale) == 1.0:
        return denoiser(x, timestep, cond).to(x.dtype)
    if uncond is None:
        raise ValueError(
            f"uncond: expected a Conditioning because guidance_scale={guidance_scale} != 1, got None"
        )
    both = denoiser(torch.cat([x, x]), torch.cat([timestep, timestep]), Conditioning.cat([cond, uncond]))
    pred_c, pred_u = both.float().chunk(2)
    return (pred_u + float(guidance_scale) * (pred_c - pred_u)).to(x.dtype)
