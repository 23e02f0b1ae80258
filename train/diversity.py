"""Diversity and drift of held-out samples in a fixed feature space (math.md §9.2).

* ``eval/diversity``: per prompt, the mean pairwise distance between the features of its ``K`` samples (fixed
  seeds), averaged over the prompts;
* ``eval/drift``: per held-out sample, the distance between its features and those of the base model's
  sample from the SAME noise (the initial weights at iteration 0, whose LoRA ``B = 0`` makes them the base
  model, or the adapters switched off), averaged over the samples.

The feature space (named in the log as ``eval/feature``):

* ``geneval_palette_grid4``: the embedded default (GenEval-mini prompts).  The verifier's first detection
  step (train/rewards/geneval_mini.py: every pixel takes the nearest colour of background + palette) pooled
  over a 4 x 4 grid of cells: per cell the share of its pixels of each of the 5 colours.  It sees which
  colours sit where, i.e. the objects' colours, positions and sizes the verifier reads;
* ``geneval_objects`` (``--eval.feature geneval_objects``): the verifier's detected objects themselves
  (train/rewards/geneval_mini.py ``detect``: components of one palette colour of at least ``min_area``
  pixels, their shape class, and the specks' "clutter" object).  Each object is a unit-norm Gaussian bump
  (std one cell) at its centroid on an 8 x 8 grid, in its own channel of (colour, shape) (4 x 4, and one for
  clutter).  It sees which objects there are and where, not their texture: specks smaller than an object
  (fewer than the verifier's clutter threshold in all) move it not at all, where they move the palette grid's
  cells;
* ``clip:<dir>``: the L2-normalised image embedding of a local CLIP (``--eval.feature-clip-path``);
* ``pixels16``: otherwise, the image in [0, 1] area-downsampled to at most 16 x 16 (a documented fallback; it
  measures layout and colour, not semantics).

Every feature is scaled so a distance is Euclidean: palette grid ``<= sqrt(2)`` (the root mean over cells of
the squared distance between two colour distributions), CLIP ``<= 2`` (unit vectors), pixels ``<= 1``
(root-mean-square pixel difference), objects divided by ``sqrt(2)``: 1 between two one-object images whose
objects differ in colour or shape (or lie far apart), 0.47 for the same object moved by one cell (4 px of 32),
and growing with the number of objects that differ.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = [
    "PaletteGridFeature",
    "ObjectFeature",
    "PixelFeature",
    "ClipFeature",
    "build_feature",
    "group_diversities",
    "group_diversity",
    "mean_and_se",
    "standard_error",
    "paired_difference",
    "paired_distances",
    "paired_distance",
]


class PaletteGridFeature:
    """GenEval-mini's nearest-palette-colour map pooled to ``cells x cells`` colour shares ->
    ``[B, 5 cells^2]``."""

    def __init__(self, cells: int = 4):
        from train.data.geneval_mini import BACKGROUND, PALETTE

        self.cells = cells
        self.name = f"geneval_palette_grid{cells}"
        self.colors = torch.tensor([BACKGROUND, *PALETTE.values()], dtype=torch.float32)  # [K, 3]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2  # [B, 3, H, W]
        d = ((x[:, None] - self.colors[None, :, :, None, None]) ** 2).sum(2)  # [B, K, H, W]
        onehot = torch.nn.functional.one_hot(d.argmin(1), len(self.colors)).permute(0, 3, 1, 2).float()
        shares = torch.nn.functional.adaptive_avg_pool2d(onehot, self.cells)  # [B, K, c, c]: 1 per cell
        return shares.permute(0, 2, 3, 1).flatten(1) / self.cells  # 1/sqrt(cells^2): a root mean over cells


class ObjectFeature:
    """GenEval-mini's detected objects, each a unit-norm Gaussian bump (std ``sigma_cells`` cells) at its
    centroid on a ``cells x cells`` grid in its (colour, shape) channel, summed per image and divided by
    ``sqrt(2)`` -> ``[B, 17 cells^2]``."""

    SHAPES = ("circle", "square", "triangle", "unknown")

    def __init__(self, cells: int = 8, sigma_cells: float = 1.0):
        from train.data.geneval_mini import PALETTE

        from .rewards.geneval_mini import GenEvalMini

        self.cells, self.sigma_cells = cells, sigma_cells
        self.name = "geneval_objects"
        self.verifier = GenEvalMini()
        self.channels = {(c, s): i for i, (c, s) in enumerate((c, s) for c in PALETTE for s in self.SHAPES)}
        self.clutter = len(self.channels)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        k = self.cells
        centres = (torch.arange(k, dtype=torch.float64) + 0.5) / k  # cell centres, in image fractions
        out = torch.zeros(b, self.clutter + 1, k, k, dtype=torch.float64)
        for i, objects in enumerate(self.verifier.detect(images)):
            for o in objects:
                ch = self.clutter if o.shape == "clutter" else self.channels[(o.color, o.shape)]
                gy = torch.exp(-0.5 * ((centres - o.cy / h) * k / self.sigma_cells) ** 2)
                gx = torch.exp(-0.5 * ((centres - o.cx / w) * k / self.sigma_cells) ** 2)
                bump = gy[:, None] * gx[None, :]
                out[i, ch] += bump / bump.norm()
        return (out.flatten(1) / 2**0.5).float()


class PixelFeature:
    """The image in [0, 1], area-downsampled to at most ``size x size``, divided by ``sqrt(dims)``."""

    def __init__(self, size: int = 16):
        self.size = size
        self.name = f"pixels{size}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        x = torch.nn.functional.adaptive_avg_pool2d(x, (min(self.size, h), min(self.size, w))).flatten(1)
        return x / x.shape[1] ** 0.5


class ClipFeature:
    """L2-normalised image embedding of a local CLIP directory (transformers ``CLIPModel`` with its
    ``preprocessor_config.json``, nothing downloaded), preprocessed as the CLIP rewards' tensor path does
    (train/rewards/clip_models.py ``tensor_preprocess``)."""

    def __init__(self, path: str, device: str = "cpu"):
        check_clip_path(path)
        from transformers import CLIPModel

        from .rewards.clip_models import _frozen, _spec, load_pil_image_processor

        self.device = device
        self.model = _frozen(CLIPModel.from_pretrained(path), device)
        self.spec = _spec(load_pil_image_processor(Path(path)))
        self.name = f"clip:{Path(path).name}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from .rewards.clip_models import _pooled, tensor_preprocess

        x = tensor_preprocess(images.detach().float().to(self.device), self.spec)
        emb = _pooled(self.model.get_image_features(pixel_values=x)).float().cpu()
        return emb / emb.norm(dim=-1, keepdim=True)


def check_clip_path(path: str) -> None:
    """``--eval.feature-clip-path`` must be a local CLIP directory (refused before any work)."""
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (Path(path) / f).is_file()]
    if missing:
        raise ValueError(
            f"--eval.feature-clip-path: expected a local CLIP directory holding config.json and "
            f"preprocessor_config.json, got {path!r} (missing {', '.join(missing)})"
        )


FEATURES = ("auto", "geneval_palette_grid4", "geneval_objects", "pixels16")


def build_feature(*, geneval: bool, clip_path: str | None = None, device: str = "cpu", name: str = "auto"):
    """The feature of a run's diversity and drift (``--eval.feature``): ``auto`` is a local CLIP when given,
    else the GenEval-mini palette grid on the embedded default's prompts, else downsampled pixels."""
    if clip_path:
        return ClipFeature(clip_path, device)
    if name == "auto":
        name = "geneval_palette_grid4" if geneval else "pixels16"
    if name.startswith("geneval_") and not geneval:
        raise ValueError(f"--eval.feature: {name} reads GenEval-mini prompts' images (the embedded default)")
    return {"geneval_palette_grid4": PaletteGridFeature, "geneval_objects": ObjectFeature,
            "pixels16": PixelFeature}[name]()


def group_diversities(features: torch.Tensor, groups: torch.Tensor) -> list[float]:
    """Per group (prompt) with at least two samples, in ``torch.unique(groups)`` order: the mean pairwise
    Euclidean distance between the group's ``features`` rows."""
    out = []
    for g in torch.unique(groups):
        f = features[groups == g].double()
        k = f.shape[0]
        if k < 2:
            continue
        d = (f[:, None] - f[None]).norm(dim=-1)  # exact zeros on the diagonal (cdist's matmul path is not)
        out.append(float(d.sum() / (k * (k - 1))))  # the diagonal is 0: the mean over k(k-1) ordered pairs
    return out


def group_diversity(features: torch.Tensor, groups: torch.Tensor) -> float:
    """math.md §9.2: ``eval/diversity``, the mean of :func:`group_diversities` (NaN when no group has two
    samples; the evaluator also takes their :func:`mean_and_se`, ``eval/diversity_se``)."""
    return mean_and_se(group_diversities(features, groups))[0]


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean of ``values`` (NaN when empty) and its :func:`standard_error`."""
    return (sum(values) / len(values) if values else float("nan")), standard_error(values)


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of ``values``: sample standard deviation / sqrt(n) (NaN below two)."""
    n = len(values)
    if n < 2:
        return float("nan")
    return float(torch.tensor(values, dtype=torch.float64).std() / n**0.5)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """math.md §9.2: two runs' per-prompt values on the same prompts and noise -> the mean of ``a - b`` and
    its paired standard error (of the per-prompt differences), which leaves out the spread between prompts
    that both runs share."""
    if len(a) != len(b):
        raise ValueError(f"paired difference: expected values of the same prompts, got {len(a)} and {len(b)}")
    return mean_and_se([x - y for x, y in zip(a, b, strict=True)])


def paired_distances(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row, ``||features_i - reference_i||`` (float64): each sample's drift from the same noise."""
    if features.shape != reference.shape:
        raise ValueError(
            f"drift reference: expected features shaped {tuple(features.shape)} (the held-out samples), got "
            f"{tuple(reference.shape)}; the held-out set changed since the reference was taken"
        )
    return (features.double() - reference.double()).norm(dim=1)


def paired_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """math.md §9.2: the mean of :func:`paired_distances` (drift from the same noise)."""
    return float(paired_distances(features, reference).mean())
