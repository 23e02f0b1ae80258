"""The reward server (train.rewards.serve) on loopback, started in-process on a free port and always shut
down: registry rewards served equal the in-process ones, concurrent requests are coalesced into batches,
bad requests are refused (400), failing rewards answered 500 and surfaced by the client as RewardError
naming the server, and a server killed mid-request (a subprocess, SIGKILL) fails the client in bounded
time."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="the reward server needs the serve extra (starlette)")
pytest.importorskip("uvicorn", reason="the reward server needs the serve extra (uvicorn)")

from train.rewards.client import HttpReward  # noqa: E402
from train.rewards.registry import RewardError, build_reward  # noqa: E402
from train.rewards.serve import create_app, main, registry_reward, serve_in_thread  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
G = torch.Generator().manual_seed(0)
IMAGES = torch.rand(4, 3, 16, 16, generator=G) * 2 - 1
PROMPTS = ["a", "b", "c", "d"]


def _health(url):
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


def _post(url, body: bytes):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_served_registry_rewards_equal_in_process():
    names = ["jpeg_compressibility", "saturation"]
    app = create_app({n: (registry_reward(n, device="cpu", paths={}), "cpu") for n in names}, max_batch=3)
    srv = serve_in_thread(app)
    try:
        for n in names:
            got = HttpReward(f"{srv.url}/{n}", timeout=20, retries=0)(IMAGES, PROMPTS)
            _, comps = build_reward(n, device="cpu")(IMAGES, PROMPTS)
            # the wire's uint8 image is the one jpeg quantises to (identical); saturation reads floats
            atol = 0 if n.startswith("jpeg") else 1 / 255
            torch.testing.assert_close(got, comps[n], atol=atol, rtol=0)
        h = _health(srv.url)
        assert h["rewards"]["saturation"]["device"] == "cpu"
        # 4 images with --max-batch 3: scored in two calls
        assert h["rewards"]["jpeg_compressibility"]["batches"] == 2
        assert h["rewards"]["jpeg_compressibility"]["max_batch_seen"] == 3
    finally:
        srv.stop()


def test_concurrent_requests_are_coalesced_into_batches():
    calls = []

    def fn(images, prompts):
        calls.append(images.shape[0])
        time.sleep(0.05)
        return images.reshape(images.shape[0], -1).mean(1)

    srv = serve_in_thread(create_app({"m": (fn, "cpu")}, max_batch=16, max_wait=0.3))
    try:
        client = HttpReward(f"{srv.url}/m", timeout=10, retries=0, max_in_flight=8)
        out = {}
        imgs = [IMAGES[k : k + 1] for k in range(4)] * 2  # 8 requests of 1 image
        threads = [
            threading.Thread(target=lambda k=k: out.__setitem__(k, client(imgs[k], ["p"]))) for k in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        h = _health(srv.url)["rewards"]["m"]
    finally:
        srv.stop()
    assert len(out) == 8 and h["requests"] == 8 and h["images"] == 8
    assert sum(calls) == 8 and max(calls) >= 4  # several requests in one reward call
    assert h["batches"] == len(calls) < 8
    for k in range(8):  # every request got its own image's value back
        want = float(((imgs[k].clamp(-1, 1) + 1) * 127.5).round().mean())
        assert abs(float(out[k]) - want) < 1e-3


def test_bad_requests_are_refused_and_failing_rewards_reported():
    def nan(images, prompts):
        return np.full(images.shape[0], np.nan)

    def short(images, prompts):
        return np.zeros(images.shape[0] - 1)

    def boom(images, prompts):
        raise RuntimeError("CUDA out of memory")

    srv = serve_in_thread(create_app({"nan": (nan, "cpu"), "short": (short, "cpu"), "boom": (boom, "cpu")}))
    try:
        for name, needle in [
            ("nan", "non-finite"),
            ("short", "expected 4 values"),
            ("boom", "CUDA out of memory"),
        ]:
            with pytest.raises(RewardError, match=rf"{srv.url}/{name}: HTTP 500: .*{needle}"):
                HttpReward(f"{srv.url}/{name}", timeout=5, retries=1, backoff=0.01)(IMAGES, PROMPTS)
        assert _health(srv.url)["rewards"]["boom"]["errors"] == 2  # retried once
        code, ans = _post(f"{srv.url}/nope", b"{}")
        assert code == 404 and "served: nan, short, boom" in ans["error"]
        code, ans = _post(f"{srv.url}/nan", b"garbage")
        assert code == 400
        code, ans = _post(f"{srv.url}/nan", json.dumps({"images": "AAAA", "prompts": []}).encode())
        assert code == 400 and "images" in ans["error"]
    finally:
        srv.stop()


def test_cli_refuses_bad_options_by_name(capsys):
    assert main(["--reward", "nope", "--port", "1"]) == 2
    assert "--reward: expected names from" in capsys.readouterr().err
    assert main(["--reward", "saturation", "--port", "1", "--max-batch", "0"]) == 2
    assert "--max-batch: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["--reward", "saturation", "--port", "1", "--device", "ocr=cpu"]) == 2
    assert (
        "--device: expected DEV or NAME=DEV entries for saturation, got 'ocr=cpu'" in capsys.readouterr().err
    )
    if not torch.cuda.is_available():
        assert main(["--reward", "saturation", "--port", "1", "--device", "cuda:0"]) == 2
        assert "--device: expected a device this machine has, got 'cuda:0'" in capsys.readouterr().err


def test_cli_refuses_an_address_it_cannot_listen_on_before_loading(capsys, monkeypatch):
    import train.rewards.serve as serve

    loaded = []
    monkeypatch.setattr(serve, "registry_reward", lambda *a, **k: loaded.append(a))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--reward", "saturation", "--port", str(port)]) == 2
        assert f"--host/--port: expected an address free to listen on, got 127.0.0.1:{port}" in (
            capsys.readouterr().err
        )
    assert main(["--reward", "saturation", "--port", "8000", "--host", "no-such-host.invalid"]) == 2
    assert "--host: expected an address this machine can listen on, got 'no-such-host.invalid'" in (
        capsys.readouterr().err
    )
    assert loaded == []


SLOW_SERVER = """
import sys, time
import numpy as np
from train.rewards.serve import create_app, _Server
def fn(images, prompts):
    time.sleep(30)
    return np.zeros(images.shape[0])
srv = _Server(create_app({"slow": (fn, "cpu")}), port=0).start()
print(srv.port, flush=True)
srv.thread.join()
"""


def test_server_killed_mid_request_fails_the_client_in_bounded_time():
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}/slow"
        threading.Timer(0.5, lambda: os.kill(proc.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=rf"reward server {url}: .*after 2 attempts"):
            HttpReward(url, timeout=20, retries=1, backoff=0.01)(IMAGES, PROMPTS)
        assert time.monotonic() - t0 < 10  # the kill, not the 20 s timeout, ended it
    finally:
        proc.kill()
        proc.wait(10)


def test_a_bad_request_in_a_coalesced_batch_fails_alone():
    sizes = []

    def fn(images, prompts):
        sizes.append(len(prompts))
        if "bad" in prompts:
            raise ValueError("expected quoted text, got 'bad'")
        return images.reshape(images.shape[0], -1).mean(1)

    srv = serve_in_thread(create_app({"m": (fn, "cpu")}, max_batch=16, max_wait=0.3))
    try:
        client = HttpReward(f"{srv.url}/m", timeout=10, retries=0, max_in_flight=4)
        out = {}

        def call(k):
            try:
                out[k] = client(IMAGES[k : k + 1], ["bad" if k == 2 else "good"])
            except RewardError as e:
                out[k] = e

        threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        h = _health(srv.url)["rewards"]["m"]
    finally:
        srv.stop()
    assert isinstance(out[2], RewardError) and "expected quoted text, got 'bad'" in str(out[2])
    assert all(isinstance(out[k], torch.Tensor) and out[k].shape == (1,) for k in (0, 1, 3))
    assert h["errors"] == 1 and h["images"] == 3
    assert max(sizes) > 1  # the bad request was first scored with others, then alone
