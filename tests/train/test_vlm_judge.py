"""The vlm_judge reward against a loopback fake of an OpenAI-compatible chat-completions server (the protocol
vLLM and SGLang serve): the request carries flow_grpo's UnifiedReward question, the 512x512 PNG data URL and
temperature 0; the answer's 'Final Score: s' becomes s / 5; an answer without one, or not a chat completion,
is a RewardError naming the endpoint."""

import base64
import io

import pytest
import torch
from PIL import Image

from train.rewards.registry import RewardError, build_reward
from train.rewards.vlm import QUESTION, parse_score

from ._http_fakes import FakeServer

IMAGES = torch.linspace(-1, 1, 3 * 3 * 32 * 24).reshape(3, 3, 32, 24)
CAPTIONS = ["a red cube", "two blue balls", "a cat"]


def _judge(scores, seen):
    def h(n, body):
        seen.append(body)
        caption = body["messages"][0]["content"][1]["text"].split("Text Caption: [")[1][:-1]
        return 200, {"choices": [{"message": {"role": "assistant", "content": scores[caption]}}]}

    return h


def test_scores_are_parsed_and_divided_by_five():
    seen = []
    answers = {
        "a red cube": "The cube is red.\nFinal Score: 4",
        "two blue balls": "element (object): 1\nFinal Score: 2.5 out of 5",
        "a cat": "Final Score:5",
    }
    with FakeServer(_judge(answers, seen)) as s:
        reward = build_reward("vlm_judge", paths=[f"vlm_judge={s.url}/v1"], vlm_model="judge-x", timeout=5)
        _, comps = reward(IMAGES, CAPTIONS)
    torch.testing.assert_close(comps["vlm_judge"], torch.tensor([0.8, 0.5, 1.0]))
    assert len(seen) == 3
    body = next(b for b in seen if "a red cube" in b["messages"][0]["content"][1]["text"])
    assert body["model"] == "judge-x" and body["temperature"] == 0
    img, txt = body["messages"][0]["content"]
    assert txt == {"type": "text", "text": QUESTION.format(prompt="a red cube")}
    url = img["image_url"]["url"]
    assert img["type"] == "image_url" and url.startswith("data:image;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert png.format == "PNG" and png.size == (512, 512)


def test_unparsable_answer_is_an_error_not_a_zero():
    with FakeServer(_judge({c: "I cannot judge this image." for c in CAPTIONS}, [])) as s:
        reward = build_reward("vlm_judge", paths=[f"vlm_judge={s.url}/v1"], timeout=5)
        with pytest.raises(
            RewardError, match=rf"vlm judge {s.url}/v1/chat/completions: expected 'Final Score"
        ):
            reward(IMAGES, CAPTIONS)
    with FakeServer(lambda n, b: (200, {"error": "model not loaded"})) as s:
        reward = build_reward("vlm_judge", paths=[f"vlm_judge={s.url}/v1"], timeout=5)
        with pytest.raises(RewardError, match="expected a chat completion"):
            reward(IMAGES, CAPTIONS)
    with FakeServer(lambda n, b: (503, {"error": "overloaded"})) as s:
        reward = build_reward("vlm_judge", paths=[f"vlm_judge={s.url}/v1"], timeout=5, retries=1)
        with pytest.raises(RewardError, match=rf"{s.url}/v1/chat/completions: HTTP 503"):
            reward(IMAGES[:1], CAPTIONS[:1])


def test_parse_score_follows_unifiedreward():
    assert parse_score("blah Final Score: 3.75") == 3.75
    assert parse_score("Final Score: 7") is None  # outside 1..5
    assert parse_score("final score: 3") is None
    assert parse_score("Final Score: 2 ... Final Score: 4") == 2.0


def test_missing_endpoint_is_refused_by_option():
    with pytest.raises(ValueError, match="--reward-paths: expected vlm_judge=http://HOST:PORT/v1"):
        build_reward("vlm_judge")
    with pytest.raises(
        ValueError, match="--reward-paths: expected vlm_judge=http://HOST:PORT/v1, got vlm_judge=/x"
    ):
        build_reward("vlm_judge", paths=["vlm_judge=/x"])
