"""GenEval-mini verifier: a rule-based detector and the GenEval scoring rules for ``train.data.geneval_mini``.

Detection, per image (values in [-1, 1], mapped to [0, 1]):

1. every pixel takes the nearest colour of {background} + palette (Euclidean in RGB);
2. the pixels of each palette colour split into 4-connected components; components smaller than
   ``min_area`` pixels are specks, not objects, but more than ``max_speck_pixels`` speck pixels in all
   make one "clutter" object (noise is not an empty picture);
3. each object's shape from its bounding box: ``fill = area / (w * h)`` and ``bottom = share of its pixels
   below the box's mid-height`` (0.5 for circles and squares, 0.75 for an upward triangle):
   ``bottom >= 0.6`` and ``fill <= 0.8`` -> triangle; otherwise ``fill >= 0.9`` -> square; ``fill`` in
   [0.5, 0.9) -> circle; ``fill < 0.35`` or a box with aspect ratio beyond 2, or anything else -> unknown.
   (Renders measure: circles fill 0.75-0.85, squares 1.0, triangles fill 0.57-0.64 and bottom 0.69-0.72.)

A prompt's constraints (all must hold for the strict score; the partial score is the fraction that hold):
one "exactly N of this shape (and colour)" constraint per required object, for ``position`` one for the
relation (centre of A beyond the centre of B by more than ``position_margin`` px along the named axis, each
of A and B present exactly once), and one "no other objects" constraint (unknown shapes count as others).
The benchmark score is the mean over task types of the per-task mean strict score, as in GenEval.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from train.data.geneval_mini import BACKGROUND, PALETTE, TASKS, Prompt, parse_prompt

__all__ = ["GenEvalMini", "DetectedObject"]

_COLOR_NAMES = tuple(PALETTE)
# 4-connectivity inside an image and a colour plane, none across images or colour planes.
_STRUCTURE = np.zeros((3, 3, 3, 3), dtype=bool)
_STRUCTURE[1, 1, 1, :] = _STRUCTURE[1, 1, :, 1] = True


class DetectedObject(tuple):
    """``(shape, color, cx, cy, area)``; ``shape`` is ``"unknown"`` when no class fits, ``"clutter"`` for
    the specks of an image taken together when they are too many."""

    __slots__ = ()

    def __new__(cls, shape: str, color: str, cx: float, cy: float, area: int):
        return super().__new__(cls, (shape, color, cx, cy, area))

    shape = property(lambda self: self[0])
    color = property(lambda self: self[1])
    cx = property(lambda self: self[2])
    cy = property(lambda self: self[3])
    area = property(lambda self: self[4])


class GenEvalMini:
    """Batched CPU verifier.  ``score(images [B, 3, H, W] in [-1, 1], prompts) -> {"strict", "partial"}``."""

    def __init__(self, min_area: int = 15, max_speck_pixels: int = 64, position_margin: float = 2.0):
        if min_area < 1:
            raise ValueError(f"min_area: expected >= 1, got {min_area}")
        self.min_area = min_area
        self.max_speck_pixels = max_speck_pixels
        self.position_margin = position_margin
        self._colors = np.array([BACKGROUND] + [PALETTE[c] for c in _COLOR_NAMES], dtype=np.float32)

    # ------------------------------------------------------------------------------------------ detection
    def detect(self, images: torch.Tensor) -> list[list[DetectedObject]]:
        """The objects found in each image of ``images [B, 3, H, W]`` (values in [-1, 1])."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a tensor shaped [B, 3, H, W], got {got}")
        x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
        b, h, w, _ = x.shape
        dist = ((x[..., None, :] - self._colors) ** 2).sum(-1)  # [B, H, W, K]
        nearest = dist.argmin(-1)  # 0 = background
        planes = np.stack([nearest == k + 1 for k in range(len(_COLOR_NAMES))], axis=1)  # [B, C, H, W]
        labels, n = ndimage.label(planes, structure=_STRUCTURE)
        found: list[list[DetectedObject]] = [[] for _ in range(b)]
        if n == 0:
            return found
        flat = labels.ravel()
        area = np.bincount(flat, minlength=n + 1)
        yy = np.broadcast_to(np.arange(h, dtype=np.float64)[:, None] + 0.5, labels.shape).ravel()
        xx = np.broadcast_to(np.arange(w, dtype=np.float64)[None, :] + 0.5, labels.shape).ravel()
        cy = np.bincount(flat, weights=yy, minlength=n + 1) / np.maximum(area, 1)
        cx = np.bincount(flat, weights=xx, minlength=n + 1) / np.maximum(area, 1)
        slices = ndimage.find_objects(labels)
        ymin = np.zeros(n + 1)
        ymax = np.zeros(n + 1)
        for i, sl in enumerate(slices, start=1):
            ymin[i], ymax[i] = sl[2].start, sl[2].stop
        mid = (ymin + ymax) / 2
        # a pixel row on the mid-line counts half, so odd-sized boxes are measured without bias
        lower = (yy > mid[flat]).astype(np.float64) + 0.5 * (yy == mid[flat])
        below = np.bincount(flat, weights=lower, minlength=n + 1)
        speck_pixels = np.zeros(b, dtype=np.int64)
        for i, sl in enumerate(slices, start=1):
            if area[i] < self.min_area:
                speck_pixels[sl[0].start] += area[i]
                continue
            img, plane = sl[0].start, sl[1].start
            bh, bw = sl[2].stop - sl[2].start, sl[3].stop - sl[3].start
            shape = self._classify(area[i] / (bh * bw), below[i] / area[i], max(bh, bw) / min(bh, bw))
            obj = DetectedObject(shape, _COLOR_NAMES[plane], float(cx[i]), float(cy[i]), int(area[i]))
            found[img].append(obj)
        for img in np.flatnonzero(speck_pixels > self.max_speck_pixels):
            found[img].append(DetectedObject("clutter", "mixed", w / 2, h / 2, int(speck_pixels[img])))
        return found

    @staticmethod
    def _classify(fill: float, bottom: float, aspect: float) -> str:
        if aspect > 2.0 or fill < 0.35:
            return "unknown"
        if bottom >= 0.6:
            return "triangle" if fill <= 0.8 else "unknown"
        if fill >= 0.9:
            return "square"
        if fill >= 0.5:
            return "circle"
        return "unknown"

    # ------------------------------------------------------------------------------------------- scoring
    @staticmethod
    def matching(objects: list[DetectedObject], spec) -> list[DetectedObject]:
        """The detected ``objects`` that fit ``spec``: its shape, and its colour when it names one."""
        return [o for o in objects if o.shape == spec.shape and (spec.color is None or o.color == spec.color)]

    def constraints(self, objects: list[DetectedObject], prompt: Prompt) -> list[bool]:
        """The truth value of each of ``prompt``'s constraints on the detected ``objects``."""
        hits = [self.matching(objects, spec) for spec in prompt.objects]
        checks = [len(h) == spec.count for h, spec in zip(hits, prompt.objects, strict=True)]
        used = {id(o) for h in hits for o in h}
        if prompt.relation is not None:
            a, b = hits[:2]
            checks.append(len(a) == 1 and len(b) == 1 and self._relation(a[0], b[0], prompt.relation))
        checks.append(len(used) == len(objects))  # nothing else in the image
        return checks

    def _relation(self, a: DetectedObject, b: DetectedObject, relation: str) -> bool:
        m = self.position_margin
        return {
            "left of": b.cx - a.cx > m,
            "right of": a.cx - b.cx > m,
            "above": b.cy - a.cy > m,
            "below": a.cy - b.cy > m,
        }[relation]

    def score(self, images: torch.Tensor, prompts: list[Prompt | str]) -> dict[str, torch.Tensor]:
        """Per image ``strict`` (1 if every constraint holds, else 0) and ``partial`` (fraction that hold),
        float32 tensors ``[B]``.  ``prompts`` are :class:`Prompt` objects or their texts."""
        if len(prompts) != len(images):
            raise ValueError(f"prompts: expected {len(images)} prompts (one per image), got {len(prompts)}")
        prompts = [parse_prompt(p) if isinstance(p, str) else p for p in prompts]
        strict, partial = [], []
        for objects, prompt in zip(self.detect(images), prompts, strict=True):
            checks = self.constraints(objects, prompt)
            strict.append(float(all(checks)))
            partial.append(sum(checks) / len(checks))
        return {"strict": torch.tensor(strict), "partial": torch.tensor(partial)}

    __call__ = score

    @staticmethod
    def summarize(scores: torch.Tensor, prompts: list[Prompt | str]) -> dict[str, float]:
        """Per-task means of ``scores [B]`` and their mean over the tasks present (``"score"``)."""
        if len(prompts) != len(scores):
            raise ValueError(f"prompts: expected {len(scores)} prompts (one per score), got {len(prompts)}")
        tasks = [(parse_prompt(p) if isinstance(p, str) else p).task for p in prompts]
        out = {}
        for task in TASKS:
            sel = [s for s, t in zip(scores.tolist(), tasks, strict=True) if t == task]
            if sel:
                out[task] = float(np.mean(sel))
        out = {"score": float(np.mean(list(out.values()))) if out else float("nan"), **out}
        return out
