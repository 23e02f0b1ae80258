"""Argument normalisation and validation shared by every op.

Errors name the argument, what was expected and what was given.  Checks on tensor *values* (sigma order,
``sigma == 1``) run only for Python numbers and CPU tensors: on CUDA they would synchronise the host.
"""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, x, *, min_ndim: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected a tensor of rank >= {min_ndim} shaped [B, ...], got shape {tuple(x.shape)}"
        )
    return x


def check_like(name: str, y, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """``y`` must be a float tensor with exactly ``ref``'s shape and device."""
    check_tensor(name, y, min_ndim=1)
    if y.shape != ref.shape:
        raise ValueError(
            f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(y.shape)}"
        )
    if y.device != ref.device:
        raise ValueError(
            f"{name}: expected a tensor on {ref.device} (that of {ref_name}), got one on {y.device}"
        )
    return y


def per_sample(name: str, s, batch: int, device: torch.device) -> torch.Tensor:
    """A per-sample scalar -> fp32 ``[B]`` on ``device``.

    Accepts a Python number, a 0-dim tensor, a ``[B]`` tensor or a ``[B, 1, ..., 1]`` tensor.  No host sync.
    """
    if isinstance(s, bool):
        raise TypeError(f"{name}: expected a float or a float tensor, got bool")
    if isinstance(s, numbers.Real):
        return torch.full((batch,), float(s), dtype=torch.float32, device=device)
    if not isinstance(s, torch.Tensor):
        raise TypeError(
            f"{name}: expected a float or a tensor of shape [B] / [B, 1, ..., 1], got {type(s).__name__}"
        )
    if not (s.is_floating_point()):
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {s.dtype}")
    if s.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {s.device}")
    if s.ndim == 0:
        return s.float().reshape(1).expand(batch)
    if s.shape[0] != batch or any(d != 1 for d in s.shape[1:]):
        raise ValueError(
            f"{name}: expected a scalar, shape [{batch}] or [{batch}, 1, ..., 1] (batch {batch}), "
            f"got {tuple(s.shape)}"
        )
    return s.float().reshape(batch)


def host_values_known(*tensors) -> bool:
    """Value checks are allowed only when they cost no device sync (and not while ``torch.compile`` traces:
    a data-dependent branch there would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" for t in tensors)


def check_sigma_order(
    sigma: torch.Tensor, sigma_next: torch.Tensor, *, names=("sigma", "sigma_next")
) -> None:
    if not host_values_known(sigma, sigma_next):
        return
    bad = sigma_next >= sigma
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{names[1]}: expected {names[1]} < {names[0]} for every sample (a step goes towards the data), "
            f"got {names[1]}={float(sigma_next[i])} >= {names[0]}={float(sigma[i])} at sample {i}"
        )


def check_range(name: str, s: torch.Tensor, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    if not host_values_known(s):
        return
    ok_lo = (s > lo) if lo_open else (s >= lo)
    ok_hi = (s < hi) if hi_open else (s <= hi)
    bad = ~(ok_lo & ok_hi)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        lb, hb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name}: expected values in {lb}{lo}, {hi}{hb}, got {float(s[i])} at sample {i}")


def check_nonneg_number(name: str, a) -> float:
    if isinstance(a, bool) or not isinstance(a, numbers.Real):
        raise TypeError(f"{name}: expected a non-negative float, got {type(a).__name__}")
    if not a >= 0:
        raise ValueError(f"{name}: expected a value >= 0, got {a}")
    return float(a)


def check_positive_number(name: str, a) -> float:
    if isinstance(a, bool) or not isinstance(a, numbers.Real):
        raise TypeError(f"{name}: expected a positive float, got {type(a).__name__}")
    if not a > 0:
        raise ValueError(f"{name}: expected a value > 0, got {a}")
    return float(a)


def check_noise_xor_prev(noise, prev_sample, x: torch.Tensor):
    if (noise is None) == (prev_sample is None):
        given = "both" if noise is not None else "neither"
        raise ValueError(
            "noise / prev_sample: expected exactly one of them (noise to sample a transition at rollout, "
            f"prev_sample to score a stored one at training), got {given}"
        )
    if noise is not None:
        check_like("noise", noise, "x", x)
    else:
        check_like("prev_sample", prev_sample, "x", x)
        if prev_sample.dtype != x.dtype:
            raise TypeError(
                f"prev_sample: expected dtype {x.dtype} (that of x: the stored transition must be scored in "
                f"the precision it was stored in), got {prev_sample.dtype}"
            )


def check_reduce(reduce: str) -> str:
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce: expected 'mean' or 'sum', got {reduce!r}")
    return reduce
