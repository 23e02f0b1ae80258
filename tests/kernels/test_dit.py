"""The DiT fast-path ops (``kernels.ada_layer_norm``, ``gated_residual``, ``rms_norm``, ``rotary_emb``)
against ``kernels/reference.py`` and the diffusers modules they replace, forward and backward, per backend.

On a CPU-only machine the ``triton`` backend runs the kernels in Triton's interpreter; shapes are tiny and odd
(token counts that do not fill a backward program's token block, channel counts that are not powers of two).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference as ref

from .common import DTYPES, assert_close, backends, forward_backward, make

BACKENDS = backends()
ROOT = Path(__file__).resolve().parents[2]
TOKEN_SHAPES = [(2, 37, 24), (3, 5, 40), (1, 70, 7)]  # [B, L, C]: 70 tokens = 3 token blocks, one partial


def _run(backend, api_fn, ref_fn, tensors, grad_names, dtype):
    with kernels.use_backend(backend):
        outs, grads = forward_backward(api_fn, tensors, grad_names)
    exp_outs, exp_grads = forward_backward(ref_fn, tensors, grad_names)
    for i, (o, e) in enumerate(zip(outs, exp_outs, strict=True)):
        assert_close(o, e, dtype, name=f"output {i}")
    for k in grad_names:
        assert grads[k] is not None, f"grad {k}: missing"
        # per-channel gradients sum over tokens: tolerance grows with the token count
        scale = max(1.0, float(exp_grads[k].float().abs().max())) * (4.0 if grads[k].ndim <= 2 else 1.0)
        assert_close(grads[k], exp_grads[k], dtype, name=f"grad {k}", scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
def test_ada_layer_norm(backend, dtype, shape):
    b, _, c = shape
    tensors = {
        "x": (make(shape, torch.float32, seed=1) * 3 + 0.5).to(dtype),
        "scale": make((b, c), dtype, seed=2),
        "shift": make((b, c), dtype, seed=3),
    }
    _run(backend, kernels.ada_layer_norm, ref.ada_layer_norm, tensors, ["x", "scale", "shift"], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
def test_gated_residual(backend, dtype, shape):
    b, _, c = shape
    tensors = {
        "x": make(shape, dtype, seed=1),
        "y": make(shape, dtype, seed=2),
        "gate": make((b, c), dtype, seed=3),
    }
    _run(backend, kernels.gated_residual, ref.gated_residual, tensors, ["x", "y", "gate"], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 9, 3, 8), (3, 5, 20), (37, 64)], ids=str)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(backend, dtype, shape, with_weight):
    tensors = {"x": make(shape, dtype, seed=1)}
    names = ["x"]
    if with_weight:
        tensors["weight"] = make((shape[-1],), dtype, lo=0.5, hi=1.5, seed=4)
        names.append("weight")
    _run(backend, lambda **k: kernels.rms_norm(**k), lambda **k: ref.rms_norm(**k), tensors, names, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sequence_dim", [1, 2])
@pytest.mark.parametrize("head_dim", [8, 6])
def test_rotary_emb(backend, dtype, sequence_dim, head_dim):
    s = 11
    shape = (2, s, 3, head_dim) if sequence_dim == 1 else (2, 3, s, head_dim)
    angles = make((s, head_dim), torch.float32, seed=5) * 3
    cos, sin = angles.cos(), angles.sin()
    _run(
        backend,
        lambda x: kernels.rotary_emb(x, cos, sin, sequence_dim),
        lambda x: ref.rotary_emb(x, cos, sin, sequence_dim),
        {"x": make(shape, dtype, seed=1)},
        ["x"],
        dtype,
    )


def test_references_match_diffusers():
    """The references are the math diffusers runs (fp32): LayerNorm + modulation, RMSNorm, FLUX rotary."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    x = make((2, 7, 12), torch.float32, seed=1)
    scale, shift = make((2, 12), torch.float32, seed=2), make((2, 12), torch.float32, seed=3)
    ln = torch.nn.LayerNorm(12, elementwise_affine=False, eps=1e-6)
    torch.testing.assert_close(
        ref.ada_layer_norm(x, scale, shift), ln(x) * (1 + scale[:, None]) + shift[:, None]
    )
    q = make((2, 7, 3, 8), torch.float32, seed=4)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(make((8,), torch.float32, lo=0.5, hi=1.5, seed=5))
    torch.testing.assert_close(ref.rms_norm(q, norm.weight, 1e-6), norm(q))
    angles = make((7, 8), torch.float32, seed=6)
    freqs = (angles.cos(), angles.sin())
    torch.testing.assert_close(ref.rotary_emb(q, *freqs, 1), apply_rotary_emb(q, freqs, sequence_dim=1))
    qt = q.transpose(1, 2).contiguous()
    torch.testing.assert_close(ref.rotary_emb(qt, *freqs, 2), apply_rotary_emb(qt, freqs, sequence_dim=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_where_asked(backend):
    """Frozen modulation / gate / weight (the LoRA case): only ``x``'s gradient is computed, and right."""
    x = make((2, 37, 24), torch.float32, seed=1)
    s, sh = make((2, 24), torch.float32, seed=2), make((2, 24), torch.float32, seed=3)
    y = make((2, 37, 24), torch.float32, seed=4)
    with kernels.use_backend(backend):
        for fn, args in (
            (kernels.ada_layer_norm, (s, sh)),
            (lambda a, g: kernels.gated_residual(a, y, g), (s,)),
            (lambda a, w: kernels.rms_norm(a, w), (s[0],)),
        ):
            leaf = x.clone().requires_grad_(True)
            out = fn(leaf, *args)
            (gx,) = torch.autograd.grad(out.square().sum(), [leaf])
            leaf_ref = x.clone().requires_grad_(True)
            with kernels.use_backend("reference"):
                (gx_ref,) = torch.autograd.grad(fn(leaf_ref, *args).square().sum(), [leaf_ref])
            assert_close(gx, gx_ref, torch.float32)
            assert all(a.grad is None for a in args)


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"scale: expected shape \(2, 8\)"):
        kernels.ada_layer_norm(x, torch.randn(2, 1, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"x: expected a tensor shaped \[B, L, C\]"):
        kernels.gated_residual(x[None], x[None], torch.randn(1, 2))
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\)"):
        kernels.rms_norm(x, torch.randn(5))
    with pytest.raises(ValueError, match=r"cos: expected shape \(5, 8\)"):
        kernels.rotary_emb(x[:, :, None], torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="eps: expected a value > 0"):
        kernels.ada_layer_norm(x, torch.randn(2, 8), torch.randn(2, 8), eps=0.0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton kernels (interpreter or GPU)")
def test_custom_ops_pass_opcheck():
    """Schema, fake tensors and autograd registration of every DiT op (what torch.compile relies on)."""
    from kernels.ops import dit

    x = make((2, 5, 8), torch.float32, seed=1).requires_grad_(True)
    s = make((2, 8), torch.float32, seed=2).requires_grad_(True)
    sh = make((2, 8), torch.float32, seed=3).requires_grad_(True)
    q = make((2, 5, 2, 8), torch.float32, seed=4).requires_grad_(True)
    w = make((8,), torch.float32, seed=5).requires_grad_(True)
    angles = make((5, 8), torch.float32, seed=6)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    with kernels.use_backend("triton"):
        torch.library.opcheck(dit.ada_layer_norm_op.op, (x, s, sh, 1e-6), test_utils=tests)
        torch.library.opcheck(dit.gated_residual_op.op, (x, x.detach() * 2, s), test_utils=tests)
        torch.library.opcheck(dit.rms_norm_op.op, (q, w, 1e-6, torch.float32), test_utils=tests)
        torch.library.opcheck(dit.rotary_emb_op.op, (q, angles.cos(), angles.sin(), 1), test_utils=tests)


# ----------------------------------------------------------------------------------------------------------
# Compiled-mode check for sm_90 without a GPU (the interpreter misses type errors of compiled Triton)
# ----------------------------------------------------------------------------------------------------------
def _compile_all(arch: int = 90) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.ops import dit

    floats = {"eps"}

    def sig(fn, consts, storage):
        out = {}
        for p in fn.arg_names:
            out[p] = (
                "constexpr"
                if p in consts
                else storage.get(p, "*fp32")
                if p.endswith("_ptr")
                else "fp32"
                if p in floats
                else "i32"
            )
        return out

    bf16 = "*bf16"
    variants = [
        (dit._ada_ln_fwd_kernel, {"BLOCK_C": 2048}, {"x_ptr": bf16, "y_ptr": bf16, "scale_ptr": bf16})
    ]
    for mod in (False, True):
        variants.append(
            (
                dit._ada_ln_bwd_kernel,
                {"MOD_GRAD": mod, "TOK": 32, "BLOCK_C": 2048},
                {"g_ptr": bf16, "x_ptr": bf16, "dx_ptr": bf16},
            )
        )
    variants.append((dit._gated_fwd_kernel, {"BLOCK": 1024}, {"y_ptr": bf16, "gate_ptr": bf16}))
    for gg, yg in itertools.product((False, True), (False, True)):
        variants.append(
            (
                dit._gated_bwd_kernel,
                {"GATE_GRAD": gg, "Y_GRAD": yg, "TOK": 32, "BLOCK_C": 4096},
                {"g_ptr": bf16, "dy_ptr": bf16},
            )
        )
    for has_w, w_grad in ((False, False), (True, False), (True, True)):
        variants.append((dit._rms_fwd_kernel, {"HAS_W": has_w, "RB": 16, "BLOCK_D": 64}, {"y_ptr": bf16}))
        variants.append(
            (
                dit._rms_bwd_kernel,
                {"HAS_W": has_w, "W_GRAD": w_grad, "RB": 16, "BLOCK_D": 128},
                {"x_ptr": bf16, "dx_ptr": bf16},
            )
        )
    for bwd in (False, True):
        variants.append(
            (
                dit._rope_kernel,
                {"HALF": 64, "BACKWARD": bwd, "RB": 16, "BLOCK_H": 64},
                {"x_ptr": bf16, "out_ptr": bf16},
            )
        )
    failures = 0
    for fn, consts, storage in variants:
        try:
            source = ASTSource(fn=fn, signature=sig(fn, consts, storage), constexprs=consts)
        except TypeError as e:
            print(f"triton {triton.__version__}: ASTSource API not supported by this check ({e})")
            return 3
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
            assert "cubin" in compiled.asm or "ptx" in compiled.asm
            print("ok", fn.fn.__name__, consts)
        except Exception as e:  # report every failing variant, then fail
            failures += 1
            print("FAIL", fn.fn.__name__, consts, repr(e)[:2000])
    return 1 if failures else 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, the GPU tests compile and run the kernels")
def test_dit_kernels_compile_for_sm90():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton's bundled CUDA toolchain (ptxas) is not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; from tests.kernels.test_dit import _compile_all; sys.exit(_compile_all())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if out.returncode == 3:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 16 and all(line.startswith("ok ") for line in lines), out.stdout


# ----------------------------------------------------------------------------------------------------------
# GPU: compiled kernels in bf16, torch.compile, CUDA-graph capture
# ----------------------------------------------------------------------------------------------------------
def _gpu_cases(dtype):
    dev = "cuda"
    x = torch.randn(4, 1031, 1536, device=dev, dtype=dtype)
    s, sh = torch.randn(4, 1536, device=dev, dtype=dtype), torch.randn(4, 1536, device=dev, dtype=dtype)
    q = torch.randn(4, 1031, 24, 64, device=dev, dtype=dtype)
    w = torch.rand(64, device=dev, dtype=dtype) + 0.5
    angles = torch.randn(1031, 64, device=dev)
    return {
        "ada_layer_norm": (lambda: kernels.ada_layer_norm(x, s, sh), lambda: ref.ada_layer_norm(x, s, sh)),
        "gated_residual": (
            lambda: kernels.gated_residual(x, x * 0.5, s),
            lambda: ref.gated_residual(x, x * 0.5, s),
        ),
        "rms_norm": (lambda: kernels.rms_norm(q, w), lambda: ref.rms_norm(q, w)),
        "rotary_emb": (
            lambda: kernels.rotary_emb(q, angles.cos(), angles.sin()),
            lambda: ref.rotary_emb(q, angles.cos(), angles.sin()),
        ),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_bf16_matches_reference(dtype):
    for name, (fast, slow) in _gpu_cases(dtype).items():
        assert_close(fast(), slow(), dtype, name=name)


@pytest.mark.gpu
def test_cuda_torch_compile_and_graph_capture():
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)

    def block(x):
        h = kernels.ada_layer_norm(x, s, s)
        h = kernels.gated_residual(x, h, s)
        return h, kernels.rms_norm(q, w)

    compiled = torch.compile(block, fullgraph=True)
    for got, exp in zip(compiled(x), block(x), strict=True):
        assert_close(got, exp, torch.bfloat16)
    compiled(x)[0].float().sum().backward()
    static = x.detach().clone()
    block(static)  # warm up (Triton compiles) before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block(static)
    static.copy_(x.detach() * 2)
    graph.replay()
    assert_close(out[0], block(x.detach() * 2)[0], torch.bfloat16)
