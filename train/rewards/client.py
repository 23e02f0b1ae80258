"""HTTP rewards: a reward computed by a server (``python -m train.rewards.serve``), math.md §8.

``--reward http://HOST:PORT/NAME`` builds an :class:`HttpReward`.  It sends the batch to the server and
returns one value per image; a slow, dead or misbehaving server raises :class:`RewardError` naming the
server's URL (the training loop then writes a checkpoint and stops) -- never a silent zero.

Wire protocol (version 1), one JSON object each way:

* request ``POST /NAME``: ``{"prompts": [str, ...], "images": BASE64}`` where ``BASE64`` is the base64 of
  the ``.npy`` bytes (``numpy.save``, no pickle) of a ``uint8 [B, H, W, 3]`` array.  Float images in
  [-1, 1] are quantised with ``round((x + 1) * 127.5)`` -- the same uint8 image every reward model reads
  (the model rewards quantise to uint8 before their own preprocessing); the server maps it back with
  ``u / 127.5 - 1``, which a reward's own quantisation turns into the same bytes.
* response 200: ``{"values": [float, ...]}`` (B finite floats); 4xx: the request was refused (not retried);
  5xx: the reward failed on the server (``{"error": message}``, retried).

The client is thread-safe; it bounds the requests in flight (backpressure: a caller waits for a slot at
most one request's time budget), times each request out, and retries connection errors, timeouts and 5xx
answers with exponential backoff before it gives up.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np

from .registry import RewardError

__all__ = ["HttpReward", "encode_images", "decode_images", "prompt_text", "post_json", "HttpError"]


def encode_images(images) -> str:
    """``[B, 3, H, W]`` float in [-1, 1] (a torch tensor) or ``uint8 [B, H, W, 3]`` (numpy) -> the wire's
    base64 ``.npy`` string."""
    if isinstance(images, np.ndarray):
        arr = images
    else:
        from .basic import to_uint8

        arr = to_uint8(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [B, H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_images(data: str) -> np.ndarray:
    """The wire's base64 ``.npy`` string -> ``uint8 [B, H, W, 3]``; anything else raises ValueError."""
    try:
        arr = np.load(io.BytesIO(base64.b64decode(data, validate=True)), allow_pickle=False)
    except Exception as e:
        raise ValueError(f"images: expected base64 .npy bytes, got undecodable data ({e})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(
            f"images: expected uint8 [B, H, W, 3] with B >= 1, got {arr.dtype} {tuple(arr.shape)}"
        )
    return arr


def prompt_text(p) -> str:
    """A prompt as text: strings as they are, structured prompts (GenEval-mini) by their ``text``."""
    return p if isinstance(p, str) else str(getattr(p, "text", p))


class HttpError(Exception):
    """One failed attempt; ``retry`` says whether another attempt may succeed."""

    def __init__(self, msg: str, retry: bool):
        super().__init__(msg)
        self.retry = retry


def _attempt(url: str, body: bytes, timeout: float, headers: dict) -> dict:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        try:
            detail = e.read()[:300].decode("utf-8", "replace")
        except Exception:
            detail = ""
        raise HttpError(f"HTTP {e.code}: {detail}", retry=e.code >= 500) from None
    except (TimeoutError, socket.timeout):
        raise HttpError(f"no answer within --reward-timeout {timeout:g} s", retry=True) from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise HttpError(f"no answer within --reward-timeout {timeout:g} s", retry=True) from None
        raise HttpError(f"connection failed ({reason})", retry=True) from None
    except (ConnectionError, OSError, http.client.HTTPException) as e:  # reset / closed mid-request
        raise HttpError(f"connection lost mid-request ({type(e).__name__}: {e})", retry=True) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise HttpError(f"expected a JSON answer, got {raw[:80]!r}", retry=False) from None


def post_json(
    url: str,
    payload: dict,
    *,
    timeout: float,
    retries: int,
    backoff: float = 0.25,
    headers: dict | None = None,
    what: str = "reward server",
) -> dict:
    """POST ``payload`` as JSON with ``retries`` more attempts (exponential backoff from ``backoff`` s) on
    connection errors, timeouts and 5xx answers; -> the decoded JSON answer.  Gives up with
    :class:`RewardError` naming ``url``."""
    body = json.dumps(payload).encode("utf-8")
    errors = []
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            return _attempt(url, body, timeout, headers or {})
        except HttpError as e:
            errors.append(str(e))
            if not e.retry:
                break
    n = len(errors)
    raise RewardError(f"{what} {url}: {errors[-1]} (after {n} attempt{'s' if n > 1 else ''})")


def check_http_options(timeout: float, retries: int, max_in_flight: int) -> None:
    """``--reward-timeout``, ``--reward-retries`` and ``--reward-max-in-flight``, refused by name."""
    if not (0 < timeout < float("inf")):
        raise ValueError(f"--reward-timeout: expected seconds > 0, got {timeout}")
    if retries < 0:
        raise ValueError(f"--reward-retries: expected an integer >= 0, got {retries}")
    if max_in_flight < 1:
        raise ValueError(f"--reward-max-in-flight: expected an integer >= 1, got {max_in_flight}")


class HttpReward:
    """A reward served over HTTP (math.md §8): ``(images [B, 3, H, W] in [-1, 1], prompts) -> float32 [B]``.

    ``timeout`` (s) bounds each attempt, ``retries`` further attempts follow a connection error, timeout or
    5xx, ``max_in_flight`` requests at most are open at once (more callers wait for a slot)."""

    differentiable = False

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        retries: int = 2,
        max_in_flight: int = 2,
        backoff: float = 0.25,
    ):
        if (
            not url.startswith(("http://", "https://"))
            or len(url.split("/", 3)) < 4
            or not url.split("/", 3)[3]
        ):
            raise ValueError(f"--reward: expected http://HOST:PORT/NAME for an HTTP reward, got {url!r}")
        check_http_options(timeout, retries, max_in_flight)
        self.url, self.name = url, url
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_in_flight = int(max_in_flight)
        self._slots = threading.BoundedSemaphore(self.max_in_flight)

    def budget(self) -> float:
        """The longest one call may take: every attempt timing out, plus the backoff between them."""
        return self.timeout * (self.retries + 1) + sum(self.backoff * 2**k for k in range(self.retries))

    def __call__(self, images, prompts: Sequence) -> "torch.Tensor":  # noqa: F821
        import torch

        b = int(images.shape[0])
        if len(prompts) != b:
            raise ValueError(
                f"HTTP reward {self.url}: expected one prompt per image ({b}), got {len(prompts)}"
            )
        payload = {"prompts": [prompt_text(p) for p in prompts], "images": encode_images(images)}
        if not self._slots.acquire(timeout=self.budget()):
            raise RewardError(
                f"reward server {self.url}: {self.max_in_flight} request(s) still in flight after "
                f"{self.budget():.0f} s (--reward-max-in-flight {self.max_in_flight})"
            )
        try:
            ans = post_json(
                self.url, payload, timeout=self.timeout, retries=self.retries, backoff=self.backoff
            )
        finally:
            self._slots.release()
        vals = ans.get("values") if isinstance(ans, dict) else None
        if not isinstance(vals, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals
        ):
            raise RewardError(
                f"reward server {self.url}: expected {{'values': [float x {b}]}}, got {json.dumps(ans)[:120]}"
            )
        if len(vals) != b:
            raise RewardError(
                f"reward server {self.url}: expected {b} values (one per image), got {len(vals)}"
            )
        bad = sum(not math.isfinite(v) for v in vals)
        if bad:
            raise RewardError(f"reward server {self.url}: returned {bad} non-finite value(s) for {b} images")
        return torch.tensor(vals, dtype=torch.float32)
