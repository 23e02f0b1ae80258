"""The hpsv2.1 and imagereward rewards against transcriptions of their reference scorers, on tiny
random-weight checkpoints written in the real files' layout (tests/train/_reward_models_tiny.py).

References (transcribed here in plain torch + PIL, independently of the engine's transformers-based models):
- HPS v2.1: ``tgxs002/HPSv2@866735ecaae999fa714bd9edfa05aa2672669ee3``: ``hpsv2/img_score.py`` (score =
  diagonal of ``image_features @ text_features.T`` of the normalised features),
  ``hpsv2/src/open_clip/transform.py`` (``image_transform(is_train=False)``: ToTensor, tensor Resize(224,
  BICUBIC), CenterCrop, Normalize), ``hpsv2/src/open_clip/transformer.py`` (``VisionTransformer.forward``,
  ``TextTransformer``, ``ResidualAttentionBlock`` with ``nn.MultiheadAttention``),
  ``hpsv2/src/open_clip/model.py`` (``encode_text``: causal mask, ``ln_final``, ``x[arange, text.argmax(-1)] @
  text_projection``), ``hpsv2/src/open_clip/tokenizer.py``.
- ImageReward: ``THUDM/ImageReward@c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb``: ``ImageReward/ImageReward.py``
  (``_transform``, ``MLP``, ``score`` / ``inference_rank``: mean 0.16717362830052426, std 1.0333394966054072),
  ``ImageReward/models/BLIP/vit.py`` (``VisionTransformer.forward``, ``Attention``, ``Block``, eps 1e-6),
  ``ImageReward/models/BLIP/med.py`` (``BertEmbeddings`` without token types, ``BertLayer`` in 'multimodal'
  mode, extended masks ``(1 - mask) * -10000``), ``ImageReward/models/BLIP/blip.py`` (``init_tokenizer``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ..train._reward_models_tiny import write_tiny_hps, write_tiny_imagereward

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a red circle", "two squares", "A blue triangle on the left of the green circle."]


def _images(seed=0, b=3, h=96, w=80):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def _pil(images):
    """``[-1, 1]`` tensors -> PIL images, as flow_grpo's reward wrappers make them (round to uint8)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in x]


def _to_tensor(img):  # torchvision ToTensor on an RGB PIL image
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _resize_hw(h, w, size):  # torchvision _compute_resized_output_size for an int size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _center_crop(x, size):  # torchvision F.center_crop (tensor or, via .crop, PIL)
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def _normalize(x):
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


# ----------------------------------------------------------------------------------------------------------
# HPS v2.1 reference (open_clip)
# ----------------------------------------------------------------------------------------------------------


def hps_preprocess_val(img, size=224):
    """HPSv2 ``image_transform(224, is_train=False)``: ToTensor -> Resize(224, BICUBIC) on the tensor
    (torchvision >= 0.17: ``interpolate(bicubic, align_corners=False, antialias=True)``, no clamp for floats)
    -> CenterCrop -> MaskAwareNormalize (3 channels: Normalize)."""
    x = _to_tensor(img)
    h, w = x.shape[-2:]
    nh, nw = _resize_hw(h, w, size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
    return _normalize(_center_crop(x, size))


def _oc_block(x, sd, p, heads, attn_mask=None):
    """open_clip ResidualAttentionBlock on LND input: x + attn(ln_1(x)); x + mlp(ln_2(x)) (GELU)."""
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
    a, _ = F.multi_head_attention_forward(
        h,
        h,
        h,
        w,
        heads,
        sd[p + "attn.in_proj_weight"],
        sd[p + "attn.in_proj_bias"],
        None,
        None,
        False,
        0.0,
        sd[p + "attn.out_proj.weight"],
        sd[p + "attn.out_proj.bias"],
        training=False,
        need_weights=False,
        attn_mask=attn_mask,
    )
    x = x + a
    h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
    h = F.linear(
        F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
        sd[p + "mlp.c_proj.weight"],
        sd[p + "mlp.c_proj.bias"],
    )
    return x + h


def _n_blocks(sd, prefix):
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def oc_encode_image(sd, image):
    w = sd["visual.class_embedding"].shape[0]
    x = F.conv2d(image, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([sd["visual.class_embedding"] + torch.zeros(x.shape[0], 1, w), x], dim=1)
    x = x + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    x = x.permute(1, 0, 2)
    for i in range(_n_blocks(sd, "visual.transformer.resblocks.")):
        x = _oc_block(x, sd, f"visual.transformer.resblocks.{i}.", w // 80)
    x = x.permute(1, 0, 2)
    pooled = F.layer_norm(x[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return pooled @ sd["visual.proj"]


def oc_encode_text(sd, text):
    w = sd["token_embedding.weight"].shape[1]
    ctx = sd["positional_embedding"].shape[0]
    mask = torch.empty(ctx, ctx).fill_(float("-inf")).triu_(1)  # open_clip build_attention_mask
    x = F.embedding(text, sd["token_embedding.weight"]) + sd["positional_embedding"]
    x = x.permute(1, 0, 2)
    for i in range(_n_blocks(sd, "transformer.resblocks.")):
        x = _oc_block(x, sd, f"transformer.resblocks.{i}.", w // 64, attn_mask=mask)
    x = x.permute(1, 0, 2)
    x = F.layer_norm(x, (w,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ sd["text_projection"]


def hps_reference_score(sd, pil_images, text_tokens):
    """img_score.score, batched: diag(normalize(img) @ normalize(txt).T)."""
    image = torch.stack([hps_preprocess_val(im) for im in pil_images])
    img = F.normalize(oc_encode_image(sd, image), dim=-1)
    txt = F.normalize(oc_encode_text(sd, text_tokens), dim=-1)
    return torch.diagonal(img @ txt.T)


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    from train.rewards.hps import HPSv21

    folder = tmp_path_factory.mktemp("hps")
    sd = write_tiny_hps(folder)
    return sd, HPSv21(str(folder), device="cpu")


def test_open_clip_tokenizer_by_hand(hps):
    """SimpleTokenizer: sot, BPE ids (byte symbols 0..255 in bytes_to_unicode order, then their ``</w>``
    forms, then merges in file order), eot; zero padded to 77; truncated with eot last."""
    _, reward = hps
    tok = reward.tokenizer
    sot, eot = tok.sot, tok.eot
    assert (sot, eot) == (512 + 10, 512 + 11) and tok.vocab_size == 524
    ids = tok(["AB  ab!", "red"])
    # 'ab' -> merge 0 'ab</w>' (512); '!' is the first printable byte -> '!</w>' = 256; 'red' -> 're' (513),
    # 're d</w>' -> 'red</w>' (514)
    assert ids.shape == (2, 77)
    assert ids[0, :5].tolist() == [sot, 512, 512, 256, eot] and ids[0, 5:].eq(0).all()
    assert ids[1, :3].tolist() == [sot, 514, eot]
    long = tok(["ab " * 100])[0]
    assert long[0] == sot and long[-1] == eot and long[1:-1].eq(512).all()


def test_hps_matches_reference_scorer(hps):
    """Engine (transformers CLIPModel on the key-mapped checkpoint, no grad: uint8 path) == open_clip
    transcription on the same uint8 images and the same tokens.  fp32, 2 layers: agreement to ~1e-6; tolerance
    1e-4."""
    sd, reward = hps
    images = _images()  # 96 x 80: non-square, so the resize takes the shorter side and the crop is exercised
    with torch.no_grad():
        got = reward(images, PROMPTS)
        want = hps_reference_score(sd, _pil(images), reward.tokenizer(PROMPTS))
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert want.std() > 1e-3  # the scores differ between images: the comparison is not of constants


def test_hps_grad_path_agrees_with_uint8_path(hps):
    """The differentiable path (no uint8 rounding) differs from the reference path only by that rounding: at
    most 1/510 per pixel, measured ~1e-4 in score on the tiny model; tolerance 2e-3."""
    _, reward = hps
    images = _images(1)
    with torch.no_grad():
        exact = reward(images, PROMPTS)
    x = images.clone().requires_grad_(True)
    soft = reward(x, PROMPTS)
    soft.sum().backward()
    torch.testing.assert_close(soft.detach(), exact, atol=2e-3, rtol=0)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# ImageReward reference (BLIP)
# ----------------------------------------------------------------------------------------------------------


def ir_transform(img, n_px=224):
    """ImageReward ``_transform``: Resize(n_px, BICUBIC) on the PIL image, CenterCrop, RGB, ToTensor,
    Normalize."""
    w, h = img.size
    nh, nw = _resize_hw(h, w, n_px)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - n_px) / 2.0)), int(round((nw - n_px) / 2.0))
    img = img.crop((left, top, left + n_px, top + n_px)).convert("RGB")
    return _normalize(_to_tensor(img))


def blip_vit(sd, x, heads_width=64):
    """BLIP vit.py VisionTransformer.forward (eval): patch_embed, cls, pos_embed, blocks, norm."""
    p = "blip.visual_encoder."
    wt = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(x, wt, sd[p + "patch_embed.proj.bias"], stride=wt.shape[-1]).flatten(2).transpose(1, 2)
    b, _, c = x.shape
    x = torch.cat((sd[p + "cls_token"].expand(b, -1, -1), x), dim=1)
    x = x + sd[p + "pos_embed"][:, : x.size(1), :]
    heads = c // heads_width
    for i in range(_n_blocks(sd, p + "blocks.")):
        q = f"{p}blocks.{i}."
        h = F.layer_norm(x, (c,), sd[q + "norm1.weight"], sd[q + "norm1.bias"], 1e-6)
        n = h.shape[1]
        qkv = F.linear(h, sd[q + "attn.qkv.weight"], sd[q + "attn.qkv.bias"])
        qkv = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        a = (attn @ qkv[2]).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(a, sd[q + "attn.proj.weight"], sd[q + "attn.proj.bias"])
        h = F.layer_norm(x, (c,), sd[q + "norm2.weight"], sd[q + "norm2.bias"], 1e-6)
        h = F.linear(
            F.gelu(F.linear(h, sd[q + "mlp.fc1.weight"], sd[q + "mlp.fc1.bias"])),
            sd[q + "mlp.fc2.weight"],
            sd[q + "mlp.fc2.bias"],
        )
        x = x + h
    return F.layer_norm(x, (c,), sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-6)


def _med_attention(sd, p, hidden, kv, mask, heads, eps):
    """med.py BertAttention: BertSelfAttention (scores / sqrt(d) + extended mask, softmax) +
    BertSelfOutput."""
    b, n, h = hidden.shape
    d = h // heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)

    q = split(F.linear(hidden, sd[p + "self.query.weight"], sd[p + "self.query.bias"]))
    k = split(F.linear(kv, sd[p + "self.key.weight"], sd[p + "self.key.bias"]))
    v = split(F.linear(kv, sd[p + "self.value.weight"], sd[p + "self.value.bias"]))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask
    ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(b, n, h)
    out = F.linear(ctx, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
    return F.layer_norm(
        out + hidden, (h,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps
    )


def med_bert(sd, med, input_ids, attention_mask, image_embeds):
    """med.py BertModel(add_pooling_layer=False), mode='multimodal', is_decoder=False."""
    t = "blip.text_encoder."
    eps = med["layer_norm_eps"]
    h = med["hidden_size"]
    pos = torch.arange(input_ids.shape[1])[None]
    x = F.embedding(input_ids, sd[t + "embeddings.word_embeddings.weight"])
    x = x + F.embedding(pos, sd[t + "embeddings.position_embeddings.weight"])
    x = F.layer_norm(x, (h,), sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"], eps)
    ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    enc = (1.0 - torch.ones(image_embeds.shape[:2])[:, None, None, :]) * -10000.0
    for i in range(med["num_hidden_layers"]):
        p = f"{t}encoder.layer.{i}."
        x = _med_attention(sd, p + "attention.", x, x, ext, med["num_attention_heads"], eps)
        x = _med_attention(sd, p + "crossattention.", x, image_embeds, enc, med["num_attention_heads"], eps)
        inter = F.gelu(F.linear(x, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
        out = F.linear(inter, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
        x = F.layer_norm(
            out + x, (h,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps
        )
    return x


def ir_reference_score(sd, med, pil_images, input_ids, attention_mask):
    """inference_rank: per image, the [CLS] output of med BERT over ViT tokens -> MLP -> (r - mean) / std."""
    feats = []
    for img, ids, am in zip(pil_images, input_ids, attention_mask, strict=True):
        emb = blip_vit(sd, ir_transform(img)[None])
        feats.append(med_bert(sd, med, ids[None], am[None], emb)[:, 0, :])
    x = torch.cat(feats).float()
    for i in (0, 2, 4, 6, 7):  # Linear/Dropout/... : dropouts are identities in eval
        x = F.linear(x, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return ((x - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    from train.rewards.imagereward import ImageReward

    folder = tmp_path_factory.mktemp("ir")
    sd, med = write_tiny_imagereward(folder)
    return sd, med, ImageReward(str(folder), device="cpu")


def test_blip_tokenizer_by_hand(ir):
    """bert-base-uncased WordPiece with BLIP's added [DEC]/[ENC], max_length 35 padding: ids by hand from the
    tiny vocab.txt ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3; a=5 red=6 circle=7 two=8 square=9 ##s=10 ...)."""
    *_, reward = ir
    tok = reward.tokenizer(
        ["A red circle", "two Squares"],
        padding="max_length",
        truncation=True,
        max_length=35,
        return_tensors="pt",
    )
    assert tok.input_ids.shape == (2, 35)
    assert tok.input_ids[0, :5].tolist() == [2, 5, 6, 7, 3] and tok.input_ids[0, 5:].eq(0).all()
    assert tok.input_ids[1, :5].tolist() == [2, 8, 9, 10, 3]
    assert tok.attention_mask[0].tolist() == [1] * 5 + [0] * 30
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [20, 21]


def test_imagereward_matches_reference_scorer(ir):
    """Engine (BlipVisionModel + BlipTextModel on the key-mapped checkpoint, PIL path) == BLIP transcription
    on the same PIL images and token ids.  fp32: agreement ~1e-6 (the engine's -finfo.min masks vs med's
    -10000 give exp(..) = 0 either way); tolerance 1e-4."""
    sd, med, reward = ir
    images = _images(2)
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        got = reward(images, PROMPTS)
        want = ir_reference_score(sd, med, _pil(images), tok.input_ids, tok.attention_mask)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert want.std() > 1e-3


def test_imagereward_grad_path_agrees_with_pil_path(ir):
    """torch's antialiased bicubic (a = -0.5, PIL's kernel; horizontal then vertical pass, each clipped) on
    float images vs PIL's 8-bit resample of the rounded images, on noise images (the worst case for the
    bicubic overshoot): pixels differ by at most ~1.5/255 (measured 1.53/255; bound 2/255), scores by ~1e-3 on
    the tiny model (tolerance 1e-2)."""
    from train.rewards.imagereward import pil_preprocess, torch_preprocess

    *_, reward = ir
    images = _images(3)
    with torch.no_grad():
        exact = reward(images, PROMPTS)
        pix_pil = pil_preprocess(images)
        pix_torch = torch_preprocess(images)
    # in pixel units of the [0, 1] image
    assert ((pix_pil - pix_torch) * torch.tensor(STD).view(1, 3, 1, 1)).abs().max() < 2 / 255
    x = images.clone().requires_grad_(True)
    soft = reward(x, PROMPTS)
    soft.sum().backward()
    torch.testing.assert_close(soft.detach(), exact, atol=1e-2, rtol=0)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
