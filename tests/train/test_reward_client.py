"""The HTTP client reward (train.rewards.client): a slow, dead or misbehaving server raises RewardError naming
the server's URL within a bounded time, never a silent zero; retries, backpressure and the wire format.
Loopback servers only (tests/train/_http_fakes.py)."""

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch

from train.rewards.client import HttpReward, decode_images, encode_images
from train.rewards.registry import RewardError, build_reward

from ._http_fakes import FakeServer

IMAGES = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
PROMPTS = ["a red cube", "two blue balls"]


def _mean_of(body):
    """A well-behaved server: the mean of each decoded uint8 image."""
    arr = decode_images(body["images"])
    return 200, {"values": [float(a.mean()) for a in arr]}


def _client(url, **kw):
    kw.setdefault("timeout", 2.0)
    kw.setdefault("retries", 1)
    kw.setdefault("backoff", 0.01)
    return HttpReward(url + "/r", **kw)


def test_wire_round_trip_is_the_uint8_quantisation():
    arr = decode_images(encode_images(IMAGES))
    want = ((IMAGES.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert arr.dtype == np.uint8 and np.array_equal(arr, want)
    # what the server hands a reward, quantised again, is the same bytes
    back = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert np.array_equal(decode_images(encode_images(back)), arr)
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 \[B, H, W, 3\]"):
        decode_images(base64.b64encode(buf.getvalue()).decode())
    with pytest.raises(ValueError, match="undecodable"):
        decode_images("not base64 !!")


def test_normal_server_values_and_prompts():
    seen = []

    def h(n, body):
        seen.append(body["prompts"])
        return _mean_of(body)

    with FakeServer(h) as s:
        vals = _client(s.url)(IMAGES, PROMPTS)
    want = torch.tensor([float(a.mean()) for a in decode_images(encode_images(IMAGES))])
    assert vals.dtype == torch.float32 and torch.allclose(vals, want)
    assert seen == [PROMPTS]


def test_registry_builds_an_http_reward_from_a_url():
    with FakeServer(lambda n, b: _mean_of(b)) as s:
        reward = build_reward(f"{s.url}/mean,saturation", timeout=3, retries=0)
        total, comps = reward(IMAGES, PROMPTS)
    assert set(comps) == {f"{s.url}/mean", "saturation"} and total.shape == (2,)
    for kw, needle in [
        ({"timeout": 0}, "--reward-timeout: expected seconds > 0, got 0"),
        ({"retries": -1}, "--reward-retries: expected an integer >= 0, got -1"),
        ({"max_in_flight": 0}, "--reward-max-in-flight: expected an integer >= 1, got 0"),
    ]:  # refused before any work, whichever rewards are named
        with pytest.raises(ValueError, match=needle):
            build_reward("saturation", **kw)
    with pytest.raises(
        ValueError, match=r"--reward: expected http://HOST:PORT/NAME .* got 'http://127.0.0.1:1/'"
    ):
        build_reward("http://127.0.0.1:1/")


def test_slow_server_times_out_naming_the_server():
    with FakeServer(lambda n, b: (time.sleep(3), _mean_of(b))[1]) as s:
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=rf"{s.url}/r: no answer within --reward-timeout 0.3 s"):
            _client(s.url, timeout=0.3, retries=1)(IMAGES, PROMPTS)
        assert time.monotonic() - t0 < 2.0  # two attempts of 0.3 s, not the server's 3 s
        assert s.count == 2


def test_server_killed_mid_request():
    with FakeServer(lambda n, b: "drop") as s:
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=rf"reward server {s.url}/r: .*after 3 attempts") as e:
            _client(s.url, retries=2)(IMAGES, PROMPTS)
        assert time.monotonic() - t0 < 5.0
    assert s.count == 1  # the retries found nobody listening
    assert "connection" in str(e.value)


def test_dead_server_is_a_reward_error():
    with FakeServer(lambda n, b: _mean_of(b)) as s:
        url = s.url
    with pytest.raises(RewardError, match=rf"{url}/r: connection failed"):
        _client(url, retries=1)(IMAGES, PROMPTS)


def test_5xx_is_retried_then_reported():
    with FakeServer(lambda n, b: (503, {"error": "busy"}) if n < 2 else _mean_of(b)) as s:
        vals = _client(s.url, retries=2)(IMAGES, PROMPTS)
        assert s.count == 3 and vals.shape == (2,)
    with FakeServer(lambda n, b: (500, {"error": "reward 'x' failed: CUDA out of memory"})) as s:
        with pytest.raises(
            RewardError, match=rf"{s.url}/r: HTTP 500: .*CUDA out of memory.*after 2 attempts"
        ):
            _client(s.url, retries=1)(IMAGES, PROMPTS)
        assert s.count == 2


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({"values": [1.0]}, "expected 2 values .one per image., got 1"),
        ({"values": [1.0, float("nan")]}, "returned 1 non-finite value"),
        ({"values": [1.0, "x"]}, "expected {'values': \\[float x 2\\]}"),
        ({"vals": [1.0, 2.0]}, "expected {'values': \\[float x 2\\]}"),
        (b"<html>oops</html>", "expected a JSON answer"),
    ],
)
def test_misbehaving_server_is_refused_not_zeroed(payload, needle):
    with FakeServer(lambda n, b: (200, payload)) as s:
        with pytest.raises(RewardError, match=needle) as e:
            _client(s.url, retries=3)(IMAGES, PROMPTS)
        assert s.url in str(e.value)
        assert s.count == 1  # a wrong answer is not retried


def test_4xx_is_not_retried():
    with FakeServer(lambda n, b: (400, {"error": "prompts: expected a list of strings"})) as s:
        with pytest.raises(RewardError, match="HTTP 400: .*expected a list of strings"):
            _client(s.url, retries=3)(IMAGES, PROMPTS)
        assert s.count == 1


def test_backpressure_bounds_requests_in_flight():
    with FakeServer(lambda n, b: (time.sleep(0.15), _mean_of(b))[1]) as s:
        client = _client(s.url, max_in_flight=2)
        out, threads = (
            [],
            [threading.Thread(target=lambda: out.append(client(IMAGES, PROMPTS))) for _ in range(6)],
        )
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(out) == 6 and s.count == 6
        assert s.max_in_flight == 2


def test_training_stops_with_a_checkpoint_when_the_server_fails(tmp_path, capsys):
    """train.nft on the embedded default (tiny: 4 reward requests per iteration) with an HTTP reward whose
    server answers 500 from iteration 2 on: exit 1, the message names the server, iteration 1's checkpoint
    is on disk, and the run ends instead of hanging."""
    import train.nft as nft

    from .test_reliability import TINY

    rollouts = []  # the evaluation also scores its held-out samples (6 per request); rollouts send 2

    def h(n, body):
        images = decode_images(body["images"])
        if len(images) == 2:
            rollouts.append(n)
            if len(rollouts) > 4:
                return 500, {"error": "reward 'pickscore' failed: CUDA out of memory"}
        return 200, {"values": [float(a.mean()) / 255 for a in images]}

    run = tmp_path / "run"
    with FakeServer(h) as s:
        argv = ["--max-iters", "3", "--run-dir", str(run), "--reward", f"{s.url}/mean"]
        rc = nft.main(TINY + argv + ["--reward-retries", "1", "--reward-timeout", "10"])
        # 4 rollout requests answered; then iteration 2's 4 try twice at most (the loop cancels queued ones)
        assert 6 <= len(rollouts) <= 12
    err = capsys.readouterr().err
    assert rc == 1
    assert f"reward server {s.url}/mean: HTTP 500" in err and "CUDA out of memory" in err
    assert "Checkpoint of iteration 1 written to" in err
    assert (run / "checkpoints" / "iter_000001.pt").exists()


def test_server_without_its_stack_names_the_extra(monkeypatch, capsys):
    from train.rewards.serve import main

    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # as if not installed
    assert main(["--reward", "saturation", "--port", "8700"]) == 2
    err = capsys.readouterr().err
    assert "needs starlette and uvicorn (uvicorn is missing)" in err and 'pip install -e ".[serve]"' in err


def test_a_served_gold_reward_is_logged_beside_the_training_reward(tmp_path):
    """--eval.rewards takes a reward server's URL as a gold reward (the README's served-gold recipe)."""
    import json

    import train.nft as nft

    from .test_reliability import TINY

    with FakeServer(lambda n, b: _mean_of(b)) as s:
        gold = f"{s.url}/brightness"
        run = tmp_path / "run"
        argv = ["--max-iters", "1", "--run-dir", str(run), "--reward", "saturation", "--eval.rewards", gold]
        assert nft.main(TINY + argv) == 0
        assert s.count >= 2  # iteration 0 and the last evaluation
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r[f"eval/gold/{gold}"] for r in rows if f"eval/gold/{gold}" in r]
    assert len(vals) == 2 and all(0 < v < 255 for v in vals)
