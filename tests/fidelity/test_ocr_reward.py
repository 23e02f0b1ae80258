"""The ocr reward's text score against flow_grpo's, transcribed:
yifan123/flow_grpo@ac4c86e8cae021841f1fde853d340e0db67690dd flow_grpo/ocr.py (``OcrScorer.__call__``: the
quoted target, spaces removed and lower case, 0 distance when the target occurs in the recognised text,
``Levenshtein.distance`` otherwise, capped at the target's length, ``1 - dist / len``).  ``Levenshtein`` is
not a dependency: the transcription's distance is a memoised recursion written here, independent of the
engine's dynamic programme.  The OCR engine itself (RapidOCR) is tested when the ``ocr`` extra is installed.
"""

from functools import lru_cache

import pytest
import torch

from train.rewards.ocr import levenshtein, ocr_reward_from_text, quoted_text


def _distance(a: str, b: str) -> int:
    @lru_cache(maxsize=None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def _flow_grpo_reward(recognized_text: str, prompt: str) -> float:
    """flow_grpo/ocr.py, the body of the per-image loop after OCR (transcribed)."""
    prompt = prompt.split('"')[1]
    recognized_text = recognized_text.replace(" ", "").lower()
    prompt = prompt.replace(" ", "").lower()
    if prompt in recognized_text:
        dist = 0
    else:
        dist = _distance(recognized_text, prompt)
    if dist > len(prompt):
        dist = len(prompt)
    return 1 - dist / (len(prompt))


CASES = [
    ("Hello World", 'New York Skyline with "Hello World" written with fireworks'),
    ("HELLO WORLD!!", 'a sign saying "hello world"'),
    ("Helo Wrld", 'a sign saying "Hello World"'),
    ("", 'a sign saying "Hello"'),
    ("completely unrelated long text here", 'a sign "cat"'),
    ("xxcatxx", 'a sign "cat"'),
    ("cta", 'a sign "cat" and "dog"'),
    ("kitten", 'the word "sitting"'),
    ("Flaw", 'a "lawn" on the "moon"'),
]


@pytest.mark.parametrize("recognized, prompt", CASES)
def test_text_score_matches_flow_grpo(recognized, prompt):
    assert ocr_reward_from_text(recognized, quoted_text(prompt)) == _flow_grpo_reward(recognized, prompt)


def test_levenshtein_matches_the_recursion():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        a = "".join(
            "abc "[int(i)]
            for i in torch.randint(0, 4, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g)
        )
        b = "".join(
            "abc "[int(i)]
            for i in torch.randint(0, 4, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g)
        )
        assert levenshtein(a, b) == _distance(a, b)
    assert levenshtein("kitten", "sitting") == 3


def test_prompt_without_quoted_text_is_refused():
    with pytest.raises(
        ValueError, match="expected a prompt with non-empty \"quoted text\" to render, got 'a cat'"
    ):
        quoted_text("a cat")
    with pytest.raises(ValueError, match="non-empty"):
        quoted_text('a sign " "')


def _render(text: str):
    """A 256x96 white image with black ``text`` in PIL's scalable default font, as [1, 3, H, W] in [-1, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(im).text((10, 25), text, fill="black", font=ImageFont.load_default(size=36))
    x = torch.from_numpy(__import__("numpy").asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x[None]


def test_ocr_engine_reads_rendered_text():
    pytest.importorskip(
        "rapidocr_onnxruntime", reason="the ocr extra (rapidocr-onnxruntime) is not installed"
    )
    from train.rewards.registry import build_reward

    reward = build_reward("ocr")
    images = torch.cat([_render("Hello World"), _render("Hello World"), torch.ones(1, 3, 96, 256)])
    _, comps = reward(images, ['a sign "hello world"', 'a sign "goodbye moon"', 'a sign "hello"'])
    r = comps["ocr"]
    assert r[0] == 1.0  # read exactly (spaces and case ignored)
    assert r[1] < 0.5  # the wrong text
    assert r[2] == 0.0  # a blank image: nothing read, the maximal distance
