"""Named transformer shapes: the real architectures (random weights) and tiny ones for tests.

Sources (the ``transformer/config.json`` of each Hugging Face repository, diffusers format):
- ``sd3.5-medium``: stabilityai/stable-diffusion-3.5-medium (MMDiT-X: dual attention in blocks 0-12,
  RMS qk-norm), ~2.24e9 parameters.
- ``sd3.5-large``: stabilityai/stable-diffusion-3.5-large, ~8.06e9 parameters.
- ``flux-dev``: black-forest-labs/FLUX.1-dev (19 double-stream + 38 single-stream blocks, guidance-distilled),
  ~1.19e10 parameters.
The tiny presets keep each family's features (dual attention, qk-norm, guidance embedding) at toy width.
"""

from __future__ import annotations

import copy

SD3 = "SD3Transformer2DModel"
FLUX = "FluxTransformer2DModel"

# name -> (diffusers class name, config)
_PRESETS: dict[str, tuple[str, dict]] = {
    "sd3.5-medium": (SD3, dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    )),
    "sd3.5-large": (SD3, dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
        pooled_projection_dim=2048, pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm",
    )),
    "flux-dev": (FLUX, dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )),
    # Tiny shapes for tests and CPU smoke runs: text widths 32 (joint) / 32 (pooled), latents with 4 channels.
    "sd3-tiny": (SD3, dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    )),
    "flux-tiny": (FLUX, dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )),
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)


def preset_config(name: str) -> tuple[str, dict]:
    """``(diffusers class name, config dict)`` of a named preset (a fresh copy)."""
    if name not in _PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    cls_name, cfg = _PRESETS[name]
    return cls_name, copy.deepcopy(cfg)
