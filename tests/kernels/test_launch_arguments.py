"""Every Triton launch site passes only arguments its kernel declares, and all those it needs.

A compiled launch (``kernel[grid](..., NAME=value)``) raises ``KeyError: Keyword argument NAME was specified
but unrecognised`` for a keyword that is neither a parameter of the kernel nor a compile option, but Triton's
CPU interpreter accepts it silently: a stray ``LOGP=`` on the transition kernel's first stage passed every CPU
test and failed every SDE/CPS/DDIM step on the first H200 run (bench/results/gpu-check-h200).  This test reads
the launch sites from the source, so it checks every one of them, on any machine.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
KERNEL_FILES = sorted((ROOT / "kernels").rglob("*.py"))


def _compile_options() -> set[str]:
    """The keywords a launch may add besides the kernel's parameters (Triton's CUDA backend options)."""
    names = {"num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg", "grid", "warmup"}
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
        return names
    return names | {f.name for f in dataclasses.fields(CUDAOptions)}


def _is_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr in ("jit", "autotune", "heuristics")


def _kernels() -> dict[str, ast.FunctionDef]:
    found = {}
    for path in KERNEL_FILES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
                assert node.name not in found, f"two Triton kernels named {node.name}"
                found[node.name] = node
    return found


def _launches(kernels: dict[str, ast.FunctionDef]):
    for path in KERNEL_FILES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)):
                continue
            target = node.func.value
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
            if name in kernels:
                yield f"{path.relative_to(ROOT)}:{node.lineno}", kernels[name], node


KERNELS = _kernels()
LAUNCHES = list(_launches(KERNELS))


def test_launch_sites_are_found():
    assert len(KERNELS) >= 20
    assert len(LAUNCHES) >= 20
    assert any(k.name == "_transition_fwd_kernel" for _, k, _ in LAUNCHES)


@pytest.mark.parametrize(("site", "kernel", "call"), LAUNCHES, ids=[s for s, _, _ in LAUNCHES])
def test_launch_matches_the_kernel_signature(site, kernel, call):
    params = [a.arg for a in kernel.args.args]
    n_defaults = len(kernel.args.defaults)
    required = params[: len(params) - n_defaults]
    keywords = [k.arg for k in call.keywords if k.arg is not None]
    assert not any(k.arg is None for k in call.keywords), f"{site}: **kwargs launch cannot be checked"
    assert not any(isinstance(a, ast.Starred) for a in call.args), f"{site}: *args launch cannot be checked"
    unknown = [k for k in keywords if k not in params and k not in _compile_options()]
    assert not unknown, f"{site}: {kernel.name} declares no parameter {unknown} (nor any compile option)"
    assert len(call.args) <= len(params), f"{site}: {len(call.args)} positional arguments for {len(params)}"
    given = set(params[: len(call.args)]) | set(keywords)
    twice = set(params[: len(call.args)]) & set(keywords)
    assert not twice, f"{site}: {sorted(twice)} given both by position and by keyword"
    # autotuned / heuristics-filled parameters are supplied by their decorators
    supplied = _decorator_supplied(kernel)
    missing = [p for p in required if p not in given and p not in supplied]
    assert not missing, f"{site}: {kernel.name} needs {missing}"


def _decorator_supplied(kernel: ast.FunctionDef) -> set[str]:
    names = set()
    for d in kernel.decorator_list:
        if isinstance(d, ast.Call) and getattr(d.func, "attr", "") in ("autotune", "heuristics"):
            for node in ast.walk(d):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names.add(node.value)
    return names
