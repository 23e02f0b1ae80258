"""Reward server: serves registry rewards over HTTP, batching concurrent requests (math.md §8).

    python -m train.rewards.serve --reward pickscore,ocr --port 8700 --device pickscore=cuda:1,ocr=cpu \
        --reward-paths pickscore=/models/PickScore_v1 --max-batch 32

* ``POST /NAME`` with the wire protocol of :mod:`train.rewards.client` (uint8 ``.npy`` images in base64
  JSON, prompts as text) -> ``{"values": [...]}``; a malformed request is answered 400, a reward that fails
  (raises, wrong count, NaN) 500 with the reward's message.
* ``GET /health`` -> the rewards, their devices, queue depths and counters (requests, images, batches,
  errors) as JSON.

Each reward has its own queue and one worker thread on its own device: requests that arrive within
``--max-wait-ms`` of each other are coalesced into one call of up to ``--max-batch`` images (a larger
request is scored in ``--max-batch`` pieces); requests with a different image size wait for the next
batch.  Built on starlette + uvicorn (``pip install -e ".[serve]"``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

__all__ = ["create_app", "RewardBatcher", "serve_in_thread", "main"]


def _require_stack():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f'the reward server needs starlette and uvicorn ({e.name} is missing): pip install -e ".[serve]"'
        ) from None


class RewardBatcher:
    """One reward's queue: coalesces requests into batches of at most ``max_batch`` images (waiting at most
    ``max_wait`` s for more) and runs ``fn(uint8 [N, H, W, 3], prompts) -> float [N]`` on one worker
    thread."""

    def __init__(self, name: str, fn: Callable, device: str, max_batch: int, max_wait: float):
        self.name, self.fn, self.device = name, fn, device
        self.max_batch, self.max_wait = max_batch, max_wait
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{name}")
        self.queue: asyncio.Queue | None = None
        self.task = None
        self.carry = None  # a request of another image size, first in the next batch
        self.stats = {"requests": 0, "images": 0, "batches": 0, "errors": 0, "max_batch_seen": 0}

    def start(self):
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self):
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    def depth(self) -> int:
        return (self.queue.qsize() if self.queue is not None else 0) + (self.carry is not None)

    async def submit(self, images: np.ndarray, prompts: list[str]) -> list[float]:
        fut = asyncio.get_running_loop().create_future()
        self.stats["requests"] += 1
        await self.queue.put((images, prompts, fut))
        return await fut

    async def _collect(self) -> list:
        first = self.carry if self.carry is not None else await self.queue.get()
        self.carry = None
        batch, n = [first], first[0].shape[0]
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = (
                    self.queue.get_nowait() if left <= 0 else await asyncio.wait_for(self.queue.get(), left)
                )
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if item[0].shape[1:] != first[0].shape[1:] or n + item[0].shape[0] > self.max_batch:
                self.carry = item
                break
            batch.append(item)
            n += item[0].shape[0]
        return batch

    def _score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        out = []
        for s in range(0, images.shape[0], self.max_batch):
            chunk = images[s : s + self.max_batch]
            vals = np.asarray(self.fn(chunk, prompts[s : s + self.max_batch]), dtype=np.float64).reshape(-1)
            if vals.shape[0] != chunk.shape[0]:
                raise RuntimeError(f"expected {chunk.shape[0]} values (one per image), got {vals.shape[0]}")
            if not np.isfinite(vals).all():
                raise RuntimeError(f"{int((~np.isfinite(vals)).sum())} non-finite value(s) (NaN/inf)")
            out.append(vals)
            self.stats["batches"] += 1
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], chunk.shape[0])
        return np.concatenate(out)

    async def _one(self, loop, item):
        images, prompts, fut = item
        try:
            vals = await loop.run_in_executor(self.pool, self._score, images, prompts)
        except Exception as e:
            self.stats["errors"] += 1
            if not fut.done():
                fut.set_exception(RuntimeError(f"reward {self.name!r} failed: {type(e).__name__}: {e}"))
            return
        self.stats["images"] += images.shape[0]
        if not fut.done():
            fut.set_result([float(v) for v in vals])

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            images = np.concatenate([b[0] for b in batch]) if len(batch) > 1 else batch[0][0]
            prompts = [p for b in batch for p in b[1]]
            try:
                vals = await loop.run_in_executor(self.pool, self._score, images, prompts)
            except Exception as e:
                if len(batch) > 1:  # score the requests one by one: only the one at fault fails
                    for item in batch:
                        await self._one(loop, item)
                    continue
                self.stats["errors"] += 1
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(
                            RuntimeError(f"reward {self.name!r} failed: {type(e).__name__}: {e}")
                        )
                continue
            self.stats["images"] += images.shape[0]
            s = 0
            for imgs, _, fut in batch:
                if not fut.done():
                    fut.set_result([float(v) for v in vals[s : s + imgs.shape[0]]])
                s += imgs.shape[0]


def create_app(rewards: dict[str, tuple[Callable, str]], *, max_batch: int = 32, max_wait: float = 0.01):
    """The ASGI app serving ``rewards`` ``{name: (fn, device)}``; ``fn(uint8 [N, H, W, 3], prompts: list[str])
    -> float [N]``."""
    _require_stack()
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from .client import decode_images

    batchers = {n: RewardBatcher(n, fn, dev, max_batch, max_wait) for n, (fn, dev) in rewards.items()}

    @asynccontextmanager
    async def lifespan(_app):
        for b in batchers.values():
            b.start()
        try:
            yield
        finally:
            for b in batchers.values():
                await b.stop()

    async def health(_request: Request):
        return JSONResponse(
            {
                "status": "ok",
                "max_batch": max_batch,
                "max_wait_ms": max_wait * 1e3,
                "rewards": {
                    n: {"device": b.device, "queue": b.depth(), **b.stats} for n, b in batchers.items()
                },
            }
        )

    async def score(request: Request):
        name = request.path_params["name"]
        if name not in batchers:
            return JSONResponse(
                {"error": f"no reward {name!r}; served: {', '.join(batchers)}"}, status_code=404
            )
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict) or "images" not in body or "prompts" not in body:
                raise ValueError("expected a JSON object with 'images' and 'prompts'")
            images = decode_images(body["images"])
            prompts = body["prompts"]
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompts: expected a list of strings")
            if len(prompts) != images.shape[0]:
                raise ValueError(f"prompts: expected {images.shape[0]} (one per image), got {len(prompts)}")
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        try:
            vals = await batchers[name].submit(images, prompts)
        except RuntimeError as e:
            return JSONResponse({"error": str(e)}, status_code=500)
        return JSONResponse({"values": vals})

    app = Starlette(
        routes=[Route("/health", health, methods=["GET"]), Route("/{name}", score, methods=["POST"])],
        lifespan=lifespan,
    )
    app.state.batchers = batchers
    return app


def registry_reward(name: str, *, device: str, paths: dict, clip_path: str | None = None):
    """A registry reward as a server function: uint8 images -> [-1, 1] floats on ``device`` -> values."""
    import torch

    from .registry import build_reward

    reward = build_reward([name], clip_path=clip_path, paths=paths, device=device)
    dev = torch.device(reward_device(device))

    def fn(images: np.ndarray, prompts: list[str]):
        x = torch.from_numpy(images).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            _, comps = reward(x, prompts)
        return comps[name].cpu().numpy()

    return fn


def reward_device(device: str) -> str:
    from .registry import resolve_device

    return resolve_device(device, option="--device")


def check_listen_address(host: str, port: int) -> None:
    """Resolve and bind ``host:port`` once (with ``SO_REUSEADDR``, as uvicorn binds), so that an unknown
    host or a port in use is refused before the rewards load."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(
            f"--host: expected an address this machine can listen on, got {host!r} ({e})"
        ) from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(
                f"--host/--port: expected an address free to listen on, got {host}:{port} ({e.strerror})"
            ) from None


class _Server:
    """A uvicorn server on a socket of its own, run in a thread (tests, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0):
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > timeout or not self.thread.is_alive():
                raise RuntimeError(f"reward server on {self.url} did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0):
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> _Server:
    """Start ``app`` on ``host:port`` (0: a free port) in a daemon thread; ``.url``, ``.stop()``."""
    _require_stack()
    return _Server(app, host, port).start()


def parse_devices(spec: str, names: list[str]) -> dict[str, str]:
    """``--device``: one device for all (``cuda:1``) or ``NAME=DEV`` entries, comma separated (the rest:
    ``auto``)."""
    if "=" not in spec:
        return {n: spec for n in names}
    out = {n: "auto" for n in names}
    for entry in spec.split(","):
        n, sep, d = entry.partition("=")
        if not sep or n.strip() not in out or not d.strip():
            raise ValueError(
                f"--device: expected DEV or NAME=DEV entries for {', '.join(names)}, got {entry!r}"
            )
        out[n.strip()] = d.strip()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="train.rewards.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--reward", required=True, help="reward name(s) to serve, comma separated")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, required=True, help="port to listen on")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda:N, or NAME=DEV,NAME=DEV per reward")
    ap.add_argument("--max-batch", type=int, default=32, help="most images per reward call (default 32)")
    ap.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests"
    )
    ap.add_argument("--reward-paths", nargs="*", default=(), help="NAME=PATH local weights of model rewards")
    ap.add_argument("--reward-clip-path", default=None, help="local CLIP directory for clip_score")
    args = ap.parse_args(argv)
    try:
        _require_stack()
        from .registry import REWARD_NAMES, parse_reward_paths

        names = [n.strip() for n in args.reward.split(",") if n.strip()]
        bad = [n for n in names if n not in REWARD_NAMES]
        if not names or bad:
            raise ValueError(f"--reward: expected names from {', '.join(REWARD_NAMES)}, got {args.reward!r}")
        if not 1 <= args.port <= 65535:
            raise ValueError(f"--port: expected 1..65535, got {args.port}")
        if args.max_batch < 1:
            raise ValueError(f"--max-batch: expected an integer >= 1, got {args.max_batch}")
        if not (args.max_wait_ms >= 0 and math.isfinite(args.max_wait_ms)):
            raise ValueError(f"--max-wait-ms: expected milliseconds >= 0, got {args.max_wait_ms}")
        devices = parse_devices(args.device, names)
        paths = parse_reward_paths(args.reward_paths)
        check_listen_address(args.host, args.port)
        rewards = {}
        for n in names:
            dev = reward_device(devices[n])
            rewards[n] = (registry_reward(n, device=dev, paths=paths, clip_path=args.reward_clip_path), dev)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(rewards, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1e3)
    print(
        f"serving {', '.join(f'{n} ({d})' for n, (_, d) in rewards.items())} on http://{args.host}:{args.port}",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
