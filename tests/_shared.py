"""Expensive module fixtures built once per test session, whichever pytest-xdist worker needs them first.

CI runs ``pytest -n auto``: a module's tests may land on both workers, and each worker would build the
module's fixtures again (the DPO pairs take about 1.5 minutes on one core).  ``shared(...)`` builds the value
once, under a file lock in the session's shared temporary directory, saves it with ``torch.save`` and lets
every other worker load it.  Without xdist it just builds.  Use it only for values that the tests read and
never modify, and never where a test compares bit for bit with a run in its own process (the value may come
from another process).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from filelock import FileLock

T = TypeVar("T")


def shared(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """``build(folder)`` once per session -> its value (a fresh empty ``folder`` it may write files into).

    Under xdist the first worker to ask builds it (the others wait on the lock) and saves the value; a later
    worker loads that.  A failed build leaves nothing behind, so the next worker that asks builds it again
    (and reports the same failure)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent / "shared-fixtures"  # the same for every worker
    root.mkdir(exist_ok=True)
    done = root / f"{name}.pt"
    with FileLock(str(root / f"{name}.lock")):
        if done.exists():
            return torch.load(done, weights_only=False)
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        value = build(folder)
        tmp = root / f"{name}.pt.tmp"
        torch.save(value, tmp)
        os.replace(tmp, done)
        return value
