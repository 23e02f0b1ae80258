"""``kernels.preference_loss`` (Diffusion-DPO / MaPO) against ``kernels/reference.py``, forward and backward,
on each backend (on a CPU-only machine ``triton`` runs the kernels in Triton's interpreter), plus its
properties: determinism, batch-split invariance, gradients to the policy predictions only, the two DPO
conventions, the reference's own gradcheck in float64, validation, torch.library / torch.compile integration
and compilation for a CUDA target.  The transcriptions of the public reference losses are in
tests/fidelity/test_preference_losses.py.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference as ref

from .common import DTYPES, assert_close, backends, make

BACKENDS = backends()
ROOT = Path(__file__).resolve().parents[2]
# rank 4 odd shape (one reduction chunk per row), rank 2 long rows (3 chunks), rank 5
SHAPES = [(5, 3, 17, 19), (3, 9000), (2, 3, 4, 5, 6)]


def _pair_inputs(shape, dtype, err_scales=(0.2, 0.2), seed=0):
    """Targets and predictions off them by ``err_scales`` (winner, loser): errors ~ scale^2 with a per-sample
    spread, as a trained model's are; the reference model is off by the mean of the two scales."""
    s_w, s_l = err_scales
    s_r = 0.5 * (s_w + s_l)
    b = shape[0]
    per_row = torch.linspace(0.8, 1.25, b).reshape(b, *([1] * (len(shape) - 1)))
    t_w, t_l = make(shape, torch.float32, seed=seed + 1), make(shape, torch.float32, seed=seed + 2)
    noise = [make(shape, torch.float32, seed=seed + k) for k in (3, 4, 5, 6)]
    return {
        "pred_w": (t_w + s_w * per_row * noise[0]).to(dtype),
        "pred_l": (t_l + s_l * per_row.flip(0) * noise[1]).to(dtype),
        "target_w": t_w.to(dtype),
        "target_l": t_l.to(dtype),
        "ref_w": (t_w + s_r * noise[2]).to(dtype),
        "ref_l": (t_l + s_r * noise[3]).to(dtype),
    }


def _call(fn, form, **opts):
    """``fn(**tensors)`` -> the non-None outputs as a tuple (MaPO has no reference errors)."""

    def run(pred_w, pred_l, target_w, target_l, ref_w, ref_l):
        refs = {"ref_w": ref_w, "ref_l": ref_l} if form == "dpo" else {}
        out = fn(pred_w, pred_l, target_w, target_l, form=form, **refs, **opts)
        return tuple(o for o in out if o is not None)

    return run


def _ref_fn(pred_w, pred_l, target_w, target_l, *, form, **kw):
    """The reference with the API's defaults filled in (the reference takes resolved arguments)."""
    if form == "dpo":
        conv = kw.pop("dpo_convention", "salesforce")
        beta = kw.pop("beta", 5000.0 if conv == "salesforce" else 2500.0)
        return ref.preference_loss(
            pred_w, pred_l, target_w, target_l, form=form, beta=beta, dpo_convention=conv, **kw
        )
    kw.setdefault("beta", 0.1)
    return ref.preference_loss(pred_w, pred_l, target_w, target_l, form=form, **kw)


def forward_backward(fn, tensors, grad_names, upstream_seed=1234):
    """``common.forward_backward`` with the upstream gradients on the outputs' device (CPU or CUDA)."""
    leaves = {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in tensors.items()}
    outs = fn(**leaves)
    g = torch.Generator().manual_seed(upstream_seed)
    total = sum(
        (o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs if o.requires_grad
    )
    grads = dict(zip(grad_names, torch.autograd.grad(total, [leaves[k] for k in grad_names]), strict=True))
    return tuple(o.detach() for o in outs), grads


def _check(backend, form, tensors, dtype, grad_names=("pred_w", "pred_l"), **opts):
    with kernels.use_backend(backend):
        outs, grads = forward_backward(_call(kernels.preference_loss, form, **opts), tensors, grad_names)
    exp_outs, exp_grads = forward_backward(_call(_ref_fn, form, **opts), tensors, grad_names)
    assert len(outs) == len(exp_outs) == (5 if form == "dpo" else 3)
    assert outs[0].shape == () and all(o.dtype == torch.float32 for o in outs)
    for i, (o, e) in enumerate(zip(outs, exp_outs, strict=True)):
        # both backends read the same stored values and do fp32 math: only the summation order differs
        assert_close(o, e, torch.float32, name=f"output {i}")
    for k in grad_names:
        assert grads[k] is not None and grads[k].dtype == dtype, k
        assert float(exp_grads[k].abs().max()) > 0, f"grad {k}: the comparison would be vacuous"
        assert_close(grads[k], exp_grads[k], dtype, name=f"grad {k}")


FORMS = [
    ("dpo", {}),  # Salesforce convention, beta 5000 (SD1.5)
    ("dpo", {"beta": 100.0}),  # flow_grpo's SD3 recipe
    ("dpo", {"dpo_convention": "diffusers", "beta": 800.0}),
    ("mapo", {}),
]
FORM_IDS = ["dpo-5000", "dpo-100", "dpo-diffusers", "mapo"]
# every form and shape in fp32; the half-precision storage types on the odd 4-d and the 3-chunk shapes
CASES = [
    pytest.param(dtype, form, opts, shape, id=f"{fid}-{str(dtype)[6:]}-{shape}")
    for dtype in DTYPES
    for (form, opts), fid in zip(FORMS, FORM_IDS, strict=True)
    for shape in SHAPES
    if dtype == torch.float32 or (fid in ("dpo-5000", "mapo") and shape != SHAPES[2])
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,form,opts,shape", CASES)
def test_preference_loss_matches_reference(backend, dtype, form, opts, shape):
    _check(backend, form, _pair_inputs(shape, dtype), dtype, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "err_scales", [(1.2, 1.0), (0.4, 1.5), (1.5, 0.3)], ids=["both-large", "w-small", "l-small"]
)
def test_mapo_closed_form_branch_matches_reference(backend, err_scales):
    """Errors above 1 (``s err >= 0.5``) take the closed-form branch of ``f``; mixed pairs take one each."""
    tensors = _pair_inputs((4, 3, 11, 13), torch.float32, err_scales=err_scales)
    with kernels.use_backend("reference"):
        out = kernels.preference_loss(
            *(tensors[k] for k in ("pred_w", "pred_l", "target_w", "target_l")), form="mapo"
        )
    x = 0.5 * torch.cat([out.err_w, out.err_l])
    assert bool((x >= 0.5).any()), "no sample on the closed-form branch"
    _check(backend, "mapo", tensors, torch.float32, beta=0.3, snr_value=0.5, num_train_timesteps=50.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dpo", "mapo"])
def test_only_the_errors_or_only_the_loss_backpropagate(backend, form):
    """An unused output reaches the hand-written backward as None: errors only (an SFT-style term), or the
    loss only."""
    tensors = _pair_inputs((3, 2, 5, 7), torch.float32)
    refs = {"ref_w": tensors["ref_w"], "ref_l": tensors["ref_l"]} if form == "dpo" else {}

    def grads(bk, pick):
        pw, pl = tensors["pred_w"].clone().requires_grad_(), tensors["pred_l"].clone().requires_grad_()
        with kernels.use_backend(bk):
            out = kernels.preference_loss(pw, pl, tensors["target_w"], tensors["target_l"], form=form, **refs)
        return torch.autograd.grad(pick(out), (pw, pl), allow_unused=True)

    picks = [lambda o: 3.0 * o.err_w.sum() - o.err_l[1], lambda o: o.loss, lambda o: o.err_l.sum()]
    for pick in picks:
        got, expected = grads(backend, pick), grads("reference", pick)
        for g, e in zip(got, expected, strict=True):
            if e is None:
                assert g is None or float(g.abs().max()) == 0.0
            else:
                assert_close(g, e, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_flows_to_the_policy_predictions_only(backend):
    """The reference model's predictions are stop-gradients on every backend (as in the references); the
    targets are differentiable in the reference and refused by the Triton backend."""
    tensors = _pair_inputs((3, 2, 5, 7), torch.float32)
    leaves = {k: v.clone().requires_grad_(k.startswith(("pred", "ref"))) for k, v in tensors.items()}
    with kernels.use_backend(backend):
        out = kernels.preference_loss(**leaves, form="dpo", beta=100.0)
    out.loss.backward()
    assert leaves["pred_w"].grad is not None and float(leaves["pred_w"].grad.abs().max()) > 0
    assert leaves["pred_l"].grad is not None and float(leaves["pred_l"].grad.abs().max()) > 0
    assert leaves["ref_w"].grad is None and leaves["ref_l"].grad is None
    assert not out.err_w_ref.requires_grad and not out.err_l_ref.requires_grad
    targets = dict(tensors, target_l=tensors["target_l"].clone().requires_grad_())
    if backend == "triton":
        with kernels.use_backend("triton"), pytest.raises(NotImplementedError, match="target_l"):
            kernels.preference_loss(**targets, form="dpo")
        with torch.no_grad(), kernels.use_backend("triton"):  # no grad requested: fine
            kernels.preference_loss(**targets, form="dpo")
    else:
        with kernels.use_backend("reference"):
            loss = kernels.preference_loss(**targets, form="dpo", beta=100.0).loss
        (g,) = torch.autograd.grad(loss, targets["target_l"])
        assert float(g.abs().max()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dpo", "mapo"])
@pytest.mark.parametrize("shape", [(8, 3, 9, 11), (8, 9000)], ids=str)
def test_deterministic_and_rows_batch_invariant(backend, form, shape):
    """Same inputs -> the same bits (loss, errors, gradients); a row's errors do not depend on its batch; the
    batch loss is the mean of the one-row losses."""
    tensors = _pair_inputs(shape, torch.float32)
    names = ("pred_w", "pred_l", "target_w", "target_l") + (("ref_w", "ref_l") if form == "dpo" else ())

    def run(rows):
        leaves = {k: tensors[k][rows].clone().requires_grad_(k.startswith("pred")) for k in names}
        with kernels.use_backend(backend):
            out = kernels.preference_loss(**leaves, form=form, **({"beta": 300.0} if form == "dpo" else {}))
        out.loss.backward()
        return out, leaves["pred_w"].grad, leaves["pred_l"].grad

    a, b = run(slice(0, 8)), run(slice(0, 8))
    for x, y in zip(a[0], b[0], strict=True):
        assert x is None and y is None or torch.equal(x, y)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    for k in range(1, 5 if form == "dpo" else 3):
        parts = torch.cat([run(s)[0][k] for s in (slice(0, 3), slice(3, 8))])
        assert torch.equal(parts, a[0][k]), f"errors {k}"
    if shape[1] != 9000:  # eight more launches: once is enough
        singles = torch.stack([run(slice(i, i + 1))[0].loss for i in range(8)])
        torch.testing.assert_close(singles.mean(), a[0].loss, rtol=1e-6, atol=1e-7)


def test_dpo_conventions_are_the_same_loss():
    """Salesforce's ``-logsigmoid(-0.5 beta Delta)`` with beta 5000 is diffusers'
    ``-logsigmoid(-beta' Delta)`` with beta' 2500 (defaults included), bit for bit; the same beta in both
    conventions is not."""
    tensors = _pair_inputs((4, 3, 8, 8), torch.float32)
    for backend in BACKENDS:
        with kernels.use_backend(backend):
            sf = kernels.preference_loss(**tensors, form="dpo")
            sf_explicit = kernels.preference_loss(
                **tensors, form="dpo", beta=5000.0, dpo_convention="salesforce"
            )
            hf = kernels.preference_loss(**tensors, form="dpo", dpo_convention="diffusers")
            hf_explicit = kernels.preference_loss(
                **tensors, form="dpo", beta=2500.0, dpo_convention="diffusers"
            )
            hf_same_beta = kernels.preference_loss(
                **tensors, form="dpo", beta=5000.0, dpo_convention="diffusers"
            )
        for other in (sf_explicit, hf, hf_explicit):
            assert torch.equal(other.loss, sf.loss), backend
        assert abs(float(hf_same_beta.loss) - float(sf.loss)) > 1e-3


def test_reference_gradcheck_float64():
    """The reference's autograd in float64 (finite differences), both forms and both branches of MaPO's f.
    DPO's targets stay fixed: the reference errors depend on them through a stop-gradient."""
    shape = (3, 2, 4, 5)
    for form, scales, kw in (
        ("dpo", (0.3, 0.3), {"beta": 40.0, "dpo_convention": "salesforce"}),
        ("mapo", (0.3, 0.3), {"beta": 0.1, "num_train_timesteps": 1000.0}),
        ("mapo", (1.5, 0.3), {"beta": 0.2, "num_train_timesteps": 10.0}),
    ):
        t = {k: v.double() for k, v in _pair_inputs(shape, torch.float32, err_scales=scales).items()}
        names = ("pred_w", "pred_l") + (("target_w", "target_l") if form == "mapo" else ())
        fixed = {k: v for k, v in t.items() if k not in names and (form == "dpo" or not k.startswith("ref"))}

        def fn(*args, names=names, fixed=fixed, form=form, kw=kw):
            out = ref.preference_loss(**dict(zip(names, args, strict=True)), **fixed, form=form, **kw)
            return out.loss, out.err_w, out.err_l

        args = tuple(t[k].clone().requires_grad_() for k in names)
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_mapo_f_against_closed_form():
    """``mapo_f`` = ``x / expm1(x)`` in float64 to fp32 precision, ``f(0) = 1``, ``f'(0) = -1/2``, finite for
    large ``x``; the fp32 closed form the reference code evaluates loses ``eps / x`` near 0, ours does not."""
    x64 = torch.cat(
        [torch.logspace(-8, 0.5, 400, dtype=torch.float64), torch.tensor([0.5, 3.0, 40.0, 150.0])]
    )
    exact = x64 / torch.expm1(x64)
    ours = ref.mapo_f(x64.float()).double()
    normal = exact > 1e-30  # fp32's normal range (f(150) = 1e-63 flushes to 0)
    assert float(((ours - exact) / exact).abs()[normal].max()) < 4e-7
    assert float(ours[~normal].abs().max()) < 1e-37
    naive = (x64.float() / (torch.exp(x64.float()) - 1)).double()
    assert float(((naive - exact) / exact).abs()[:100].max()) > 1e-3  # what the series avoids
    x0 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    f0 = ref.mapo_f(x0)
    (g0,) = torch.autograd.grad(f0.sum(), x0)
    assert torch.equal(f0.detach(), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(g0, torch.full_like(g0, -0.5))
    big = torch.tensor([100.0, 1e4], requires_grad=True)
    fb = ref.mapo_f(big)
    (gb,) = torch.autograd.grad(fb.sum(), big)
    assert bool(torch.isfinite(fb).all() and torch.isfinite(gb).all())


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"form": "dpo", "ref_w": None}, ValueError, "ref_w / ref_l.*ref_l only"),
        ({"form": "kto"}, ValueError, "form: expected one of"),
        ({"form": "mapo"}, ValueError, "ref_w: MaPO uses no reference model"),
        ({"form": "dpo", "beta": 0.0}, ValueError, "beta: expected a value > 0"),
        ({"form": "dpo", "dpo_convention": "trl"}, ValueError, "dpo_convention"),
        ({"form": "dpo", "snr_value": 0.5}, ValueError, "snr_value: a MaPO option"),
        ({"form": "dpo", "target_l": "shape"}, ValueError, r"target_l: expected shape \(3, 2, 5\)"),
        ({"form": "dpo", "pred_l": "f64"}, TypeError, "pred_l: expected dtype float32"),
        ({"form": "dpo", "pred_w": "empty"}, ValueError, "pred_w: expected at least one sample"),
        ({"form": "dpo", "pred_w": "rank1"}, ValueError, "pred_w: expected a tensor of rank >= 2"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(kwargs, err, match):
    x = torch.empty(0, 2, 5) if kwargs.get("pred_w") == "empty" else make((3, 2, 5), torch.float32)
    args = {"pred_w": x, "pred_l": x, "target_w": x, "target_l": x, "ref_w": x, "ref_l": x}
    special = {
        "shape": make((3, 2, 6), torch.float32),
        "f64": x.double(),
        "empty": torch.empty(0, 2, 5),
        "rank1": torch.zeros(3),
    }
    for k, v in kwargs.items():
        args[k] = special.get(v, v) if isinstance(v, str) and k != "form" and k != "dpo_convention" else v
    if args["form"] == "mapo" and "ref_w" not in kwargs:
        args["ref_l"] = None
    with pytest.raises(err, match=match):
        kernels.preference_loss(**args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_custom_op_passes_opcheck():
    from kernels import ops

    t = _pair_inputs((3, 2, 5), torch.float32)
    pw, pl = t["pred_w"].clone().requires_grad_(), t["pred_l"].clone().requires_grad_()
    cases = [
        (pw, pl, t["target_w"], t["target_l"], t["ref_w"], t["ref_l"], ops.FORM_DPO, 50.0, 0.0, 0.5, 1000.0),
        (pw, pl, t["target_w"], t["target_l"], None, None, ops.FORM_MAPO, 0.0, 0.1, 0.5, 1000.0),
    ]
    for args in cases:
        torch.library.opcheck(
            ops.preference_loss_op.op,
            args,
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize("form", ["dpo", "mapo"])
def test_traces_under_torch_compile_fullgraph(form):
    """Forward and the hand-written backward trace with fullgraph=True through the fake kernels."""
    t = _pair_inputs((4, 3, 5), torch.float32)
    refs = {"ref_w": t["ref_w"], "ref_l": t["ref_l"]} if form == "dpo" else {}

    def step(pred_w, pred_l):
        out = kernels.preference_loss(pred_w, pred_l, t["target_w"], t["target_l"], form=form, **refs)
        return out.loss + 0.5 * out.err_w.sum(), out.err_l

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        pw, pl = t["pred_w"].clone().requires_grad_(), t["pred_l"].clone().requires_grad_()
        with kernels.use_backend("triton"):
            loss, err_l = fn(pw, pl)
        loss.backward()
        results.append((loss.detach(), err_l.detach(), pw.grad, pl.grad))
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_rows_spread_over_two_grid_axes(monkeypatch):
    """Five rows on a 2 x 3 row grid (CUDA's axis cap lowered to 2): same results, nothing written out of
    place."""
    from kernels.ops import _common

    t = _pair_inputs((5, 3, 7, 9), torch.float32)

    def run():
        pw, pl = t["pred_w"].clone().requires_grad_(), t["pred_l"].clone().requires_grad_()
        with kernels.use_backend("triton"):
            out = kernels.preference_loss(
                pw, pl, t["target_w"], t["target_l"], ref_w=t["ref_w"], ref_l=t["ref_l"]
            )
        (out.loss + out.err_l.sum()).backward()
        return tuple(out) + (pw.grad, pl.grad)

    expected = run()
    monkeypatch.setattr(_common, "MAX_GRID_1", 2)
    got = run()
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(g, e), f"output {i}"


# ------------------------------------------------------------------------------------------ compiled kernels
def _kernel_variants():
    """(kernel, constexprs, pointer storage types) of every variant the launch functions can request."""
    from kernels.ops import nft, preference

    blk = {"BLOCK": 1024}
    bf16 = "*bf16"
    for has_ref in (False, True):
        yield preference._pref_partial_kernel, {"HAS_REF": has_ref, "CHUNK": 4096, **blk}, {"pw_ptr": bf16}
    for form in (preference.FORM_DPO, preference.FORM_MAPO):
        yield preference._pref_row_kernel, {"FORM": form, "NITER": 1, "PBLOCK": 128}, {}
    for gloss, gerr in ((True, False), (False, True), (True, True)):
        yield (
            preference._pref_bwd_kernel,
            {"HAS_GLOSS": gloss, "HAS_GERR": gerr, **blk},
            {"pw_ptr": bf16, "tw_ptr": bf16, "gw_ptr": bf16},
        )
    yield nft._batch_mean_kernel, {"NITER": 3, "PBLOCK": 128}, {}


_FLOAT_ARGS = {"temp", "beta", "snr", "n_timesteps"}


def compile_for_cuda(arch: int = 90) -> int:
    """Compile every variant for ``sm_<arch>`` without a GPU (run with TRITON_INTERPRET unset)."""
    import traceback

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for fn, consts, storage in _kernel_variants():
        sig = {}
        for p in inspect.signature(fn.fn).parameters:
            if p in consts:
                sig[p] = "constexpr"
            elif p.endswith("_ptr"):
                sig[p] = storage.get(p, "*fp32")
            else:
                sig[p] = "fp32" if p in _FLOAT_ARGS else "i32"
        name = f"{fn.fn.__name__} {consts}"
        try:
            source = ASTSource(fn=fn, signature=sig, constexprs=consts)
        except TypeError as e:  # ASTSource's arguments changed across triton releases
            print(f"triton {triton.__version__}: ASTSource API not supported by this check ({e})")
            return 3
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
            assert "cubin" in compiled.asm or "ptx" in compiled.asm
            print("ok", name)
        except Exception:
            failures += 1
            print("FAIL", name)
            traceback.print_exc()
    return 1 if failures else 0


def _has_cuda_toolchain() -> bool:
    import shutil

    triton = pytest.importorskip("triton")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels compile and run in the tests")
@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_kernels_compile_for_cuda():
    """The compiled-mode checks the interpreter skips (types across constexpr branches, loop-carried
    types)."""
    if not _has_cuda_toolchain():
        pytest.skip("triton's bundled CUDA toolchain (ptxas) is not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys; from tests.kernels.test_preference import compile_for_cuda; sys.exit(compile_for_cuda())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if out.returncode == 3:
        pytest.skip(out.stdout.strip())
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert len(lines) == 8 and all(line.startswith("ok ") for line in lines), out.stdout


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["dpo", "mapo"])
@pytest.mark.parametrize("shape", [(5, 3, 17, 19), (4, 16, 64, 64)], ids=str)
def test_cuda_matches_reference_and_is_deterministic(form, dtype, shape):
    tensors = {k: v.cuda() for k, v in _pair_inputs(shape, dtype).items()}
    assert kernels.active_backend(tensors["pred_w"]) == "triton"
    _check("auto", form, tensors, dtype)
    refs = {"ref_w": tensors["ref_w"], "ref_l": tensors["ref_l"]} if form == "dpo" else {}
    a = kernels.preference_loss(
        tensors["pred_w"], tensors["pred_l"], tensors["target_w"], tensors["target_l"], form=form, **refs
    )
    b = kernels.preference_loss(
        tensors["pred_w"], tensors["pred_l"], tensors["target_w"], tensors["target_l"], form=form, **refs
    )
    for x, y in zip(a, b, strict=True):
        assert x is None and y is None or torch.equal(x, y)
