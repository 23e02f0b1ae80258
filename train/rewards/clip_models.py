"""CLIP-based model rewards loaded from local directories: PickScore and the LAION aesthetic predictor v2
(math.md §8.1); the shared preprocessing also serves ``clip_score`` (train/rewards/basic.py).

Each reward maps ``(images [B, 3, H, W] in [-1, 1], prompts) -> float32 [B]`` on ``images``' device and runs
its model on the device it was built for (``--reward-device``).  Two preprocessing paths:

* without gradient (the usual rollout scoring): exactly the reference scorer's path, the images quantised to
  uint8 (``round(255 x)``) and put through the checkpoint's CLIP image processor on PIL (bicubic resize of
  the shorter side, centre crop, rescale by 1/255, normalise);
* with gradient (``torch.is_grad_enabled()`` and ``images.requires_grad``; the reward-backprop loops): the
  same resize / centre crop / normalise done with torch ops on the float images, as the differentiable
  reward references do (mihirp1998/AlignProp@b22918af alignprop_trainer.py ``aesthetic_loss_fn``:
  ``((x / 2) + 0.5).clamp(0, 1)``, resize, normalise).  Unlike AlignProp (torchvision's bilinear
  ``Resize(224)``, no crop) the resize is bicubic with antialiasing (PyTorch's PIL-compatible kernel) and the
  crop is the processor's, so the gradient is that of the scorer the rollouts are scored with; the two
  paths differ by the uint8 quantisation and PIL's fixed-point arithmetic (within 2/255 per pixel,
  tests/fidelity/test_reward_scorers_clip.py).

Nothing is downloaded: every path comes from ``--reward-paths NAME=PATH`` and a missing entry or file is
refused when the reward is built, before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "PickScore",
    "Aesthetic",
    "AestheticMLP",
    "AESTHETIC_HEAD_FILE",
    "PICKSCORE_DIVISOR",
    "tensor_preprocess",
    "pil_preprocess",
    "require_path",
]

#: file name of the LAION aesthetic predictor v2 head (christophschuhmann/improved-aesthetic-predictor)
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
#: flow_grpo's PickScore reward is ``logit_scale.exp() * cos / 26`` ("norm to 0-1")
PICKSCORE_DIVISOR = 26.0


def require_path(paths: dict, entry: str, files: Sequence[str], what: str, example: str) -> Path:
    """``paths[entry]`` as a directory holding ``files``; refused with a message naming ``--reward-paths``."""
    given = paths.get(entry)
    if not given:
        raise ValueError(
            f"--reward-paths: expected {entry}=DIR (a local directory with {what}, e.g. {entry}={example}) "
            f"for the {entry.split('_')[0]} reward, got no {entry!r} entry"
        )
    p = Path(given)
    missing = [f for f in files if not (p / f).exists()]
    if not p.is_dir() or missing:
        raise FileNotFoundError(
            f"--reward-paths: expected {entry}=DIR to be a directory with {what} "
            f"({', '.join(files)}), got {given!r}"
            + (f" (missing {', '.join(missing)})" if p.is_dir() else " (not a directory)")
        )
    return p


def _has_tokenizer(p: Path) -> bool:
    return (p / "tokenizer.json").exists() or (p / "vocab.json").exists()


def load_pil_image_processor(path: Path):
    """The checkpoint's CLIP image processor on its PIL backend (what the references ran: transformers 4's
    ``CLIPImageProcessor``; transformers 5 names it ``CLIPImageProcessorPil`` and would otherwise pick the
    torchvision backend when torchvision is installed)."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4: the PIL implementation is CLIPImageProcessor itself
        from transformers import CLIPImageProcessor as cls
    return cls.from_pretrained(str(path))


def _spec(processor) -> dict:
    """Resize / crop / normalise parameters of a CLIP image processor, as plain numbers."""

    def get(d, key):
        return d.get(key) if isinstance(d, dict) else getattr(d, key, None)

    size, crop = processor.size, processor.crop_size
    short = get(size, "shortest_edge")
    if short is None:
        raise ValueError(f"expected a CLIP image processor resizing the shortest edge, got size={size!r}")
    return {
        "resize": bool(processor.do_resize),
        "shortest_edge": int(short),
        "crop": bool(processor.do_center_crop),
        "crop_hw": (int(get(crop, "height")), int(get(crop, "width"))),
        "normalize": bool(processor.do_normalize),
        "mean": [float(v) for v in processor.image_mean],
        "std": [float(v) for v in processor.image_std],
    }


def _resized_hw(h: int, w: int, short: int) -> tuple[int, int]:
    """Shorter side to ``short``, longer side ``int(short * long / short_side)`` (transformers'
    ``get_resize_output_image_size(default_to_square=False)`` and torchvision's ``Resize(int)``)."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def tensor_preprocess(
    images: torch.Tensor, spec: dict, *, mode: str = "bicubic", crop_round: bool = False
) -> torch.Tensor:
    """Differentiable CLIP preprocessing of ``images`` in [-1, 1]: ``x = (images / 2 + 0.5).clamp(0, 1)``,
    antialiased ``mode`` resize of the shorter side, centre crop, ``(x - mean) / std`` (math.md §8.1).
    ``crop_round``: the crop offset is ``round((H - h) / 2)`` (torchvision's ``CenterCrop``) instead of
    ``(H - h) // 2`` (transformers' processor)."""
    x = images.to(torch.promote_types(images.dtype, torch.float32))
    x = (x / 2 + 0.5).clamp(0, 1)
    if spec["resize"]:
        hw = _resized_hw(x.shape[-2], x.shape[-1], spec["shortest_edge"])
        if tuple(x.shape[-2:]) != hw:
            x = F.interpolate(x, size=hw, mode=mode, align_corners=False, antialias=True)
    if spec["crop"]:
        ch, cw = spec["crop_hw"]
        h, w = x.shape[-2:]
        if h < ch or w < cw:
            raise ValueError(f"expected images of at least {ch}x{cw} after resizing, got {h}x{w}")
        if crop_round:
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
    if spec["normalize"]:
        mean = torch.tensor(spec["mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(spec["std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def pil_preprocess(images: torch.Tensor, processor) -> torch.Tensor:
    """The reference scorers' path: ``uint8 = round(255 * (images / 2 + 0.5))`` (flow_grpo's and
    ddpo-pytorch's ``(images * 255).round().clamp(0, 255)`` on [0, 1] images), then the CLIP image
    processor on PIL images.  Returns ``pixel_values`` on the CPU."""
    from PIL import Image

    from .basic import to_uint8

    pil = [Image.fromarray(a) for a in to_uint8(images)]
    return processor(images=pil, return_tensors="pt")["pixel_values"]


def _pooled(out) -> torch.Tensor:
    """``get_image_features`` / ``get_text_features``: a tensor in transformers 4, a ModelOutput whose
    ``pooler_output`` holds the projected embedding in transformers 5."""
    return getattr(out, "pooler_output", out)


def unit_text_features(model, tok, device) -> torch.Tensor:
    """L2-normalised text embeddings of tokenizer output ``tok``."""
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    txt = _pooled(model.get_text_features(input_ids=ids, attention_mask=mask))
    return txt / txt.norm(p=2, dim=-1, keepdim=True)


def _wants_grad(images: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and images.requires_grad


def _frozen(model: torch.nn.Module, device: str) -> torch.nn.Module:
    model = model.to(device=device, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


class PickScore:
    """PickScore (yuvalkirstain/PickScore_v1, a CLIP-H/14 fine-tuned on Pick-a-Pic) as flow_grpo scores it
    (yifan123/flow_grpo@ac4c86e8 flow_grpo/pickscore_scorer.py ``PickScoreScorer``):
    ``logit_scale.exp() * cos(image_emb, text_emb) / 26`` (math.md §8.1).  Text: the processor's tokenizer
    with ``padding=True, truncation=True, max_length=77``.  ``model_dir``: the PickScore model (AutoModel);
    ``processor_dir``: the processor (the reference loads it from laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
    Differentiable (module docstring)."""

    name = "pickscore"
    differentiable = True

    def __init__(self, model_dir, processor_dir=None, device: str = "cpu", batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        processor_dir = Path(processor_dir or model_dir)
        self.device = device
        self.batch_size = int(batch_size)
        self.model = _frozen(AutoModel.from_pretrained(str(model_dir)), device)
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "logit_scale"):
            raise ValueError(
                f"--reward-paths: expected pickscore=DIR to hold a CLIP model (PickScore_v1), got "
                f"{type(self.model).__name__} from {str(model_dir)!r}"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(processor_dir))
        self.image_processor = load_pil_image_processor(processor_dir)
        self.spec = _spec(self.image_processor)

    def _text(self, prompts) -> torch.Tensor:
        tok = self.tokenizer(
            [str(p) for p in prompts], padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        return unit_text_features(self.model, tok, self.device)

    def _score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if _wants_grad(images):
            pixels = tensor_preprocess(images.to(self.device), self.spec)
        else:
            pixels = pil_preprocess(images, self.image_processor).to(self.device)
        img = _pooled(self.model.get_image_features(pixel_values=pixels))
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        cos = (img * self._text(prompts)).sum(-1)
        return self.model.logit_scale.exp() * cos / PICKSCORE_DIVISOR

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return _batched(self._score, images, prompts, self.batch_size)


class AestheticMLP(torch.nn.Module):
    """The LAION aesthetic predictor v2 head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 linear layers (dropout
    between the first four, inactive in eval), the state-dict keys of ``sac+logos+ava1-l14-linearMSE.pth``
    (``layers.{0,2,4,6,7}.{weight,bias}``), as kvablack/ddpo-pytorch@1958463f
    ddpo_pytorch/aesthetic_scorer.py ``MLP``."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(768, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


class Aesthetic:
    """The LAION aesthetic predictor v2 as ddpo-pytorch and flow_grpo score it (kvablack/ddpo-pytorch@1958463f
    ddpo_pytorch/aesthetic_scorer.py ``AestheticScorer``, identical in yifan123/flow_grpo@ac4c86e8):
    ``MLP(e / |e|)`` with ``e`` the CLIP ViT-L/14 image embedding (math.md §8.1).  ``clip_dir``: the CLIP
    model and its image processor (openai/clip-vit-large-patch14); ``head``: the MLP's ``.pth`` state dict.
    Prompts are ignored.  Differentiable (module docstring)."""

    name = "aesthetic"
    differentiable = True

    def __init__(self, clip_dir, head, device: str = "cpu", batch_size: int = 32):
        from transformers import CLIPModel

        self.device = device
        self.batch_size = int(batch_size)
        self.clip = _frozen(CLIPModel.from_pretrained(str(clip_dir)), device)
        dim = self.clip.config.projection_dim
        if dim != 768:
            raise ValueError(
                f"--reward-paths: expected aesthetic=DIR to hold CLIP ViT-L/14 (768-d embeddings, the head's "
                f"input), got a CLIP with projection_dim={dim} in {str(clip_dir)!r}"
            )
        self.image_processor = load_pil_image_processor(Path(clip_dir))
        self.spec = _spec(self.image_processor)
        self.mlp = AestheticMLP()
        state = torch.load(str(head), map_location="cpu", weights_only=True)
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(
                f"--reward-paths: expected {str(head)!r} to be the aesthetic head's state dict "
                f"({AESTHETIC_HEAD_FILE}: keys layers.0/2/4/6/7.weight/bias), got: {e}"
            ) from None
        self.mlp = _frozen(self.mlp, device)

    def _score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if _wants_grad(images):
            pixels = tensor_preprocess(images.to(self.device), self.spec)
        else:
            pixels = pil_preprocess(images, self.image_processor).to(self.device)
        embed = _pooled(self.clip.get_image_features(pixel_values=pixels))
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        return self.mlp(embed).squeeze(1)

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return _batched(self._score, images, prompts, self.batch_size)


def _batched(score, images: torch.Tensor, prompts, batch_size: int) -> torch.Tensor:
    """``score`` over chunks of ``batch_size`` images; float32 ``[B]`` on ``images``' device (the graph to
    ``images`` kept when grad is enabled)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"expected one prompt per image ({images.shape[0]}), got {len(prompts)}")
    outs = [
        score(images[i : i + batch_size], prompts[i : i + batch_size])
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(outs).float().to(images.device)


def pickscore_paths(opts: dict) -> tuple[Path, Path]:
    """``--reward-paths pickscore=DIR`` (model, and the processor unless ``pickscore_processor=DIR`` names
    another directory), checked without loading anything."""
    paths = opts.get("paths") or {}
    model_dir = require_path(
        paths, "pickscore", ["config.json"], "the PickScore_v1 model", "/models/PickScore_v1"
    )
    if paths.get("pickscore_processor"):
        proc = require_path(
            paths,
            "pickscore_processor",
            ["preprocessor_config.json"],
            "the CLIP-ViT-H-14 processor (image processor and tokenizer)",
            "/models/CLIP-ViT-H-14-laion2B-s32B-b79K",
        )
    else:
        proc = model_dir
    if not (proc / "preprocessor_config.json").exists() or not _has_tokenizer(proc):
        raise FileNotFoundError(
            f"--reward-paths: expected the PickScore processor (preprocessor_config.json and a tokenizer) in "
            f"{str(proc)!r}; put laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor files there or name their "
            f"directory with pickscore_processor=DIR"
        )
    return model_dir, proc


def build_pickscore(opts: dict) -> PickScore:
    model_dir, proc = pickscore_paths(opts)
    return PickScore(model_dir, proc, device=opts.get("device", "cpu"))


def aesthetic_paths(opts: dict) -> tuple[Path, Path]:
    """``--reward-paths aesthetic=DIR``: CLIP ViT-L/14 (config, weights, preprocessor_config.json) and the
    head ``sac+logos+ava1-l14-linearMSE.pth`` in DIR, or the head elsewhere with ``aesthetic_head=FILE``;
    checked without loading anything."""
    paths = opts.get("paths") or {}
    clip_dir = require_path(
        paths,
        "aesthetic",
        ["config.json", "preprocessor_config.json"],
        "openai/clip-vit-large-patch14 and the aesthetic head",
        "/models/aesthetic",
    )
    head = Path(paths.get("aesthetic_head") or clip_dir / AESTHETIC_HEAD_FILE)
    if not head.is_file():
        raise FileNotFoundError(
            f"--reward-paths: expected the aesthetic head {AESTHETIC_HEAD_FILE} in aesthetic=DIR or named by "
            f"aesthetic_head=FILE, got no file {str(head)!r}"
        )
    return clip_dir, head


def build_aesthetic(opts: dict) -> Aesthetic:
    clip_dir, head = aesthetic_paths(opts)
    return Aesthetic(clip_dir, head, device=opts.get("device", "cpu"))
