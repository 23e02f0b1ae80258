"""VAE of a local diffusers pipeline: images in [-1, 1] <-> the latents the transformer sees.

``encode: z = (E(x) - shift_factor) * scaling_factor``; ``decode: x = D(z / scaling_factor + shift_factor)``
(``shift_factor`` 0 where the config has none, e.g. SD1.x).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class Vae(nn.Module):
    """``AutoencoderKL`` with the config's latent scaling and shift applied."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype: torch.dtype | None = None) -> Vae:
        """From a pipeline folder (``vae/`` subfolder) or a VAE folder (``config.json`` of AutoencoderKL)."""
        from diffusers import AutoencoderKL

        root = Path(path).expanduser()
        folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                "path: expected a pipeline directory with vae/config.json or a VAE directory with "
                f"config.json, got {str(root)!r}"
            )
        try:
            cls_name = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: expected valid JSON, got {e}") from e
        if cls_name != "AutoencoderKL":
            raise ValueError(f"{config_file}: expected _class_name 'AutoencoderKL', got {cls_name!r}")
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        if device is not None:
            vae = vae.to(device)
        return cls(vae)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> latents ``(E(x) - shift) * scale`` (mode unless ``sample``)."""
        if images.ndim != 4:
            raise ValueError(f"images: expected [B, C, H, W], got shape {tuple(images.shape)}")
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` in [-1, 1] -> the posterior's ``(mean, std)`` in latent units:
        ``((mu - shift) * scale, sigma * scale)``, so ``mean + std * eps`` is :meth:`encode`'s sample."""
        if images.ndim != 4:
            raise ValueError(f"images: expected [B, C, H, W], got shape {tuple(images.shape)}")
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (dist.mean - self.shift_factor) * self.scaling_factor, dist.std * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images ``D(z / scale + shift)`` in (about) [-1, 1]. Differentiable (reward backprop)."""
        if latents.ndim != 4:
            raise ValueError(f"latents: expected [B, C, h, w], got shape {tuple(latents.shape)}")
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
