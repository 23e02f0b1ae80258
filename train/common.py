"""Pieces every training loop shares: run directory, metrics, atomic checkpoints, RNG, interrupts, memory.

Nothing here is algorithm specific; ``train.nft`` (and the policy-gradient loops) read top to bottom and
call into this module for the plumbing.

What a run directory guarantees:

* **one owner**: :func:`open_run_dir` takes an exclusive ``flock`` on ``<run>/.lock`` for the whole run (the
  kernel drops it when the process ends, however it ends); the file records pid, host and start time, so a
  second writer is refused by name, and a lock left by a killed run is reported when it is taken over;
* **atomic, checksummed checkpoints**: every file is written to a temporary file in the same directory,
  fsynced and renamed into place; a checkpoint's SHA-256 (``iter_XXXXXX.pt.sha256``, ``sha256sum`` format;
  ``checksums.sha256`` inside an FSDP ``.dcp`` directory) is written before the checkpoint appears and is
  verified on load: a damaged checkpoint is reported by path and the newest intact one is used;
* **metrics that survive a crash**: ``metrics.jsonl`` is fsynced before each checkpoint; on resume the rows
  after the checkpoint, and a half-written last line, are dropped (with a word);
* **I/O errors** surface as one :class:`WriteError` sentence naming the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "prepare_run_dir",
    "open_run_dir",
    "check_new_run_dir",
    "RunLock",
    "RunDirBusy",
    "MetricsLogger",
    "atomic_save",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "latest_checkpoint",
    "intact_checkpoint",
    "intact_note",
    "CheckpointError",
    "WriteError",
    "derive_seed",
    "iteration_generator",
    "rng_state",
    "set_rng_state",
    "GracefulInterrupt",
    "Aborted",
    "Interrupted",
    "INTERRUPTED_EXIT",
    "IterationAbandoned",
    "peak_memory_mb",
    "TrainingStopped",
]


class TrainingStopped(RuntimeError):
    """Raised to stop a run on a condition the user must see (a failing reward, NaN loss)."""


class CheckpointError(FileNotFoundError):
    """No intact checkpoint to resume from (every candidate is reported by path)."""


class RunDirBusy(RuntimeError):
    """Another live process owns the run directory."""


class WriteError(OSError):
    """Writing a run file failed (disk full, I/O error, file too large, permissions): names the file."""

    def __init__(self, path, cause: BaseException):
        self.path, self.cause = Path(path), cause
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        super().__init__(getattr(cause, "errno", None) or errno.EIO, reason, str(path))

    def __str__(self) -> str:
        return f"writing {self.path} failed: {self.strerror}"


def _os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc`` (``torch.save`` wraps a failed write in a ``RuntimeError``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Run directory: one owner (an flock held for the whole run), created or reused before any work starts
# ------------------------------------------------------------------------------------------------------------
LOCK_NAME = ".lock"
# What a run writes at the top of its directory; ``--overwrite`` removes exactly these.
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "checkpoints", "samples", "tb", "wandb", "lora", "lora_ema")
_RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints")


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock`` (pid, host and start time written into it).

    The kernel releases an ``flock`` when its process ends, even on SIGKILL; :meth:`release` also empties the
    file, so a non-empty lock file that can be taken is the trace of a run that died holding it."""

    def __init__(self, run_dir: Path, *, report: Callable[[str], None] = _warn):
        self.path = Path(run_dir) / LOCK_NAME
        self._fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read()
            self._fh.close()
            self._fh = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(
                    f"--run-dir: expected a run directory no other run is writing to, got {run_dir}, "
                    f"locked by {holder or 'another process'} ({self.path}); wait for it to end or stop it"
                ) from None
            report(f"warning: cannot lock {self.path} ({e.strerror}): nothing stops a second writer here")
            return
        stale = self._read()
        if stale:
            report(
                f"note: {self.path} records a run that ended without releasing it ({stale}); "
                f"it no longer holds the directory, taking it over"
            )
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(
            f"pid {os.getpid()} on host {socket.gethostname()}, started "
            f"{_dt.datetime.now().isoformat(timespec='seconds')}\n"
        )
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _read(self) -> str:
        try:
            self._fh.seek(0)
            return self._fh.read().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fh is None:
            return
        with contextlib.suppress(OSError):
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.flush()
        with contextlib.suppress(OSError):
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def default_run_dir(algo: str) -> Path:
    """``runs/<algo>-<timestamp>`` (with ``-2``, ``-3`` ... when a run started in the same second)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / f"{algo}-{stamp}", 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{algo}-{stamp}-{n}"
    return path


def check_new_run_dir(run_dir: str | Path, *, overwrite: bool = False) -> None:
    """A new run goes into a new (or empty) directory: one that already holds a run (``config.json``,
    ``metrics.jsonl`` or ``checkpoints/``) is refused, unless ``overwrite``."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise PermissionError(f"--run-dir: expected a writable directory, got {str(path)!r} (a file)")
    found = [m for m in _RUN_MARKERS if (path / m).exists()]
    if found and not overwrite:
        raise FileExistsError(
            f"--run-dir: expected a new or empty directory, got {path}, which holds a run "
            f"({', '.join(found)}); "
            f"continue it with --resume {path}, or start over in it with --overwrite (deletes its "
            f"checkpoints, metrics and samples)"
        )


def _clear_run_outputs(path: Path) -> None:
    for name in RUN_OUTPUTS:
        p = path / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


_TMP_RE = re.compile(r"^\..+\.tmp$")


def remove_stale_temporaries(path: Path, *, report: Callable[[str], None] = _warn) -> list[Path]:
    """Temporary files of writes a killed run left behind (``.iter_*.pt.*.tmp``, ``.latest.*.tmp``,
    ``.iter_*.dcp.tmp/`` ...) and checksum files whose checkpoint never appeared; call it holding the lock."""
    stale = []
    for d in (path, path / "checkpoints"):
        if d.is_dir():
            stale += [p for p in d.iterdir() if _TMP_RE.match(p.name)]
    ckdir = path / "checkpoints"
    if ckdir.is_dir():
        sums = ckdir.glob("iter_*.pt.sha256")
        stale += [p for p in sums if not p.with_name(p.name[: -len(".sha256")]).exists()]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if stale:
        report(
            f"note: removed {len(stale)} temporary file(s) of an interrupted write: "
            f"{', '.join(str(p) for p in sorted(stale))}"
        )
    return stale


def prepare_run_dir(run_dir: str | Path | None, *, algo: str, resume: str | None = None) -> Path:
    """Create (or, on resume, reuse) the run directory and check it is writable before any work starts.  Takes
    no lock: :func:`open_run_dir` is what a run uses."""
    if resume:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--resume: expected an existing run directory, got {resume!r} (not a directory)"
            )
        if not (path / "config.json").exists() and latest_checkpoint(path) is None:
            raise FileNotFoundError(
                f"--resume: expected a run directory (config.json, checkpoints/) at {path}, found neither"
            )
    elif run_dir:
        path = Path(run_dir)
    else:
        path = default_run_dir(algo)
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


def discard_unstarted_run(path: str | Path) -> None:
    """Undo what :func:`prepare_run_dir` and a loop's ``config.json`` put into a new run directory whose run
    failed before it started (a model the policy could not be built from): the config goes, and the
    ``checkpoints/`` and ``samples/`` folders if they are still empty, so the corrected command can run in the
    same directory without ``--overwrite``.  Anything else in the directory stays."""
    path = Path(path)
    (path / "config.json").unlink(missing_ok=True)
    for name in ("checkpoints", "samples"):
        with contextlib.suppress(OSError):  # not empty (or gone): left as it is
            (path / name).rmdir()


def open_run_dir(
    run_dir: str | Path | None,
    *,
    algo: str,
    resume: str | Path | None = None,
    overwrite: bool = False,
    report: Callable[[str], None] = _warn,
) -> tuple[Path, RunLock]:
    """The run directory, owned: created (or, on resume, reused), locked, checked writable; with
    ``overwrite`` the previous run's outputs are deleted, and temporary files of killed writes are removed.
    Raises :class:`RunDirBusy` when another run holds it.  The caller releases the lock."""
    if resume:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--resume: expected an existing run directory, got {str(resume)!r} (not a directory)"
            )
    else:
        path = Path(run_dir) if run_dir else default_run_dir(algo)
        check_new_run_dir(path, overwrite=overwrite)
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = RunLock(path, report=report)
    except OSError as e:
        raise PermissionError(
            f"--run-dir: expected a writable directory, got {str(path)!r} ({e.strerror})"
        ) from None
    try:
        if not resume:
            check_new_run_dir(path, overwrite=overwrite)  # again, now that no other run can start here
            if overwrite:
                _clear_run_outputs(path)
        remove_stale_temporaries(path, report=report)
        prepare_run_dir(path, algo=algo)
    except BaseException:
        lock.release()
        raise
    return path, lock


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------
def _parse_metrics(path: Path, report: Callable[[str], None] | None) -> list[tuple[dict, str]]:
    """``(row, line)`` for every row of ``metrics.jsonl``; a line that is not a JSON object (the half-written
    last line a crash or a full disk leaves) is dropped with a word to ``report``."""
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            if not isinstance(row, dict) or "iteration" not in row:
                raise ValueError("not a metrics row")
        except ValueError:
            if report is not None:
                where = "its last line" if n == len(lines) else f"line {n}"
                report(
                    f"note: {path}: dropped {where}, which is not a whole JSON row "
                    f"(a write cut short by a crash or a full disk): {ln[:60]!r}"
                )
            continue
        rows.append((row, ln))
    return rows


class MetricsLogger:
    """``metrics.jsonl`` (one JSON object per line, always with ``iteration`` and ``elapsed_s``) plus optional
    TensorBoard / wandb (``wandb`` runs in offline mode unless ``WANDB_MODE`` says otherwise).

    ``resume_iteration``: keep only the rows up to that iteration (the resumed run logs the later ones
    again; ``-1`` keeps none: a run resumed from its start); ``None`` appends."""

    def __init__(
        self,
        run_dir: Path,
        *,
        loggers: tuple[str, ...] = (),
        config: dict | None = None,
        resume_iteration: int | None = None,
        report: Callable[[str], None] = _warn,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_iteration is not None and self.path.exists():
            rows = _parse_metrics(self.path, report)
            keep = [ln for row, ln in rows if row["iteration"] <= resume_iteration]
            if len(keep) < len(rows):
                report(
                    f"resume: dropped {len(rows) - len(keep)} row(s) of {self.path} past iteration "
                    f"{resume_iteration} (they are logged again)"
                )
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        try:
            self._fh = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise WriteError(self.path, e) from None
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
        try:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()
        except OSError as e:
            raise WriteError(self.path, e) from None
        numeric = {k: v for k, v in rec.items() if isinstance(v, float) and k not in ("iteration",)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, iteration)
        if self._wandb is not None:
            self._wandb.log(numeric, step=iteration)

    def sync(self) -> None:
        """fsync the rows logged so far (before a checkpoint: the rows it covers are then on disk too)."""
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as e:
            raise WriteError(self.path, e) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``<run>/metrics.jsonl`` (a half-written line is skipped)."""
    return [row for row, _ in _parse_metrics(Path(run_dir) / "metrics.jsonl", None)]


# ------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file in the same directory, fsynced, checksummed, renamed into place.
# ------------------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mkstemp(path: Path) -> tuple[int, str]:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(path, e) from None
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would give, not mkstemp's 0600
    return fd, tmp


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = _mkstemp(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(path, e) from None
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def atomic_save(obj: Any, path: Path, *, checksum: bool = False) -> str | None:
    """``torch.save`` that never leaves a half-written file at ``path``.  With ``checksum`` the file's SHA-256
    is written to ``<path>.sha256`` before ``path`` appears (so every checkpoint has its checksum) and
    returned.  A failed write raises :class:`WriteError` naming ``path``."""
    path = Path(path)
    fd, tmp = _mkstemp(path)
    digest = None
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if checksum:
            digest = file_sha256(Path(tmp))
            atomic_write_text(_checksum_path(path), f"{digest}  {path.name}\n")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, WriteError):
            raise
        cause = _os_error(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise WriteError(path, cause) from None
        raise
    return digest


_CKPT_RE = re.compile(r"^iter_\d{6,}\.(pt|dcp)$")


def _checkpoints(ckdir: Path) -> list[Path]:
    """``iter_XXXXXX.pt`` files and ``iter_XXXXXX.dcp`` directories (FSDP2), oldest first."""
    return sorted(
        [p for p in list(ckdir.glob("iter_*.pt")) + list(ckdir.glob("iter_*.dcp")) if _CKPT_RE.match(p.name)],
        key=lambda p: int(p.stem.split("_")[1]),
    )


def _iteration_of(path: Path) -> int:
    return int(path.stem.split("_")[1])


def checkpointed_iterations(run_dir: Path) -> list[int]:
    """The iterations ``run_dir/checkpoints`` holds checkpoints of (``.pt``, FSDP ``.dcp``), oldest first."""
    ckdir = Path(run_dir) / "checkpoints"
    return [_iteration_of(p) for p in _checkpoints(ckdir)] if ckdir.is_dir() else []


def _remove_checkpoint(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
        _checksum_path(p).unlink(missing_ok=True)


def _prune(ckdir: Path, current: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``current``; those past it belong to the stretch of run that
    a resume from an older checkpoint replaced (e.g. a damaged one), and go too."""
    cur = _iteration_of(current)
    older = [p for p in _checkpoints(ckdir) if _iteration_of(p) <= cur and p != current]
    newer = [p for p in _checkpoints(ckdir) if _iteration_of(p) > cur]
    for p in (older[: max(len(older) - (keep - 1), 0)] if keep > 0 else []) + newer:
        _remove_checkpoint(p)


def save_checkpoint(run_dir: Path, iteration: int, state: dict, *, keep: int = 2) -> Path:
    """Write ``checkpoints/iter_XXXXXX.pt`` (and its ``.sha256``) atomically, then point ``latest`` at it;
    keep the newest ``keep``."""
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"iter_{iteration:06d}.pt"
    atomic_save(state, path, checksum=True)
    atomic_write_text(ckdir / "latest", path.name)
    _prune(ckdir, path, keep)
    return path


DCP_MANIFEST = "checksums.sha256"


def _write_manifest(directory: Path) -> None:
    """SHA-256 of every file under an FSDP checkpoint directory, in ``sha256sum`` format."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != DCP_MANIFEST)
    lines = [f"{file_sha256(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    atomic_write_text(directory / DCP_MANIFEST, "".join(lines))


def save_sharded_checkpoint(
    run_dir: Path, iteration: int, sharded: dict, meta: dict, *, is_main: bool, barrier, keep: int = 2
) -> Path:
    """FSDP2: every rank writes its shards of ``sharded`` with ``torch.distributed.checkpoint`` into a hidden
    temporary directory; rank 0 adds ``meta.pt`` (counters, RNG, config) and ``checksums.sha256`` (every file)
    and renames the directory into place as ``iter_XXXXXX.dcp`` only when every rank has finished, then moves
    ``latest``: a crash at any point leaves the previous checkpoint as the latest whole one."""
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
        _write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(ckdir / "latest", final.name)
        _prune(ckdir, final, keep)
    barrier()
    return final


def _pointer(ckdir: Path) -> tuple[Path | None, str | None]:
    """The checkpoint ``latest`` names -> ``(path, None)``, or ``(None, problem)`` when it is missing, empty,
    malformed or names a checkpoint that is gone."""
    pointer = ckdir / "latest"
    if not pointer.exists():
        return None, None
    try:
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as e:
        return None, f"{pointer} is unreadable ({e.strerror})"
    if not name:
        return None, f"{pointer} is empty"
    if not _CKPT_RE.match(name):
        return None, f"{pointer} names {name[:40]!r}, not a checkpoint"
    if not (ckdir / name).exists():
        return None, f"{pointer} names {name}, which does not exist"
    return ckdir / name, None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points at (else the newest by iteration); not verified."""
    ckdir = Path(run_dir) / "checkpoints"
    p, _ = _pointer(ckdir)
    if p is not None:
        return p
    cands = _checkpoints(ckdir) if ckdir.is_dir() else []
    return cands[-1] if cands else None


def _candidates(ckdir: Path) -> tuple[list[Path], str | None]:
    """Checkpoints to try, best first: the one ``latest`` names, then the others newest first."""
    first, problem = _pointer(ckdir)
    rest = [p for p in reversed(_checkpoints(ckdir)) if p != first] if ckdir.is_dir() else []
    return ([first] if first is not None else []) + rest, problem


def verify_checkpoint(path: Path) -> str | None:
    """``None`` when ``path``'s bytes match the checksum written with it, else what is wrong; a checkpoint
    written before checksums existed is checked against its zip archive's CRC-32s instead."""
    path = Path(path)
    try:
        if path.is_dir():
            manifest = path / DCP_MANIFEST
            if not (path / "meta.pt").is_file():
                return "meta.pt is missing"
            if not manifest.exists():
                return None
            for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
                want, _, rel = line.partition("  ")
                f = path / rel
                if not f.is_file():
                    return f"{rel} is missing"
                if file_sha256(f) != want.strip():
                    return f"{rel} does not match its SHA-256 in {DCP_MANIFEST} (damaged since written)"
            return None
        if path.stat().st_size == 0:
            return "the file is empty"
        sums = _checksum_path(path)
        if not sums.exists():  # written before checksums: the zip archive's own CRC-32s
            try:
                with zipfile.ZipFile(path) as zf:
                    bad = zf.testzip()
            except (zipfile.BadZipFile, EOFError) as e:
                return f"not a whole checkpoint archive ({e}; it has no .sha256 to check)"
            return None if bad is None else f"{bad} fails its CRC-32 (it has no .sha256 to check)"
        want = sums.read_text(encoding="utf-8", errors="replace").split()
        if not want:
            return f"{sums.name} is empty"
        if file_sha256(path) != want[0]:
            return f"its bytes do not match the SHA-256 in {sums.name} (damaged after it was written)"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


def _load(path: Path) -> dict:
    if path.is_dir():
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
        return {"meta": meta, "dcp_path": path}
    return torch.load(path, map_location="cpu", weights_only=False)


def find_checkpoint(run_dir: Path, *, report: Callable[[str], None] = _warn) -> tuple[Path, dict] | None:
    """The newest intact checkpoint -> ``(path, state)``, or ``None`` when the run wrote none.  A damaged or
    unreadable one (checksum mismatch, truncated, empty, an empty ``latest``) is reported by path and skipped;
    when checkpoints exist but none is intact, :class:`CheckpointError` lists each with its problem.  The
    state of an FSDP2 ``.dcp`` directory is ``{"meta": ..., "dcp_path": ...}`` (the trainer loads the shards
    in place)."""
    ckdir = Path(run_dir) / "checkpoints"
    cands, pointer_problem = _candidates(ckdir)
    if pointer_problem:
        report(f"warning: {pointer_problem}; looking for the newest intact checkpoint")
    problems = []
    for p in cands:
        problem = verify_checkpoint(p)
        if problem is None:
            try:
                state = _load(p)
                if not isinstance(state, dict):
                    raise ValueError(f"expected a dict, got {type(state).__name__}")
            except Exception as e:  # truncated zip, pickle errors, ...: all mean "unusable"
                problem = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        if problem is None:
            if problems:
                report(f"resume: using {p}, the newest intact checkpoint")
            return p, state
        report(f"warning: checkpoint {p} is damaged: {problem}; skipping it")
        problems.append(f"{p}: {problem}")
    if problems:
        raise CheckpointError(
            f"--resume: expected an intact checkpoint under {ckdir}, found none: " + "; ".join(problems)
        )
    return None


def load_checkpoint(run_dir: Path, *, report: Callable[[str], None] = _warn) -> dict:
    """The newest intact checkpoint's state (see :func:`find_checkpoint`); none at all is an error."""
    found = find_checkpoint(run_dir, report=report)
    if found is None:
        raise CheckpointError(
            f"--resume: expected a checkpoint under {Path(run_dir) / 'checkpoints'}, found none"
        )
    return found[1]


def intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose checksum verifies (for messages after a stop), or ``None``."""
    cands, _ = _candidates(Path(run_dir) / "checkpoints")
    return next((p for p in cands if verify_checkpoint(p) is None), None)


def intact_note(run_dir: Path) -> str:
    """Which checkpoint a stopped run can continue from, by path, only when there is one."""
    p = intact_checkpoint(run_dir)
    if p is None:
        return f"no checkpoint has been written yet (--resume {run_dir} starts the run over)"
    return f"the last intact checkpoint is {p} (continue with --resume {run_dir})"


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
# Signals: the first SIGINT (Ctrl-C), SIGTERM (what SLURM, Kubernetes and torchrun send before a kill) or
# SIGUSR1 (what SLURM sends ahead of time with --signal) asks the loop to stop: a rollout in progress is
# abandoned, an update in progress is finished, a checkpoint is written and the run exits with code 3.  A
# second signal aborts at once (the previous checkpoint stays valid because checkpoints are atomic).
# ------------------------------------------------------------------------------------------------------------
INTERRUPTED_EXIT = 3
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Aborted(KeyboardInterrupt):
    """A second stop signal: leave now.  ``exit_code`` is the shell's ``128 + signal number``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint (exit code :data:`INTERRUPTED_EXIT`)."""


class IterationAbandoned(Exception):
    """Raised at a rollout micro-batch boundary after a stop signal: nothing has been updated yet, so the
    iteration is dropped and the state of the previous one is checkpointed."""


class GracefulInterrupt:
    """Installs the stop-signal handlers for the ``with`` block (main thread only); ``requested`` turns true
    at the first signal, ``signame`` names it."""

    def __init__(self, *, verbose: bool = True):
        self.requested = False
        self.signame: str | None = None
        self.verbose = verbose
        self._old: dict = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            raise Aborted(signum)
        self.requested, self.signame = True, name
        if self.verbose:
            again = "Ctrl-C" if signum == signal.SIGINT else name
            print(
                f"\n{name}: finishing this iteration (or dropping its rollout), writing a checkpoint, then "
                f"exiting with code {INTERRUPTED_EXIT} ({again} again aborts now)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
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
