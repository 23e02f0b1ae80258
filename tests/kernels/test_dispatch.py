"""Backend selection: auto / reference / triton, the interpreter switch read at call time, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kernels
from kernels import _dispatch

from .common import backends


def test_use_backend_restores_and_set_backend_validates():
    x = torch.zeros(2, 3)
    assert kernels.get_backend() == "auto"
    with kernels.use_backend("reference"):
        assert kernels.active_backend(x) == "reference"
        with kernels.use_backend("auto"):
            assert kernels.get_backend() == "auto"
        assert kernels.get_backend() == "reference"
    assert kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("cuda")
    kernels.set_backend("reference")
    try:
        assert kernels.active_backend(x) == "reference"
    finally:
        kernels.set_backend("auto")


def test_auto_reads_triton_interpret_at_call_time(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels.active_backend(x) == "reference"
    assert kernels.active_backend(torch.zeros(2, device="meta")) == "reference"
    if "triton" in backends():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernels.active_backend(x) == "triton"


@pytest.mark.skipif("triton" not in backends(), reason="needs triton")
def test_triton_backend_really_runs_the_custom_ops():
    x = torch.randn(2, 3, requires_grad=True)
    with kernels.use_backend("triton"):
        out = kernels.euler_step(x, x, 0.5, 0.25)
    assert "nft_kernels" in type(out.grad_fn).__name__
    with kernels.use_backend("reference"):
        out = kernels.euler_step(x, x, 0.5, 0.25)
    assert "nft_kernels" not in type(out.grad_fn).__name__


_SNIPPET = """
import os, sys, torch
{prelude}
import kernels
x = torch.ones(2, 3)
print(kernels.active_backend(x))
print(float(kernels.euler_step(x, x, 0.5, 0.25).sum()))
try:
    with kernels.use_backend("triton"):
        kernels.euler_step(x, x, 0.5, 0.25)
    print("no error")
except RuntimeError as e:
    print("RuntimeError", e)
"""


def _run(prelude):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    code = _SNIPPET.format(prelude=prelude)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_triton_on_cpu_without_interpreter_raises_a_clear_error():
    lines = _run("")
    assert lines[0] == "reference" and float(lines[1]) == 4.5
    assert lines[2].startswith("RuntimeError") and "TRITON_INTERPRET=1" in lines[2]


def test_import_without_triton_uses_the_reference():
    """``import kernels`` works where triton is not installed (macOS): everything runs the reference."""
    lines = _run("sys.modules['triton'] = None  # makes `import triton` raise ImportError")
    assert lines[0] == "reference" and float(lines[1]) == 4.5
    assert lines[2].startswith("RuntimeError") and "not installed" in lines[2]


def test_kernels_imports_nothing_from_the_rest_of_the_project():
    code = (
        "import sys, kernels; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('engine', 'models', 'train', 'bench')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert _dispatch.BACKENDS == ("auto", "reference", "triton")
