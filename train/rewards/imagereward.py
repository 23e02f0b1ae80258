"""ImageReward: THUDM's BLIP-based human-preference reward from a local folder, scored as
``THUDM/ImageReward@c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb ImageReward/ImageReward.py``
``ImageReward.score`` / ``inference_rank`` do (math.md §8.3):

    r = (MLP(BERT_xattn(tokens, ViT_L(pixels))[:, 0]) - 0.16717362830052426) / 1.0333394966054072

- image: ``Resize(224, BICUBIC)`` of the PIL image (shorter side), ``CenterCrop(224)``, ``ToTensor``,
  ``Normalize`` with the OpenAI CLIP mean/std; BLIP's ViT-L/16 (``ImageReward/models/BLIP/vit.py``, LayerNorm
  eps 1e-6, all 197 output tokens after the final norm);
- text: ``bert-base-uncased`` WordPiece (plus BLIP's added ``[DEC]`` / ``[ENC]`` tokens),
  ``padding='max_length', truncation=True, max_length=35``; BLIP's ``med.py`` BERT with cross-attention to the
  image tokens in every layer, bidirectional self-attention ('multimodal' mode), the ``[CLS]`` output;
- head: ``MLP(768)``: five linear layers without activations (dropouts are off in eval).

The ``image-reward`` package is not used: it pins ``timm==0.6.13`` and ``fairscale`` and imports torchvision.
The same checkpoint keys load into transformers' ``BlipVisionModel`` (BLIP's ViT; keys renamed) and
``BlipTextModel`` (a port of BLIP's ``med.py``; keys unchanged), so ``ImageReward.pt`` + ``med_config.json``
load as they are.

Differentiable (ReFL backprops through it): when grad is enabled and the images require grad the resize is
``F.interpolate(.., "bicubic", antialias=True)`` on the float images (PIL's bicubic kernel and pass order,
clipped like PIL's 8-bit passes, no uint8 rounding);
otherwise the reference's PIL path on uint8 images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .basic import to_uint8
from .hps import OPENAI_MEAN, OPENAI_STD, _count_blocks

__all__ = ["ImageReward", "IR_MEAN", "IR_STD", "blip_to_hf", "pil_preprocess", "torch_preprocess"]

IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072
MAX_LENGTH = 35
IMAGE_SIZE = 224
OPTION = "--reward-paths"
# BLIP's 'large' ViT (ImageReward/models/BLIP/blip.py create_vit): 16 heads of 64 at width 1024
VISION_HEAD_WIDTH = 64


def _resize_crop_size(h: int, w: int, size: int):
    """torchvision's ``Resize(int)`` output size (shorter side to ``size``) and ``CenterCrop`` offsets."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def pil_preprocess(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The reference's PIL transform on ``[-1, 1]`` images rounded to uint8: ``[B, 3, size, size]``
    float32."""
    out = []
    mean = np.asarray(OPENAI_MEAN, dtype=np.float32)
    std = np.asarray(OPENAI_STD, dtype=np.float32)
    for arr in to_uint8(images):
        img = Image.fromarray(arr)
        h, w = arr.shape[:2]
        new_h, new_w, top, left = _resize_crop_size(h, w, size)
        if (new_h, new_w) != (h, w):
            img = img.resize((new_w, new_h), Image.BICUBIC)
        img = img.crop((left, top, left + size, top + size)).convert("RGB")
        x = np.asarray(img, dtype=np.float32) / 255.0
        out.append(torch.from_numpy((x - mean) / std).permute(2, 0, 1))
    return torch.stack(out)


def torch_preprocess(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The differentiable twin of :func:`pil_preprocess`: the same sizes and crop, torch's antialiased bicubic
    (PIL's kernel, a = -0.5) on float images in PIL's two passes, clipped to [0, 1] as PIL's uint8 passes are,
    no rounding: within ~1.5/255 of the PIL path per pixel (its rounding)."""
    x = (images.float().clamp(-1, 1) + 1.0) / 2.0
    h, w = x.shape[-2:]
    new_h, new_w, top, left = _resize_crop_size(h, w, size)
    # PIL resamples horizontally, then vertically, each pass into a uint8 image: the bicubic overshoot is
    # clipped to [0, 255] between the passes and after them (the clamps keep that; gradient 0 where clipped)
    if new_w != w:
        x = F.interpolate(x, size=(h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    if new_h != h:
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(OPENAI_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(OPENAI_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def blip_to_hf(sd: dict[str, torch.Tensor], med: dict):
    """``ImageReward.pt`` + ``med_config.json`` -> (vision config, vision state dict, text config, text state
    dict, MLP linear layers ``[(weight, bias)]``).  BLIP's ``vision_proj`` / ``text_proj`` (unused by the
    score) and ``position_ids`` buffers are dropped; any other key this mapping does not know is refused."""
    from transformers import BlipTextConfig, BlipVisionConfig

    need = (
        "blip.visual_encoder.patch_embed.proj.weight",
        "blip.visual_encoder.pos_embed",
        "blip.text_encoder.embeddings.word_embeddings.weight",
        "mlp.layers.0.weight",
    )
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(
            f"{OPTION}: expected imagereward=DIR with THUDM's ImageReward.pt, got a checkpoint without "
            f"{', '.join(missing)}"
        )
    width, _, patch, _ = sd["blip.visual_encoder.patch_embed.proj.weight"].shape
    grid = int(round((sd["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
    vcfg = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=sd["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "blip.visual_encoder.blocks."),
        num_attention_heads=width // VISION_HEAD_WIDTH,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    tcfg = BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=width,
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0),
        bos_token_id=None,
        sep_token_id=None,  # unused in scoring
        # is_decoder builds the cross-attention layers; forward(is_decoder=False) keeps the self-attention
        # bidirectional (med.py's 'multimodal' mode)
        is_decoder=True,
    )
    vis, txt, mlp, unknown = {}, {}, {}, []
    vmap = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for k, v in sd.items():
        if k.startswith("blip.visual_encoder."):
            r = k[len("blip.visual_encoder.") :]
            if r == "cls_token":
                vis["embeddings.class_embedding"] = v
            elif r == "pos_embed":
                vis["embeddings.position_embedding"] = v
            elif r.startswith("patch_embed.proj."):
                vis["embeddings.patch_embedding." + r.rsplit(".", 1)[1]] = v
            elif r.startswith("norm."):
                vis["post_layernorm." + r.rsplit(".", 1)[1]] = v
            elif r.startswith("blocks."):
                i, _, name = r[len("blocks.") :].partition(".")
                mod, _, kind = name.rpartition(".")
                if mod in vmap:
                    vis[f"encoder.layers.{i}.{vmap[mod]}.{kind}"] = v
                else:
                    unknown.append(k)
            else:
                unknown.append(k)
        elif k.startswith("blip.text_encoder."):
            r = k[len("blip.text_encoder.") :]
            if not r.endswith("position_ids"):
                txt[r] = v
        elif k.startswith("mlp.layers."):
            mlp[k[len("mlp.layers.") :]] = v
        elif k.startswith(("blip.vision_proj.", "blip.text_proj.")):
            continue
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(
            f"{OPTION}: expected imagereward=DIR with THUDM's ImageReward.pt, got unknown keys "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    idx = sorted({int(k.split(".")[0]) for k in mlp})
    layers = [(mlp[f"{i}.weight"], mlp[f"{i}.bias"]) for i in idx]
    return vcfg, vis, tcfg, txt, layers


def resolve_path(path: str | None) -> Path:
    if not path:
        raise ValueError(
            f"{OPTION}: expected imagereward=DIR (ImageReward.pt, med_config.json and bert-base-uncased's "
            f"vocab.txt) for the imagereward reward, got no entry"
        )
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"{OPTION}: expected imagereward=DIR, a folder with ImageReward.pt, med_config.json and "
            f"vocab.txt, "
            f"got {path!r} (not a directory)"
        )
    absent = [n for n in ("ImageReward.pt", "med_config.json", "vocab.txt") if not (p / n).is_file()]
    if absent:
        raise FileNotFoundError(
            f"{OPTION}: expected imagereward=DIR with ImageReward.pt, med_config.json and vocab.txt "
            f"(bert-base-uncased), got {path!r} without {', '.join(absent)}"
        )
    return p


def _tokenizer(folder: Path):
    """BLIP's ``init_tokenizer``: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]``."""
    from transformers import BertTokenizer

    vocab = {}
    for i, line in enumerate((folder / "vocab.txt").read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(line.rstrip("\n"), i)
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward:
    """ImageReward (math.md §8.3), ``[B]`` float32 on the images' device (the model runs on ``device``)."""

    name = "imagereward"
    differentiable = True

    def __init__(self, path: str | None, device: str = "cpu"):
        folder = resolve_path(path)
        from transformers import BlipTextModel, BlipVisionModel

        med = json.loads((folder / "med_config.json").read_text())
        sd = torch.load(folder / "ImageReward.pt", map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        vcfg, vis, tcfg, txt, layers = blip_to_hf(sd, med)
        vision = BlipVisionModel(vcfg)
        text = BlipTextModel(tcfg, add_pooling_layer=False)
        for what, module, weights in (("visual_encoder", vision, vis), ("text_encoder", text, txt)):
            res = module.load_state_dict(weights, strict=False)
            missing = [k for k in res.missing_keys if not k.endswith("position_ids")]
            if missing or res.unexpected_keys:
                raise ValueError(
                    f"{OPTION}: expected imagereward=DIR's ImageReward.pt to fill BLIP's {what}, got missing "
                    f"{missing[:5]} unexpected {res.unexpected_keys[:5]}"
                )
        mlp = torch.nn.Sequential(*[torch.nn.Linear(w.shape[1], w.shape[0]) for w, _ in layers])
        with torch.no_grad():
            for lin, (w, b) in zip(mlp, layers, strict=True):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
        self.device = torch.device(device)
        self.vision = vision.eval().requires_grad_(False).to(self.device)
        self.text = text.eval().requires_grad_(False).to(self.device)
        self.mlp = mlp.eval().requires_grad_(False).to(self.device)
        self.tokenizer = _tokenizer(folder)
        if len(self.tokenizer) > tcfg.vocab_size:
            raise ValueError(
                f"{OPTION}: expected imagereward=DIR's vocab.txt to fit med_config.json's vocab_size "
                f"{tcfg.vocab_size}, got {len(self.tokenizer)} tokens"
            )
        self.size = vcfg.image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and images.requires_grad:
            return torch_preprocess(images.to(self.device), self.size)
        return pil_preprocess(images, self.size).to(self.device)

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"imagereward: expected one prompt per image ({images.shape[0]}), got {len(prompts)}"
            )
        pixels = self.preprocess(images)
        tok = self.tokenizer(
            [str(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(
            input_ids=tok.input_ids.to(self.device),
            attention_mask=tok.attention_mask.to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        feats = out.last_hidden_state[:, 0, :].float()
        r = self.mlp(feats).squeeze(-1)
        return ((r - IR_MEAN) / IR_STD).to(images.device)
