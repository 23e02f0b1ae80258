"""VLM judge reward: a vision-language model behind an OpenAI-compatible chat-completions endpoint (what vLLM
and SGLang serve) scores each image against its caption (math.md §8, "vlm_judge").

For each image the judge gets one user message: the image (PNG, resized to 512x512, as a base64 data URL)
and the UnifiedReward point-score question with the caption; the reward is ``s / 5`` where ``s`` in [1, 5]
is the number after ``Final Score:`` in the answer (regex ``Final Score:\\s*([1-5](?:\\.\\d+)?)``), decoding
at temperature 0.  Template, resize and parsing follow flow_grpo's ``unifiedreward_score_sglang``,
yifan123/flow_grpo@ac4c86e8cae021841f1fde853d340e0db67690dd flow_grpo/rewards.py (UnifiedReward's own
scorer, CodeGoat24/UnifiedReward@ff6f520247a2d36e2aff7b2ba53a935afd437f66
inference_qwen/image_generation/qwen_point_score_image_generation.py, asks the same question with an extra
element checklist).  Deliberate difference: an answer without a parsable score raises
:class:`RewardError` (flow_grpo scores it 0.0: a silent zero).

``--reward vlm_judge --reward-paths vlm_judge=http://HOST:PORT/v1 [--reward-vlm-model NAME]``; the model name
defaults to ``UnifiedReward-7b-v1.5`` (flow_grpo's), the key sent is ``$OPENAI_API_KEY`` or ``EMPTY``.
"""

from __future__ import annotations

import base64
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from .client import check_http_options, post_json, prompt_text
from .registry import RewardError

__all__ = ["VlmJudge", "QUESTION", "parse_score", "DEFAULT_MODEL"]

DEFAULT_MODEL = "UnifiedReward-7b-v1.5"
QUESTION = (
    "<image>\nYou are given a text caption and a generated image based on that caption. "
    "Your task is to evaluate this image based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. "
    "Consider the accuracy of depicted objects, their relationships, and attributes as described in the "
    "caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\n"
    "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]"
)
_SCORE = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")


def parse_score(text: str) -> float | None:
    """The first ``Final Score: s`` (s in [1, 5], decimals allowed) of an answer, or None."""
    m = _SCORE.search(text) if isinstance(text, str) else None
    return float(m.group(1)) if m else None


def image_data_url(rgb) -> str:
    """``uint8 [H, W, 3]`` -> PNG of the 512x512 resize (PIL's default filter) as flow_grpo's data URL."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).resize((512, 512)).save(buf, format="PNG")
    return "data:image;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class VlmJudge:
    """``(images [B, 3, H, W] in [-1, 1], captions) -> float32 [B]`` in [0.2, 1] (math.md §8)."""

    name = "vlm_judge"
    differentiable = False

    def __init__(
        self,
        base_url: str,
        *,
        model: str = DEFAULT_MODEL,
        timeout: float = 60.0,
        retries: int = 2,
        max_in_flight: int = 8,
        api_key: str | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"--reward-paths: expected vlm_judge=http://HOST:PORT/v1, got vlm_judge={base_url}"
            )
        check_http_options(timeout, retries, max_in_flight)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries = model, float(timeout), int(retries)
        self.headers = {"Authorization": f"Bearer {api_key or os.environ.get('OPENAI_API_KEY', 'EMPTY')}"}
        self.pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="vlm-judge")

    def ask(self, rgb, caption: str) -> str:
        """One chat completion: the judge's answer text."""
        payload = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url(rgb)}},
                        {"type": "text", "text": QUESTION.format(prompt=caption)},
                    ],
                }
            ],
            "temperature": 0,
        }
        ans = post_json(
            self.url,
            payload,
            timeout=self.timeout,
            retries=self.retries,
            headers=self.headers,
            what="vlm judge",
        )
        try:
            return ans["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RewardError(
                f"vlm judge {self.url}: expected a chat completion (choices[0].message.content), "
                f"got {str(ans)[:120]}"
            ) from None

    def __call__(self, images: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        from .basic import to_uint8

        captions = [prompt_text(p) for p in prompts]
        answers = list(self.pool.map(self.ask, to_uint8(images), captions))
        scores = []
        for k, a in enumerate(answers):
            s = parse_score(a)
            if s is None:
                raise RewardError(
                    f"vlm judge {self.url}: expected 'Final Score: <1-5>' in the answer for image "
                    f"{k}, got {str(a)[:120]!r}"
                )
            scores.append(s / 5.0)
        return torch.tensor(scores, dtype=torch.float32)
