"""Thin adapters from diffusers models to the project's denoiser contract (see models/conditioning.py).

``denoiser(x [B, C, H, W], timestep [B] = 1000 * sigma, cond) -> prediction [B, C, H, W]``.
"""

from __future__ import annotations

import torch
from torch import nn

from .conditioning import Conditioning


def _batch_timestep(timestep: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"timestep: expected a scalar or shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t


class SD3Denoiser(nn.Module):
    """SD3 / SD3.5 MMDiT: the output is the velocity; ``timestep`` goes in as ``1000 * sigma``."""

    prediction_type = "flow"

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if cond.pooled_embeds is None:
            raise ValueError("cond.pooled_embeds: expected a [B, P] tensor for SD3, got None")
        return self.transformer(
            hidden_states=x,
            timestep=_batch_timestep(timestep, x),
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_embeds,
            return_dict=False,
        )[0]


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX packing: ``[B, C, H, W] -> [B, (H/2)(W/2), 4C]``, each 2x2 patch one token (channel-major)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"x: expected even latent height and width for FLUX 2x2 packing, got {h}x{w}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (H/2)(W/2), 4C] -> [B, C, H, W]``."""
    b, _, d = tokens.shape
    return (tokens.view(b, height // 2, width // 2, d // 4, 2, 2)
            .permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, height, width))


def flux_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Position ids ``[(H/2)(W/2), 3]`` of packed tokens: ``(0, row, col)``, as FluxPipeline builds them."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxDenoiser(nn.Module):
    """FLUX.1: pack 2x2 latent patches into tokens, call the transformer, unpack the velocity.

    FluxTransformer2DModel multiplies ``timestep`` and ``guidance`` by 1000 internally, so it is fed
    ``timestep / 1000 = sigma`` (as FluxPipeline does). ``guidance`` (the distilled guidance scale of
    FLUX.1-dev, default 3.5) is used only when the model has ``guidance_embeds``.
    """

    prediction_type = "flow"

    def __init__(self, transformer: nn.Module, guidance: float = 3.5):
        super().__init__()
        self.transformer = transformer
        self.guidance = float(guidance)
        self._ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _position_ids(self, height, width, text_len, device, dtype):
        key = (height, width, text_len, device, dtype)
        if key not in self._ids:
            self._ids[key] = (flux_image_ids(height, width, device, dtype),
                              torch.zeros(text_len, 3, device=device, dtype=dtype))
        return self._ids[key]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if cond.pooled_embeds is None:
            raise ValueError("cond.pooled_embeds: expected a [B, P] tensor for FLUX, got None")
        b, c, h, w = x.shape
        expected = self.transformer.config.in_channels
        if 4 * c != expected:
            raise ValueError(f"x: expected {expected // 4} latent channels (in_channels {expected} / 4), "
                             f"got {c}")
        img_ids, txt_ids = self._position_ids(h, w, cond.prompt_embeds.shape[1], x.device, x.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack_latents(x),
            timestep=_batch_timestep(timestep, x) / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled_embeds,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


class UNetDenoiser(nn.Module):
    """Epsilon-prediction UNet (SD1.5-style, the DDPO path): ``unet(x, timestep, prompt_embeds).sample``."""

    prediction_type = "epsilon"

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.unet(x, _batch_timestep(timestep, x), encoder_hidden_states=cond.prompt_embeds,
                         return_dict=False)[0]


def as_denoiser(model: nn.Module, *, guidance: float = 3.5) -> nn.Module:
    """Wrap a diffusers SD3 / FLUX transformer or UNet2DConditionModel as a denoiser (see module docstring).

    A module that already has a ``prediction_type`` is returned unchanged. ``guidance`` applies to FLUX only.
    """
    if getattr(model, "prediction_type", None) in ("flow", "epsilon"):
        return model
    name = type(getattr(model, "_orig_mod", model)).__name__  # see through torch.compile's wrapper
    if name == "SD3Transformer2DModel":
        return SD3Denoiser(model)
    if name == "FluxTransformer2DModel":
        return FluxDenoiser(model, guidance=guidance)
    if name == "UNet2DConditionModel":
        return UNetDenoiser(model)
    raise ValueError(
        "model: expected a diffusers SD3Transformer2DModel, FluxTransformer2DModel or UNet2DConditionModel, "
        f"got {name}"
    )
