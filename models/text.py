"""Prompt -> :class:`Conditioning`, from the text encoders of a local diffusers pipeline directory.

Reproduces diffusers' ``encode_prompt`` (no CFG branch, one image per prompt):
- ``sd3``: CLIP-L and CLIP-G (``CLIPTextModelWithProjection``): penultimate hidden states concatenated on the
  feature axis and zero-padded to the T5 width, then concatenated with T5 along the sequence:
  ``prompt_embeds = cat([pad(cat([h_L, h_G], -1)), t5], -2)``,
  ``pooled = cat([text_embeds_L, text_embeds_G], -1)``.
  Without T5 (a pipeline saved with ``text_encoder_3=None``) the T5 part is zeros
  ``[B, max_sequence_length, joint_attention_dim]``, as diffusers does.
- ``flux``: ``prompt_embeds = T5(prompt)``, ``pooled = CLIP pooler_output``.
- ``sd``: SD1.x/2.x UNets: ``prompt_embeds = CLIP last hidden state``, no pooled.
Each distinct prompt string is encoded once; the empty prompt ``""`` is the CFG unconditional prompt.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .conditioning import Conditioning

logger = logging.getLogger(__name__)

# family -> (component, default class) pairs, in pipeline order
_COMPONENTS = {
    "sd3": (("tokenizer", "CLIPTokenizer"), ("text_encoder", "CLIPTextModelWithProjection"),
            ("tokenizer_2", "CLIPTokenizer"),
            ("text_encoder_2", "CLIPTextModelWithProjection"),
            ("tokenizer_3", "T5TokenizerFast"), ("text_encoder_3", "T5EncoderModel")),
    "flux": (("tokenizer", "CLIPTokenizer"), ("text_encoder", "CLIPTextModel"),
             ("tokenizer_2", "T5TokenizerFast"), ("text_encoder_2", "T5EncoderModel")),
    "sd": (("tokenizer", "CLIPTokenizer"), ("text_encoder", "CLIPTextModel")),
}
_PIPELINE_FAMILY = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
                    "StableDiffusionPipeline": "sd"}
# diffusers' encode_prompt default for the T5 sequence length
_DEFAULT_T5_LENGTH = {"sd3": 256, "flux": 512}
_OPTIONAL = {"sd3": {"tokenizer_3", "text_encoder_3"}}


def detect_family(index: dict) -> str:
    """``"sd3"``, ``"flux"`` or ``"sd"`` from a ``model_index.json`` dict."""
    name = index.get("_class_name", "")
    if name in _PIPELINE_FAMILY:
        return _PIPELINE_FAMILY[name]
    if "text_encoder_3" in index or "tokenizer_3" in index:
        return "sd3"
    if index.get("transformer") and "Flux" in str(index["transformer"]):
        return "flux"
    if index.get("unet"):
        return "sd"
    raise ValueError(f"family: could not tell it from model_index.json (_class_name {name!r}); pass "
                     f"family= one of {sorted(_COMPONENTS)}")


class TextEncoder:
    """Text encoders + tokenizers of one model family, with a per-prompt embedding cache."""

    def __init__(self, family: str, components: dict, *, max_sequence_length: int | None = None,
                 t5_dim: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, batch_size: int = 32):
        if family not in _COMPONENTS:
            raise ValueError(f"family: expected one of {sorted(_COMPONENTS)}, got {family!r}")
        self.family = family
        self.c = components
        self.max_sequence_length = max_sequence_length or _DEFAULT_T5_LENGTH.get(family)
        self.clip_max_length = components["tokenizer"].model_max_length
        self.t5_dim = t5_dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.batch_size = batch_size
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if family == "sd3" and components.get("text_encoder_3") is None and t5_dim is None:
            raise ValueError("t5_dim: expected the T5 width (transformer joint_attention_dim) for an SD3 "
                             "pipeline without text_encoder_3, got None")
        for key in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if components.get(key) is not None:
                components[key].requires_grad_(False).eval().to(self.device)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, family: str | None = None, device=None, dtype=None,
                        max_sequence_length: int | None = None, use_t5: bool = True,
                        batch_size: int = 32) -> TextEncoder:
        """Load tokenizers and text encoders from a local pipeline directory (model_index.json + subfolders).

        ``dtype`` is the encoders' weight dtype and the output dtype; ``use_t5=False`` drops SD3's T5 (zeros
        instead, as diffusers does without ``text_encoder_3``). Nothing is downloaded.
        """
        import transformers

        root = Path(path).expanduser()
        index_file = root / "model_index.json"
        if not index_file.is_file():
            what = "no such directory" if not root.is_dir() else "no model_index.json in it"
            raise FileNotFoundError(f"path: expected a diffusers pipeline directory with model_index.json, "
                                    f"got {str(root)!r} ({what})")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_file}: expected valid JSON, got {e}") from e
        family = family or detect_family(index)
        if family not in _COMPONENTS:
            raise ValueError(f"family: expected one of {sorted(_COMPONENTS)}, got {family!r}")
        components: dict = {}
        for name, default_cls in _COMPONENTS[family]:
            entry = index.get(name)
            folder = root / name
            optional = name in _OPTIONAL.get(family, ())
            null_entry = entry is not None and (not entry or entry[0] is None)
            dropped = null_entry or (optional and not folder.is_dir())
            if dropped or (optional and not use_t5):
                if not optional:
                    raise FileNotFoundError(f"{root}: expected the {family} component {name!r}, "
                                            "the pipeline has none")
                components[name] = None
                continue
            if not folder.is_dir():
                raise FileNotFoundError(f"{root}: expected the {family} component folder {folder}, "
                                        "which does not exist")
            cls_name = entry[1] if entry and entry[1] else default_cls
            model_cls = getattr(transformers, cls_name, None)
            if model_cls is None:
                raise ValueError(f"{index_file}: {name} class {cls_name!r} is not a transformers class")
            kwargs = {"local_files_only": True}
            if name.startswith("text_encoder") and dtype is not None:
                kwargs["dtype"] = dtype
            components[name] = model_cls.from_pretrained(str(folder), **kwargs)
        t5_dim = None
        if family == "sd3" and components["text_encoder_3"] is None:
            transformer_cfg = root / "transformer" / "config.json"
            if transformer_cfg.is_file():
                t5_dim = json.loads(transformer_cfg.read_text(encoding="utf-8")).get("joint_attention_dim")
            logger.info("SD3 pipeline without T5: its part of prompt_embeds is zeros")
        return cls(family, components, max_sequence_length=max_sequence_length, t5_dim=t5_dim, device=device,
                   dtype=dtype, batch_size=batch_size)

    def _ids(self, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                         add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)

    def _clip(self, index: str, prompts: list[str], penultimate: bool):
        tok, enc = self.c["tokenizer" + index], self.c["text_encoder" + index]
        out = enc(self._ids(tok, prompts, self.clip_max_length), output_hidden_states=penultimate)
        hidden = out.hidden_states[-2] if penultimate else out[0]
        return hidden, out[0] if penultimate else out.pooler_output

    def _t5(self, index: str, prompts: list[str]) -> torch.Tensor:
        tok, enc = self.c["tokenizer" + index], self.c["text_encoder" + index]
        return enc(self._ids(tok, prompts, self.max_sequence_length))[0]

    @torch.no_grad()
    def encode_uncached(self, prompts: list[str]) -> Conditioning:
        """Encode ``prompts`` (one batch, no cache)."""
        if self.family == "sd3":
            h1, p1 = self._clip("", prompts, penultimate=True)
            h2, p2 = self._clip("_2", prompts, penultimate=True)
            clip = torch.cat([h1, h2], dim=-1)
            if self.c.get("text_encoder_3") is not None:
                t5 = self._t5("_3", prompts)
            else:
                t5 = torch.zeros(len(prompts), self.max_sequence_length, self.t5_dim, device=clip.device,
                                 dtype=clip.dtype)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            embeds, pooled = torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([p1, p2], dim=-1)
        elif self.family == "flux":
            _, pooled = self._clip("", prompts, penultimate=False)
            embeds = self._t5("_2", prompts)
        else:
            embeds, pooled = self._clip("", prompts, penultimate=False)[0], None
        dtype = self.dtype or embeds.dtype
        return Conditioning(embeds.to(dtype), None if pooled is None else pooled.to(dtype))

    def encode(self, prompts: list[str] | str) -> Conditioning:
        """``Conditioning`` for ``prompts``; each distinct string is encoded once per :class:`TextEncoder`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r:.80}")
        todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            cond = self.encode_uncached(chunk)
            for i, prompt in enumerate(chunk):
                self.cache[prompt] = (cond.prompt_embeds[i], None if cond.pooled_embeds is None
                                      else cond.pooled_embeds[i])
        embeds = torch.stack([self.cache[p][0] for p in prompts])
        pooled = None
        if self.cache[prompts[0]][1] is not None:
            pooled = torch.stack([self.cache[p][1] for p in prompts])
        return Conditioning(embeds, pooled)

    def uncond(self, batch_size: int) -> Conditioning:
        """The empty-prompt conditioning (CFG unconditional branch), repeated ``batch_size`` times."""
        return self.encode([""]).repeat_interleave(batch_size)

    def clear_cache(self) -> None:
        self.cache.clear()
