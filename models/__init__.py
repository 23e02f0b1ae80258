"""Model side of the engine: diffusers transformers, denoiser adapters, text encoders, VAE, LoRA, attention.

``import models`` is light: only :class:`Conditioning` is imported eagerly; everything that pulls in diffusers
or transformers is imported on first use (``models.load_transformer`` etc.).
"""

from __future__ import annotations

import importlib

from .conditioning import Conditioning

# public name -> submodule that defines it (imported lazily)
_LAZY = {
    "load_transformer": "loader",
    "build_preset": "loader",
    "load_scheduler_config": "loader",
    "PRESETS": "presets",
    "as_denoiser": "denoiser",
    "SD3Denoiser": "denoiser",
    "FluxDenoiser": "denoiser",
    "UNetDenoiser": "denoiser",
    "TextEncoder": "text",
    "Vae": "vae",
    "set_attention_backend": "attention",
    "disable_cudnn_sdpa": "attention",
    "add_adapters": "lora",
    "adapters_disabled": "lora",
    "per_sample_lora_grads": "lora",
    "use_adapter": "lora",
    "set_active_adapter": "lora",
    "copy_adapter": "lora",
    "ema_update_adapter": "lora",
    "EMA": "lora",
    "save_lora": "lora",
    "load_lora": "lora",
}

__all__ = ["Conditioning", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'models' has no attribute {name!r}")
