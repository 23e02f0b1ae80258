"""The conditioning a denoiser consumes, shared by every model family and the engine.

A *denoiser* in this project is any callable ``denoiser(x, timestep, cond) -> prediction`` where ``x`` is
``[B, C, H, W]`` (latents or pixels), ``timestep`` is a float ``[B]`` tensor equal to ``1000 * sigma``
(math.md §0, never truncated), ``cond`` is a :class:`Conditioning` of batch ``B``, and the prediction has
``x``'s shape: a velocity for flow models (``prediction_type == "flow"``) or a noise estimate for epsilon
models (``prediction_type == "epsilon"``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Conditioning:
    """Text conditioning for a batch: ``prompt_embeds [B, L, D]`` and, for SD3/FLUX,
    ``pooled_embeds [B, P]``."""

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.prompt_embeds, torch.Tensor) or self.prompt_embeds.ndim != 3:
            got = getattr(self.prompt_embeds, "shape", type(self.prompt_embeds).__name__)
            raise ValueError(f"prompt_embeds: expected a tensor shaped [B, L, D], got {got}")
        if self.pooled_embeds is not None:
            if self.pooled_embeds.ndim != 2 or self.pooled_embeds.shape[0] != self.prompt_embeds.shape[0]:
                raise ValueError(
                    f"pooled_embeds: expected shape [{self.prompt_embeds.shape[0]}, P], "
                    f"got {tuple(self.pooled_embeds.shape)}"
                )

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> Conditioning:
        return replace(
            self,
            **{
                f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                for f in fields(self)
            },
        )

    def __getitem__(self, idx) -> Conditioning:
        return self._map(lambda t: t[idx])

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda t: t.to(*args, **kwargs))

    def repeat_interleave(self, n: int) -> Conditioning:
        """Each row ``n`` times in a row: ``a a b b``."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def repeat(self, n: int) -> Conditioning:
        """The whole batch ``n`` times over: ``a b a b``."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        if not items:
            raise ValueError("items: expected at least one Conditioning, got an empty list")
        first = items[0]
        out = {}
        for f in fields(first):
            vals = [getattr(c, f.name) for c in items]
            if all(v is None for v in vals):
                out[f.name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"{f.name}: expected it set on every item or on none, got a mix")
            else:
                out[f.name] = torch.cat(vals, dim=0)
        return type(first)(**out)
