"""Compile every Triton kernel variant ahead of time for a CUDA target, without a GPU.

Run as ``python -m tests.kernels.compile_targets`` with ``TRITON_INTERPRET`` unset (the kernels must be
decorated as compiled ``JITFunction``s).  Triton's frontend, its MLIR passes, LLVM and the bundled ``ptxas``
need no device, so this catches compiled-mode errors (type mismatches across ``constexpr`` branches,
loop-carried types, unsupported ops) that the CPU interpreter does not.  Prints one line per variant and
exits 1 on failure.
"""

from __future__ import annotations

import inspect
import itertools
import sys
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.ops import elementwise, gaussian, nft, random, transition

FLOAT_ARGS = {"level", "beta", "clip", "kl_coef"}
LOG_SQRT_2PI = 0.9189385332046727


def _signature(fn, consts, storage):
    sig = {}
    for p in inspect.signature(fn.fn).parameters:
        if p in consts:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = storage.get(p, "*fp32")
        else:
            sig[p] = "fp32" if p in FLOAT_ARGS else "i32"
    return sig


def _variants():
    bf16 = "*bf16"
    blk = {"BLOCK": 1024}
    for paired in (False, True):
        yield (
            elementwise._interpolate_fwd_kernel,
            {**blk, "PAIRED": paired},
            {"x0_ptr": bf16, "out_ptr": bf16},
        )
        yield elementwise._interpolate_bwd_kernel, {**blk, "PAIRED": paired}, {"g_ptr": bf16}
    yield elementwise._euler_fwd_kernel, blk, {"x_ptr": bf16, "out_ptr": bf16}
    yield elementwise._euler_bwd_kernel, blk, {}
    for has_prev in (False, True):
        yield elementwise._dpm2_fwd_kernel, {**blk, "HAS_PREV": has_prev}, {"x_ptr": bf16, "out_ptr": bf16}
        yield elementwise._dpm2_bwd_kernel, {**blk, "HAS_PREV": has_prev}, {}
    storage = {
        "x_ptr": bf16,
        "v_ptr": bf16,
        "z_ptr": bf16,
        "prev_ptr": bf16,
        "gprev_ptr": bf16,
        "gx_ptr": bf16,
    }
    for kind, sample in itertools.product((0, 1, 2), (False, True)):
        yield (
            transition._transition_fwd_kernel,
            {"KIND": kind, "SAMPLE": sample, "CHUNK": 4096, **blk},
            storage,
        )
        flags = ("HAS_GPREV", "HAS_GLOGP", "HAS_GMEAN", "NEED_DIFF", "NEED_XV", "NEED_Z")
        for on in (
            (True,) * 6,
            (False, True, False, False, True, False),
            (True, False, True, False, True, True),
        ):
            for logp in (0, 1) if kind == 1 else (0,):  # CPS: Gaussian and flow_grpo's squared log-prob
                yield (
                    transition._transition_bwd_kernel,
                    {"KIND": kind, "LOGP": logp, "SAMPLE": sample, **dict(zip(flags, on, strict=True))}
                    | blk,
                    storage,
                )
    for kind, logp in ((0, 0), (1, 0), (1, 1), (2, 0)):
        yield (
            transition._transition_reduce_kernel,
            {"KIND": kind, "LOGP": logp, "LOG_SQRT_2PI": LOG_SQRT_2PI, "NITER": 1, "PBLOCK": 128},
            {},
        )
    yield gaussian._sqdiff_partial_kernel, {"CHUNK": 4096, **blk}, {"a_ptr": bf16}
    for mode, mean in itertools.product((0, 1), (False, True)):
        yield (
            gaussian._gaussian_reduce_kernel,
            {"MODE": mode, "MEAN": mean, "LOG_SQRT_2PI": LOG_SQRT_2PI, "NITER": 2, "PBLOCK": 128},
            {},
        )
        yield gaussian._gaussian_bwd_kernel, {"MODE": mode, "MEAN": mean, **blk}, {"ga_ptr": bf16}
    for adaptive, has_ref in itertools.product((False, True), (False, True)):
        flags = {"ADAPTIVE": adaptive, "HAS_REF": has_ref}
        yield nft._nft_partial_kernel, {**flags, "CHUNK": 4096, **blk}, {"v_ptr": bf16}
        yield nft._nft_row_kernel, {**flags, "NITER": 1, "PBLOCK": 128}, {}
        yield nft._nft_bwd_kernel, {**flags, **blk}, {"gv_ptr": bf16}
    yield nft._batch_mean_kernel, {"NITER": 3, "PBLOCK": 128}, {}
    for in_mem in itertools.product((False, True), (False, True)):
        yield (
            random._randn_kernel,
            {"SEED_IN_MEMORY": in_mem[0], "OFFSET_IN_MEMORY": in_mem[1], **blk},
            {"seed_ptr": "*i64", "offset_ptr": "*i64", "out_ptr": bf16},
        )


def main(arch: int = 90) -> int:
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for fn, consts, storage in _variants():
        name = f"{fn.fn.__name__} {consts}"
        try:
            source = ASTSource(fn=fn, signature=_signature(fn, consts, storage), constexprs=consts)
        except TypeError as e:  # ASTSource's arguments changed across triton releases
            print(f"triton {triton.__version__}: ASTSource API not supported by this check ({e})")
            return 3
        try:
            compiled = triton.compile(source, target=target)
            assert "cubin" in compiled.asm or "ptx" in compiled.asm
            print("ok", name)
        except Exception:  # report every failing variant, then fail
            failures += 1
            print("FAIL", name)
            traceback.print_exc()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
