"""Rule-based CPU rewards in worker processes, off the training process's GIL (``--reward-workers N``).

The loops submit rewards to a thread; a pure-Python/NumPy reward (JPEG sizes, GenEval-mini's colour
components, OCR) then holds the GIL while the rollouts run.  :class:`ProcessPoolReward` instead splits each
batch into ``N`` contiguous pieces scored by ``N`` worker processes (forked from a forkserver that imported
torch once -- no CUDA, no threads in it -- each builds the reward once)
and concatenates their values; the calling thread only waits.

Values are identical to the in-process reward: the rewards whose first step is the uint8 quantisation of
``train.rewards.basic.to_uint8`` (``UINT8_REWARDS``) are sent that uint8 image (4x fewer bytes; the worker's
``u / 127.5 - 1`` quantises back to the same bytes), the others (GenEval-mini reads float colours) the
float32 images as they are; every reward here scores each image on its own, so the split changes nothing.

As with any ``multiprocessing`` start method but fork, a script that builds such a reward must guard its
entry point with ``if __name__ == "__main__":`` (the worker processes import the main module); the
``python -m train.*`` commands do.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np
import torch

__all__ = ["ProcessPoolReward", "CPU_REWARDS", "UINT8_REWARDS"]

UINT8_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility", "ocr")
CPU_REWARDS = UINT8_REWARDS + ("geneval_mini", "geneval_mini_partial")

_WORKER_REWARD = None


def _init(name: str, opts: dict):
    global _WORKER_REWARD
    from .registry import _FACTORIES

    torch.set_num_threads(1)
    _WORKER_REWARD = _FACTORIES[name](opts)


def _score(images: np.ndarray, prompts: list) -> np.ndarray:
    if images.dtype == np.uint8:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    else:
        x = torch.from_numpy(images)
    with torch.no_grad():
        return torch.as_tensor(_WORKER_REWARD(x, prompts)).float().reshape(-1).numpy()


class ProcessPoolReward:
    """A CPU reward of the registry (``CPU_REWARDS``) computed in ``workers`` processes."""

    differentiable = False

    def __init__(self, name: str, opts: dict, workers: int):
        if name not in CPU_REWARDS:
            raise ValueError(
                f"--reward-workers: expected rule-based CPU rewards ({', '.join(CPU_REWARDS)}), got {name!r}"
            )
        if workers < 1:
            raise ValueError(f"--reward-workers: expected an integer >= 1, got {workers}")
        self.name, self.workers = name, workers
        ctx = mp.get_context("forkserver")  # one clean server process imports torch once, then forks workers
        ctx.set_forkserver_preload(["train.rewards.workers", "train.rewards.registry"])
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(name, opts))

    def __call__(self, images: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        if self.name in UINT8_REWARDS:
            from .basic import to_uint8

            arr = to_uint8(images)
        else:
            arr = images.detach().float().cpu().numpy()
        prompts = list(prompts)
        bounds = np.linspace(0, arr.shape[0], min(self.workers, arr.shape[0]) + 1).round().astype(int)
        futs = [
            self.pool.submit(_score, arr[a:b], prompts[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.from_numpy(np.concatenate([f.result() for f in futs]))

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
