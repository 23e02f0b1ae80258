"""OCR reward: how well an image spells the prompt's quoted text (math.md §8, "ocr").

``r = 1 - min(d, |t|) / |t|`` where ``t`` is the text between the prompt's first pair of double quotes and
``o`` the text the OCR engine reads (detections with confidence > 0, joined), both with spaces removed and
lower-cased, and ``d = 0`` if ``t`` occurs in ``o``, else the Levenshtein distance ``lev(o, t)``.  This is
flow_grpo's OCR reward, yifan123/flow_grpo@ac4c86e8cae021841f1fde853d340e0db67690dd flow_grpo/ocr.py, with
two deliberate differences: the engine is RapidOCR (PP-OCRv4 det/rec ONNX weights shipped in the
``rapidocr-onnxruntime`` wheel, no download) instead of PaddleOCR, and an OCR failure raises instead of
scoring the image 0 (flow_grpo prints and gives the maximal penalty: a silent zero).  A prompt without
quoted text is refused by name (flow_grpo raises an IndexError there).

Install the engine with ``pip install -e ".[ocr]"``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["OcrReward", "levenshtein", "ocr_reward_from_text", "quoted_text"]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1) -- ``Levenshtein.distance``."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def quoted_text(prompt: str) -> str:
    """The text between the prompt's first two double quotes (flow_grpo: ``prompt.split('"')[1]``)."""
    parts = str(prompt).split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(
            f'ocr reward: expected a prompt with non-empty "quoted text" to render, got {prompt!r}'
        )
    return parts[1]


def ocr_reward_from_text(recognized: str, target: str) -> float:
    """``1 - min(d, |t|) / |t|`` of the module docstring (spaces removed, lower case, substring -> 0)."""
    rec = recognized.replace(" ", "").lower()
    tgt = target.replace(" ", "").lower()
    if not tgt:
        raise ValueError(f"ocr reward: expected non-empty target text, got {target!r}")
    dist = 0 if tgt in rec else levenshtein(rec, tgt)
    dist = min(dist, len(tgt))
    return 1.0 - dist / len(tgt)


class OcrReward:
    """``(images [B, 3, H, W] in [-1, 1], prompts with "quoted text") -> float32 [B]`` (math.md §8)."""

    name = "ocr"
    differentiable = False

    def __init__(self):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise ImportError(
                'the ocr reward needs RapidOCR (rapidocr-onnxruntime): pip install -e ".[ocr]"'
            ) from None
        self.engine = RapidOCR()

    def read(self, rgb: np.ndarray) -> str:
        """The text the engine reads in one ``uint8 [H, W, 3]`` RGB image (detections with score > 0, in the
        engine's order, joined without separator as flow_grpo joins PaddleOCR's lines)."""
        result, _ = self.engine(np.ascontiguousarray(rgb[..., ::-1]))  # RapidOCR takes arrays as OpenCV BGR
        return "".join(text for _, text, score in (result or []) if float(score) > 0)

    def __call__(self, images: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        from .basic import to_uint8
        from .client import prompt_text

        targets = [quoted_text(prompt_text(p)) for p in prompts]
        arrs = to_uint8(images)
        return torch.tensor(
            [ocr_reward_from_text(self.read(a), t) for a, t in zip(arrs, targets, strict=True)],
            dtype=torch.float32,
        )
