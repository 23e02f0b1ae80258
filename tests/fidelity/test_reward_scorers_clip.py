"""The CLIP-based model rewards against transcriptions of the public reference scorers, on tiny random-weight
checkpoints of the real architectures (transformers CLIPModel, the CLIP image processor and tokenizer, the
LAION aesthetic head with the real file's keys), identical images and prompts.

References transcribed here (the scorer and the reward function that calls it):

* PickScore: yifan123/flow_grpo@ac4c86e8cae021841f1fde853d340e0db67690dd flow_grpo/pickscore_scorer.py
  ``PickScoreScorer.__call__`` and flow_grpo/rewards.py ``pickscore_score`` (uint8 PIL images, AutoProcessor,
  ``logit_scale.exp() * cos / 26``).
* Aesthetic: kvablack/ddpo-pytorch@1958463f020112c9a7bc85768d296daacc2e1b4b ddpo_pytorch/aesthetic_scorer.py
  ``AestheticScorer`` / ``MLP`` and ddpo_pytorch/rewards.py ``aesthetic_score`` (the same code is in
  flow_grpo@ac4c86e8 flow_grpo/aesthetic_scorer.py).
* CLIP score: zhtmike/flow_grpo@19d5169c17d5d1b8f0ebd2ad3a4d3c5f15f6df29 flow_grpo/clip_scorer.py
  ``ClipScorer`` (a fork carrying yifan123/flow_grpo's file) and its flow_grpo/rewards.py ``clip_score``:
  torchvision ``Resize`` / ``CenterCrop`` / ``Normalize`` on float [0, 1] images, ``padding="max_length"``,
  ``logits_per_image.diagonal() / 30``.  torchvision's tensor ``Resize`` is ``F.interpolate(antialias=True)``
  (bilinear, ``align_corners=False``); the transcription uses torchvision when installed.
* The differentiable path: mihirp1998/AlignProp@b22918afd53f254f2ba66eb1233d94121aade5fc
  alignprop_trainer.py ``aesthetic_loss_fn`` (``((x / 2) + 0.5).clamp(0, 1)``, ``Resize(224)``,
  ``Normalize``).

The references run with the transformers of their time, whose ``CLIPImageProcessor`` is the PIL
implementation; ``use_fast=False`` asks for it in transformers 4 and 5 alike.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from tests.train import _clip_helpers as H

# same process, same ops: differences are float32 reductions in another order (diag of a matmul vs a row sum)
ATOL = RTOL = 2e-5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_refs")
    H.write_clip(root / "pickscore", seed=1, processor=False, tokenizer=False)  # PickScore_v1: model only
    # the processor's repository (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) is a whole CLIP checkpoint:
    # AutoProcessor finds CLIPProcessor through its config.json
    H.write_clip(root / "processor", seed=9)
    H.write_clip(root / "aesthetic", projection_dim=768, seed=2)
    H.write_aesthetic_head(root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    H.write_clip(root / "clip", seed=3)
    return root


def _build(name, dirs):
    from train.rewards.registry import build_reward

    paths = {
        "pickscore": str(dirs / "pickscore"),
        "pickscore_processor": str(dirs / "processor"),
        "aesthetic": str(dirs / "aesthetic"),
        "clip_score": str(dirs / "clip"),
    }
    return build_reward(name, paths=paths, device="cpu").fns[name]


# ---- transcriptions of the reference scorers ---------------------------------------------------------------


def _to_ref_range(images):
    """The engine's [-1, 1] images as the references receive them: [0, 1] (their pipelines' output)."""
    return (images / 2 + 0.5).clamp(0, 1)


def ref_pickscore(processor_path, model_path, prompts, images01):
    """flow_grpo rewards.pickscore_score + PickScoreScorer.__call__ (dtype float32)."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(processor_path, use_fast=False)
    model = AutoModel.from_pretrained(model_path).eval().to(dtype=torch.float32)
    images = (images01 * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    images = [Image.fromarray(image) for image in images]
    with torch.no_grad():
        # the reference also passes padding=True, truncation=True, max_length=77 here, text options that
        # transformers 4 ignored for an images-only call and transformers 5 refuses without text
        image_inputs = processor(images=images, return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77,
                                return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs)
        image_embs = getattr(image_embs, "pooler_output", image_embs)  # transformers 5 returns a ModelOutput
        image_embs = image_embs / image_embs.norm(p=2, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        text_embs = text_embs / text_embs.norm(p=2, dim=-1, keepdim=True)
        logit_scale = model.logit_scale.exp()
        scores = logit_scale * (text_embs @ image_embs.T)
        scores = scores.diag()
        scores = scores / 26
    return scores


class RefMLP(nn.Module):
    """ddpo_pytorch/aesthetic_scorer.py MLP."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
            nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    @torch.no_grad()
    def forward(self, embed):
        return self.layers(embed)


def ref_aesthetic(clip_path, head_file, images01):
    """ddpo_pytorch rewards.aesthetic_score + AestheticScorer.__call__ (dtype float32)."""
    from transformers import CLIPModel, CLIPProcessor

    clip = CLIPModel.from_pretrained(clip_path).eval()
    processor = CLIPProcessor.from_pretrained(clip_path, use_fast=False)
    mlp = RefMLP()
    mlp.load_state_dict(torch.load(head_file))
    mlp.eval()
    images = (images01 * 255).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        inputs = processor(images=images, return_tensors="pt")
        inputs = {k: v.to(torch.float32) for k, v in inputs.items()}
        embed = clip.get_image_features(**inputs)
        embed = getattr(embed, "pooler_output", embed)
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        return mlp(embed).squeeze(1)


def _tv_transform(processor):
    """flow_grpo clip_scorer.get_image_transform: Resize(shortest_edge) -> CenterCrop -> Normalize."""
    config = processor.to_dict()
    short = config["size"]["shortest_edge"]
    crop = (config["crop_size"]["height"], config["crop_size"]["width"])
    mean, std = processor.image_mean, processor.image_std
    try:
        import torchvision.transforms as T

        return T.Compose([T.Resize(short), T.CenterCrop(crop), T.Normalize(mean=mean, std=std)])
    except ImportError:  # torchvision's tensor ops, written out
        import torch.nn.functional as F

        def tform(x):
            h, w = x.shape[-2:]
            s, long_ = min(h, w), max(h, w)
            new = (short, int(short * long_ / s))
            x = F.interpolate(x, size=new if h <= w else new[::-1], mode="bilinear", align_corners=False,
                              antialias=True)
            h, w = x.shape[-2:]
            top, left = int(round((h - crop[0]) / 2.0)), int(round((w - crop[1]) / 2.0))
            x = x[..., top : top + crop[0], left : left + crop[1]]
            m = torch.tensor(mean).view(-1, 1, 1)
            sd = torch.tensor(std).view(-1, 1, 1)
            return (x - m) / sd

        return tform


def ref_clip_score(clip_path, prompts, images01):
    """flow_grpo ClipScorer.__call__ (clip_score passes float [0, 1] tensors straight through)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_path)
    processor = CLIPProcessor.from_pretrained(clip_path, use_fast=False)
    tform = _tv_transform(processor.image_processor)
    model.eval()
    with torch.no_grad():
        texts = processor(text=prompts, padding="max_length", truncation=True, return_tensors="pt")
        pixels = tform(images01).to(dtype=images01.dtype)
        outputs = model(pixel_values=pixels, **texts)
        return outputs.logits_per_image.diagonal() / 30


def ref_clip_image_processor(images01, size, crop, mean, std):
    """transformers 4's CLIPImageProcessor.preprocess written out: uint8 -> PIL bicubic resize of the shorter
    side to ``size`` (longer: ``int(size * long / short)``), centre crop at ``(H - h) // 2``, ``* (1/255)``,
    ``(x - mean) / std``."""
    u8 = (images01 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for a in u8:
        h, w = a.shape[:2]
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        r = np.asarray(Image.fromarray(a).resize((nw, nh), resample=Image.BICUBIC))
        top, left = (nh - crop) // 2, (nw - crop) // 2
        r = r[top : top + crop, left : left + crop].astype(np.float64) * (1 / 255)
        r = (r.astype(np.float32) - np.array(mean, np.float32)) / np.array(std, np.float32)
        out.append(torch.from_numpy(r).permute(2, 0, 1))
    return torch.stack(out)


# ---- the engine against them ---------------------------------------------------------------------------


def test_pickscore_matches_flow_grpo(dirs):
    x = H.images(3, 40, 48, seed=4)
    got = _build("pickscore", dirs)(x, H.PROMPTS)
    want = ref_pickscore(str(dirs / "processor"), str(dirs / "pickscore"), H.PROMPTS, _to_ref_range(x))
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert got.std() > 1e-3  # the images and prompts differ, so do the scores


def test_aesthetic_matches_ddpo_pytorch(dirs):
    x = H.images(3, 48, 40, seed=5)
    got = _build("aesthetic", dirs)(x, H.PROMPTS)
    want = ref_aesthetic(str(dirs / "aesthetic"), dirs / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth",
                         _to_ref_range(x))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert got.std() > 1e-5


def test_clip_score_matches_flow_grpo_with_and_without_grad(dirs):
    x = H.images(3, 40, 48, seed=6)
    r = _build("clip_score", dirs)
    want = ref_clip_score(str(dirs / "clip"), H.PROMPTS, _to_ref_range(x))
    with torch.no_grad():
        got = r(x, H.PROMPTS)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    xg = x.clone().requires_grad_(True)
    torch.testing.assert_close(r(xg, H.PROMPTS).detach(), want, atol=ATOL, rtol=RTOL)


def test_pil_path_is_the_clip_image_processor(dirs):
    """The no-grad path's pixels are transformers 4's CLIPImageProcessor's, whatever backend transformers 5
    would pick by default."""
    from train.rewards.clip_models import load_pil_image_processor, pil_preprocess

    proc = load_pil_image_processor(dirs / "processor")
    for h, w in ((40, 48), (48, 40), (24, 20)):
        x = H.images(2, h, w, seed=h)
        want = ref_clip_image_processor(_to_ref_range(x), 32, 32, H.OPENAI_MEAN, H.OPENAI_STD)
        torch.testing.assert_close(pil_preprocess(x, proc), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw", [(40, 48), (64, 64), (24, 20)])
def test_grad_path_pixels_agree_with_the_scorers(dirs, hw):
    """Torch-op preprocessing (bicubic, antialiased) vs the processor on uint8 PIL images: they differ by
    the input's uint8 quantisation (<= 0.5 level), the processor's uint8 output (<= 0.5 level) and PIL's
    fixed-point filter, so within 2 levels of 255 everywhere and 0.5 on average; AlignProp's bilinear
    kernel is measured further off (why the grad path resizes bicubically)."""
    from train.rewards.clip_models import _spec, load_pil_image_processor, pil_preprocess, tensor_preprocess

    proc = load_pil_image_processor(dirs / "processor")
    x = H.images(2, *hw, seed=7)
    ref = pil_preprocess(x, proc)
    std = torch.tensor(H.OPENAI_STD).view(1, 3, 1, 1)
    levels = ((tensor_preprocess(x, _spec(proc)) - ref) * std * 255).abs()
    assert levels.max() <= 2.0 and levels.mean() <= 0.5, (levels.max(), levels.mean())
    bilinear = ((tensor_preprocess(x, _spec(proc), mode="bilinear") - ref) * std * 255).abs()
    assert bilinear.mean() > 2 * levels.mean()


@pytest.mark.parametrize("name, atol", [("pickscore", 0.03), ("aesthetic", 1e-3)])
def test_grad_path_scores_agree_with_the_reference_path(dirs, name, atol):
    """Whole-score agreement of the two paths on the tiny random models (whose features move faster with
    the pixels than a trained CLIP's): PickScore within 0.03 (of a 100 / 26 = 3.8 scale), aesthetic 1e-3."""
    r = _build(name, dirs)
    x = H.images(3, 40, 48, seed=8)
    with torch.no_grad():
        ref = r(x, H.PROMPTS)
    xg = x.clone().requires_grad_(True)
    got = r(xg, H.PROMPTS)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), ref, atol=atol, rtol=0)
