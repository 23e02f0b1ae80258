"""Rewards that need no task metadata: JPEG (in)compressibility (DDPO), saturation, and CLIP score from a
local CLIP.

Every reward maps ``(images [B, 3, H, W] float in [-1, 1], prompts: list[str]) -> float32 [B]``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["JpegCompressibility", "ClipScore", "Saturation", "check_clip_dir", "to_uint8"]


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


def check_clip_dir(path: str | None) -> Path:
    """The clip_score reward's directory: config.json and preprocessor_config.json (with the weights and
    tokenizer beside them), checked without loading anything."""
    if not path:
        raise ValueError(
            "--reward-clip-path: expected a local CLIP directory for the clip_score reward "
            "(or --reward-paths clip_score=DIR), got none"
        )
    p = Path(path)
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (p / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"--reward-clip-path: expected a CLIP directory with config.json and "
            f"preprocessor_config.json, got {path!r} (missing {', '.join(missing)})"
        )
    return p


class ClipScore:
    """CLIP score as flow_grpo computes it (zhtmike/flow_grpo@19d5169c flow_grpo/clip_scorer.py
    ``ClipScorer``, a fork carrying yifan123/flow_grpo's file): ``logit_scale.exp() * cos(img, txt) / 30``,
    i.e. ``logits_per_image.diagonal() / 30`` (math.md §8.1).  Images ``x = images / 2 + 0.5`` go through
    torch ops built from the checkpoint's image processor (torchvision ``Resize(shortest_edge)``: bilinear
    with antialiasing; ``CenterCrop`` with rounded offsets; ``Normalize``), text through its tokenizer with
    ``padding="max_length", truncation=True``.  The reference's path is made of tensor ops, so the same
    path serves with and without gradient: differentiable.  Loads a local CLIP directory (config.json,
    weights, preprocessor_config.json, tokenizer; nothing downloaded) onto ``device``; the result is
    float32 ``[B]`` on ``images``' device."""

    name = "clip_score"
    differentiable = True
    divisor = 30.0

    def __init__(self, path: str | None, device: str = "cpu", batch_size: int = 32):
        p = check_clip_dir(path)
        from transformers import AutoTokenizer, CLIPModel

        from .clip_models import _frozen, _spec, load_pil_image_processor

        self.device = device
        self.batch_size = int(batch_size)
        self.model = _frozen(CLIPModel.from_pretrained(p), device)
        self.tokenizer = AutoTokenizer.from_pretrained(p)
        self.spec = _spec(load_pil_image_processor(p))

    def _score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        from .clip_models import _pooled, tensor_preprocess, unit_text_features

        pixels = tensor_preprocess(images.to(self.device), self.spec, mode="bilinear", crop_round=True)
        tok = self.tokenizer(
            [str(p) for p in prompts], padding="max_length", truncation=True, return_tensors="pt"
        )
        img = _pooled(self.model.get_image_features(pixel_values=pixels))
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = unit_text_features(self.model, tok, self.device)
        return self.model.logit_scale.exp() * (img * txt).sum(-1) / self.divisor

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        from .clip_models import _batched

        return _batched(self._score, images, prompts, self.batch_size)
