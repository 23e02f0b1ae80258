"""Per-prompt advantages (math.md §2 steps 2-3, math.md §3) and DiffusionNFT's map from advantage to ``r``."""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "nft_optimality", "equal_reward_groups"]


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(inv.max()) + 1 if inv.numel() else 0


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, std: str = "global", eps: float = 1e-4
) -> torch.Tensor:
    """``A = (R - mean_prompt(R)) / (std(R) + eps)``; ``std="global"`` uses the whole batch (the DiffusionNFT
    reference default), ``std="group"`` each prompt's own group (Flow-GRPO's option).  Population std."""
    rewards = rewards.float()
    if rewards.shape != group_ids.shape:
        raise ValueError(
            f"group_ids: expected shape {tuple(rewards.shape)} (that of rewards), "
            f"got {tuple(group_ids.shape)}"
        )
    inv, n = _group_index(group_ids)
    count = torch.zeros(n).index_add_(0, inv, torch.ones_like(rewards))
    mean = torch.zeros(n).index_add_(0, inv, rewards) / count
    centred = rewards - mean[inv]
    if std == "global":
        return centred / (rewards.std(unbiased=False) + eps)
    if std == "group":
        var = torch.zeros(n).index_add_(0, inv, centred**2) / count
        return centred / (var.sqrt()[inv] + eps)
    raise ValueError(f"std: expected 'global' or 'group', got {std!r}")


def equal_reward_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: True where the sample's prompt group has all-equal rewards (no signal; math.md §3 masks
    them)."""
    inv, n = _group_index(group_ids)
    big = torch.finfo(torch.float32).max
    lo = torch.full((n,), big).scatter_reduce(0, inv, rewards.float(), "amin")
    hi = torch.full((n,), -big).scatter_reduce(0, inv, rewards.float(), "amax")
    return (hi - lo == 0)[inv]


def nft_optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """math.md §2 step 3: ``r = clamp(clamp(A, -m, m) / m / 2 + 0.5, 0, 1)``."""
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max: expected a value > 0, got {adv_clip_max}")
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)
