"""The embedded default model: a tiny SD3-style pixel-space flow transformer and a word-level prompt encoder.

It is small enough to sample and post-train on two CPU cores (see ``models/embedded/pretrain.json`` for how
the shipped checkpoint was made).  The transformer is a diffusers ``SD3Transformer2DModel`` working directly
on 32x32 RGB pixels in [-1, 1] (no VAE), so adapters and the engine treat it exactly like SD3/SD3.5's
transformer: ``transformer(x, encoder_hidden_states, pooled_projections, timestep=1000*sigma) -> velocity``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from models.conditioning import Conditioning
from models.embedded.vocab import PAD_ID, WORDS, tokenize

__all__ = [
    "DEFAULT_DIR", "TRANSFORMER_CONFIG", "EmbeddedConfig", "PromptEncoder", "EmbeddedDefault", "load_default",
]

DEFAULT_DIR = Path(__file__).resolve().parent
WEIGHTS_NAME = "default.safetensors"
CONFIG_NAME = "default.json"

# CPU-sized: 64 tokens of 4x4 pixel patches, width 64, 4 joint blocks.
TRANSFORMER_CONFIG = dict(
    sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=4, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
    pos_embed_max_size=8,
)


@dataclass
class EmbeddedConfig:
    """Everything needed to rebuild the model: the transformer's diffusers config and the prompt encoder's."""

    transformer: dict = field(default_factory=lambda: dict(TRANSFORMER_CONFIG))
    vocab: tuple[str, ...] = WORDS
    max_length: int = 10
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_ff: int = 128

    def __post_init__(self):
        self.vocab = tuple(self.vocab)
        for name in ("joint_attention_dim", "pooled_projection_dim"):
            if self.transformer.get(name) != self.text_dim:
                raise ValueError(
                    f"transformer.{name}: expected text_dim={self.text_dim}, got {self.transformer.get(name)}"
                )
        if self.text_dim % self.text_heads:
            raise ValueError(
                f"text_heads: expected a divisor of text_dim={self.text_dim}, got {self.text_heads}"
            )


class _EncoderBlock(nn.Module):
    """Pre-norm self-attention + MLP over the prompt tokens; padding keys are masked out."""

    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        h = h + self.out(a.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h))


class PromptEncoder(nn.Module):
    """Word-level prompt encoder: ``prompt_embeds [B, L, D]`` (token states) and ``pooled_embeds [B, D]``
    (mean of the non-padding states).  ``encode`` caches the result per prompt string (no grad)."""

    def __init__(self, cfg: EmbeddedConfig):
        super().__init__()
        self.max_length = cfg.max_length
        self.tok_emb = nn.Embedding(len(cfg.vocab), cfg.text_dim)
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_length, cfg.text_dim) * 0.02)
        self.blocks = nn.ModuleList(
            _EncoderBlock(cfg.text_dim, cfg.text_heads, cfg.text_ff) for _ in range(cfg.text_layers)
        )
        self.norm = nn.LayerNorm(cfg.text_dim)
        nn.init.normal_(self.tok_emb.weight, std=1.0 / math.sqrt(cfg.text_dim))
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = token_ids != PAD_ID
        h = self.tok_emb(token_ids) + self.pos_emb[: token_ids.shape[1]]
        for block in self.blocks:
            h = block(h, keep)
        h = self.norm(h)
        w = keep.to(h.dtype)[..., None]
        pooled = (h * w).sum(1) / w.sum(1)
        return h, pooled

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize(prompts, self.max_length).to(self.tok_emb.weight.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The :class:`Conditioning` of ``prompts`` (``""``: the unconditional prompt), cached per string."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts: expected a list of strings, got the string {prompts!r}")
        prompts = [str(p) for p in prompts]
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            embeds, pooled = self(self.tokenize(missing))
            for i, p in enumerate(missing):
                self._cache[p] = (embeds[i], pooled[i])
        return Conditioning(
            prompt_embeds=torch.stack([self._cache[p][0] for p in prompts]),
            pooled_embeds=torch.stack([self._cache[p][1] for p in prompts]),
        )

    def clear_cache(self) -> None:
        """Forget cached encodings (needed after the encoder's weights, device or dtype change)."""
        self._cache.clear()

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)


class EmbeddedDefault(nn.Module):
    """The embedded default text-to-image flow model.

    ``transformer``: the ``SD3Transformer2DModel`` (LoRA targets ``attn.to_q/to_k/to_v/to_out.0/add_*_proj``);
    ``text_encoder``: the :class:`PromptEncoder`; ``denoiser(x, timestep, cond) -> velocity`` with ``x``
    ``[B, 3, 32, 32]`` pixels and ``timestep = 1000 * sigma`` (float ``[B]``).
    """

    prediction_type = "flow"
    latent_channels = 3
    sample_size = 32

    def __init__(self, config: EmbeddedConfig | None = None):
        super().__init__()
        self.config = config or EmbeddedConfig()
        self.transformer = SD3Transformer2DModel(**self.config.transformer)
        self.text_encoder = PromptEncoder(self.config)

    def denoiser(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.latent_channels:
            raise ValueError(f"x: expected [B, {self.latent_channels}, H, W], got {tuple(x.shape)}")
        timestep = torch.as_tensor(timestep, device=x.device, dtype=torch.float32)
        if timestep.ndim == 0:
            timestep = timestep.expand(x.shape[0])
        if timestep.shape != (x.shape[0],):
            raise ValueError(f"timestep: expected shape [{x.shape[0]}], got {tuple(timestep.shape)}")
        if len(cond) != x.shape[0]:
            raise ValueError(f"cond: expected batch {x.shape[0]}, got {len(cond)}")
        return self.transformer(
            hidden_states=x, encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled_embeds,
            timestep=timestep, return_dict=False,
        )[0]

    forward = denoiser

    def encode(self, prompts: list[str]) -> Conditioning:
        return self.text_encoder.encode(prompts)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write ``default.safetensors`` (fp32) and ``default.json`` into ``directory`` atomically
        (temp file + ``os.replace``); returns the weights path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        weights = directory / WEIGHTS_NAME
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, weights)
        cfg = {**asdict(self.config), "vocab": list(self.config.vocab), **(extra or {})}
        tmp = directory / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(cfg, indent=1) + "\n")
        os.replace(tmp, directory / CONFIG_NAME)
        return weights

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device=None, dtype=None) -> EmbeddedDefault:
        directory = Path(directory)
        weights, cfg_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
        for p in (weights, cfg_path):
            if not p.exists():
                raise FileNotFoundError(f"directory: expected {p.name} in {directory}, it is missing")
        raw = json.loads(cfg_path.read_text())
        known = {f for f in EmbeddedConfig.__dataclass_fields__}
        model = cls(EmbeddedConfig(**{k: v for k, v in raw.items() if k in known}))
        model.load_state_dict(load_file(str(weights)))
        model.eval().requires_grad_(False)
        return model.to(device=device, dtype=dtype)


def load_default(device=None, dtype=None, directory: str | os.PathLike | None = None) -> EmbeddedDefault:
    """The shipped embedded default (``models/embedded/default.safetensors``), in eval mode, frozen."""
    return EmbeddedDefault.from_pretrained(directory or DEFAULT_DIR, device=device, dtype=dtype)
