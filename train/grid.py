"""Sample grids: images with their prompts underneath, saved as PNG."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .rewards.basic import to_uint8

__all__ = ["save_grid"]


def save_grid(
    images: torch.Tensor,
    captions: list[str],
    path: Path,
    *,
    cols: int = 8,
    cell: int = 128,
    scores: list[float] | None = None,
) -> Path:
    """Tile ``images`` ([B, 3, H, W] in [-1, 1]) into ``cols`` columns, each upscaled to ``cell`` px
    (nearest, so pixel-space images stay crisp) with its caption (and score, if given) below; write a PNG
    atomically."""
    arrs = to_uint8(images)
    n = len(arrs)
    rows = (n + cols - 1) // cols
    font = ImageFont.load_default()
    text_h = 40
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, arr in enumerate(arrs):
        r, c = divmod(i, cols)
        x, y = c * cell, r * (cell + text_h)
        grid.paste(Image.fromarray(arr).resize((cell, cell), Image.NEAREST), (x, y))
        cap = captions[i] if i < len(captions) else ""
        if scores is not None:
            cap = f"[{scores[i]:.0f}] {cap}"
        for j, line in enumerate(textwrap.wrap(cap, width=cell // 6)[:3]):
            draw.text((x + 2, y + cell + 1 + 12 * j), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path
