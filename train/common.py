"""Pieces every training loop shares: run directory, metrics, atomic checkpoints, RNG, interrupts, memory.

Nothing here is algorithm specific; ``train.nft`` (and the policy-gradient loops) read top to bottom and
call into this module for the plumbing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "prepare_run_dir",
    "MetricsLogger",
    "atomic_save",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "derive_seed",
    "iteration_generator",
    "rng_state",
    "set_rng_state",
    "GracefulInterrupt",
    "peak_memory_mb",
    "TrainingStopped",
]


class TrainingStopped(RuntimeError):
    """Raised to stop a run on a condition the user must see (a failing reward, NaN loss)."""


# ------------------------------------------------------------------------------------------------------------
# Run directory
# ------------------------------------------------------------------------------------------------------------
def prepare_run_dir(run_dir: str | None, *, algo: str, resume: str | None = None) -> Path:
    """Create (or, on resume, reuse) the run directory and check it is writable before any work starts."""
    if resume:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--resume: expected an existing run directory, got {resume!r} (not a directory)"
            )
        if latest_checkpoint(path) is None:
            raise FileNotFoundError(
                f"--resume: expected a checkpoint under {path / 'checkpoints'}, found none"
            )
    elif run_dir:
        path = Path(run_dir)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{algo}-{stamp}"
    try:
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        (path / "samples").mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"--run-dir: expected a writable directory, got {str(path)!r} ({e.strerror})"
        ) from None
    return path


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------
class MetricsLogger:
    """``metrics.jsonl`` (one JSON object per line, always with ``iteration`` and ``elapsed_s``) plus optional
    TensorBoard / wandb (``wandb`` runs in offline mode unless ``WANDB_MODE`` says otherwise)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        loggers: tuple[str, ...] = (),
        config: dict | None = None,
        resume_iteration: int | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_iteration is not None and self.path.exists():
            # Drop lines past the checkpoint: the resumed run logs them again.
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["iteration"] <= resume_iteration
            ]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        self._wandb = None
        for name in loggers:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ImportError(
                        "--log.loggers tensorboard: expected tensorboard installed (pip install '.[log]')"
                    ) from e
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError as e:
                    raise ImportError(
                        "--log.loggers wandb: expected wandb installed (pip install '.[log]')"
                    ) from e
                os.environ.setdefault("WANDB_MODE", "offline")
                self._wandb = wandb.init(dir=str(run_dir), config=config or {}, resume="allow")
            elif name:
                raise ValueError(f"--log.loggers: expected tensorboard and/or wandb, got {name!r}")

    def log(self, iteration: int, elapsed_s: float, values: dict[str, Any]) -> None:
        rec = {"iteration": int(iteration), "elapsed_s": round(float(elapsed_s), 3)}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().item()
            if isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool):
                v = float(v)
                v = v if math.isfinite(v) else None  # strict JSON has no NaN / Infinity
            rec[k] = v
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        numeric = {k: v for k, v in rec.items() if isinstance(v, float) and k not in ("iteration",)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, iteration)
        if self._wandb is not None:
            self._wandb.log(numeric, step=iteration)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file in the same directory, fsynced, then renamed into place.
# ------------------------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves a half-written file at ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _checkpoints(ckdir: Path) -> list[Path]:
    """``iter_XXXXXX.pt`` files and ``iter_XXXXXX.dcp`` directories (FSDP2), oldest first."""
    return sorted(list(ckdir.glob("iter_*.pt")) + list(ckdir.glob("iter_*.dcp")), key=lambda p: p.stem)


def _prune(ckdir: Path, current: Path, keep: int) -> None:
    for p in _checkpoints(ckdir)[:-keep] if keep > 0 else []:
        if p != current:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, iteration: int, state: dict, *, keep: int = 2) -> Path:
    """Write ``checkpoints/iter_XXXXXX.pt`` atomically, then point ``latest`` at it; keep the newest
    ``keep``."""
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"iter_{iteration:06d}.pt"
    atomic_save(state, path)
    atomic_write_text(ckdir / "latest", path.name)
    _prune(ckdir, path, keep)
    return path


def save_sharded_checkpoint(
    run_dir: Path, iteration: int, sharded: dict, meta: dict, *, is_main: bool, barrier, keep: int = 2
) -> Path:
    """FSDP2: every rank writes its shards of ``sharded`` with ``torch.distributed.checkpoint`` into a hidden
    temporary directory; rank 0 adds ``meta.pt`` (counters, RNG, config) and renames the directory into place
    as ``iter_XXXXXX.dcp`` only when every rank has finished, then moves ``latest``: a crash at any point
    leaves the previous checkpoint as the latest whole one."""
    import torch.distributed.checkpoint as dcp

    ckdir = Path(run_dir) / "checkpoints"
    final = ckdir / f"iter_{iteration:06d}.dcp"
    tmp = ckdir / f".iter_{iteration:06d}.dcp.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(sharded, checkpoint_id=str(tmp))
    barrier()
    if is_main:
        atomic_save(meta, tmp / "meta.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(ckdir / "latest", final.name)
        _prune(ckdir, final, keep)
    barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckdir = Path(run_dir) / "checkpoints"
    pointer = ckdir / "latest"
    if pointer.exists():
        p = ckdir / pointer.read_text().strip()
        if p.exists():
            return p
    cands = _checkpoints(ckdir)
    return cands[-1] if cands else None


def load_checkpoint(run_dir: Path) -> dict:
    """The latest checkpoint: a ``.pt`` state dict, or for an FSDP2 ``.dcp`` directory
    ``{"meta": ..., "dcp_path": ...}`` (the shards are loaded in place by the trainer)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(
            f"--resume: expected a checkpoint under {Path(run_dir) / 'checkpoints'}, found none"
        )
    if path.is_dir():
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
        return {"meta": meta, "dcp_path": path}
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------------------------
# Randomness: every iteration draws from generators derived from (seed, iteration, purpose), so a resumed run
# replays exactly what an uninterrupted one would have drawn.
# ------------------------------------------------------------------------------------------------------------
def derive_seed(*parts: Any) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def iteration_generator(seed: int, iteration: int, purpose: str, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, iteration, purpose))
    return g


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------------
# Ctrl-C: the first one asks the loop to finish the iteration, checkpoint and exit; a second one aborts at
# once (the previous checkpoint stays valid because checkpoints are atomic).
# ------------------------------------------------------------------------------------------------------------
class GracefulInterrupt:
    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ninterrupt: finishing this iteration, writing a checkpoint, then exiting "
            "(Ctrl-C again to abort now)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: the CUDA allocator's peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Stopwatch:
    """Wall-clock since start, continuing across a resume (``offset`` = elapsed time already spent)."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.t0


class NullMetricsLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the reduced metrics once)."""

    def log(self, iteration: int, elapsed_s: float, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
