"""Rewards that need no task metadata: JPEG (in)compressibility (DDPO) and CLIP score from a local CLIP.

Every reward maps ``(images [B, 3, H, W] float in [-1, 1], prompts: list[str]) -> float32 [B]`` on the CPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["JpegCompressibility", "ClipScore", "Saturation", "to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> ``uint8 [B, H, W, 3]``."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


class JpegCompressibility:
    """DDPO's compressibility reward: ``-size_kB`` of the JPEG (quality 95); ``sign=-1`` rewards
    incompressibility."""

    def __init__(self, sign: float = 1.0, quality: int = 95):
        self.sign = sign
        self.quality = quality
        self.name = "jpeg_compressibility" if sign > 0 else "jpeg_incompressibility"

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        sizes = []
        for arr in to_uint8(images):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return -self.sign * torch.tensor(sizes, dtype=torch.float32)


class Saturation:
    """Mean colour saturation, ``mean_pixels(max(r, g, b) - min(r, g, b))`` on images mapped to [0, 1]: a
    differentiable reward that is trivially hackable (it pays for vivid colour whatever the prompt asks), so
    the reward-hacking guards and the reward-backprop loops have a test bed on the embedded default.  Keeps
    the autograd graph to ``images`` when grad is enabled; the result is on ``images``' device."""

    name = "saturation"
    differentiable = True

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1.0) / 2.0
        sat = x.amax(dim=1) - x.amin(dim=1)
        return sat.flatten(1).mean(dim=1)


class ClipScore:
    """Cosine similarity between CLIP image and text embeddings, from a local CLIP directory (nothing
    downloaded)."""

    name = "clip_score"

    def __init__(self, path: str | None):
        if not path:
            raise ValueError(
                "--reward-clip-path: expected a local CLIP directory for the clip_score reward, got none"
            )
        p = Path(path)
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"--reward-clip-path: expected a CLIP directory with config.json, got {path!r}"
            )
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(p).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(p)
        vc = self.model.config.vision_config
        self.size = vc.image_size
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        x = (images.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0
        x = torch.nn.functional.interpolate(
            x, size=(self.size, self.size), mode="bicubic", align_corners=False
        )
        x = (x - self.mean) / self.std
        tok = self.tokenizer([str(p) for p in prompts], padding=True, truncation=True, return_tensors="pt")
        img = self.model.get_image_features(pixel_values=x)
        txt = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1).float()
