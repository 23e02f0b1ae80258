"""models.patch: the DiT fast path on tiny SD3.5 (RMS qk-norm, dual attention, context-pre-only last block)
and FLUX (double + single stream blocks, rotary) transformers: same outputs, same LoRA gradients, exact
revert.

The ``triton`` runs use Triton's CPU interpreter (the root conftest sets ``TRITON_INTERPRET=1``); tiny
presets only.
"""

from __future__ import annotations

import pytest
import torch

import kernels
import models
from models import attention, lora
from models.patch import apply_fast_path, is_fast_path_applied, revert_fast_path

from ..kernels.common import backends

BACKENDS = backends()


@pytest.fixture(autouse=True)
def _auto_backend():
    with kernels.use_backend("auto"):
        yield


PRESETS = ["sd3-tiny", "flux-tiny"]
EXPECTED = {
    # 2 joint blocks (block 0 dual attention, block 1 context-pre-only), 10 RMS qk-norms, norm_out
    "sd3-tiny": {
        "JointTransformerBlock": 2,
        "SD35AdaLayerNormZeroX": 1,
        "AdaLayerNormZero": 2,
        "RMSNorm": 10,
        "AdaLayerNormContinuous": 2,
    },
    "flux-tiny": {
        "FluxTransformerBlock": 1,
        "FluxSingleTransformerBlock": 1,
        "AdaLayerNormZero": 2,
        "AdaLayerNormZeroSingle": 1,
        "AdaLayerNormContinuous": 1,
        "RMSNorm": 6,
        "FluxAttnProcessor": 2,
    },
}


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    cond = models.Conditioning(
        torch.randn(2, 7, 32, generator=g).to(dtype), torch.randn(2, 32, generator=g).to(dtype)
    )
    return x, torch.tensor([700.0, 30.0]), cond


def _name(backend) -> str:
    return str(getattr(backend, "value", backend))


def _model(preset, *, with_lora=False):
    model = models.load_transformer(preset, seed=0)
    if with_lora:
        lora.add_adapters(model, rank=4, alpha=8)
        with torch.no_grad():  # B starts at zero: make the adapter change the output
            g = torch.Generator().manual_seed(7)
            for p in lora.adapter_parameters(model, "default"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            lora.copy_adapter(model, "default", "old")
    return model


def _forward_backward(den, model, with_grad):
    if not with_grad:
        with torch.no_grad():
            return den(*_inputs()), None
    params = lora.adapter_parameters(model, "default")
    out = den(*_inputs())
    grads = torch.autograd.grad(out.square().mean(), params)
    return out.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_fast_path_matches_and_reverts_exactly(preset, backend):
    model = _model(preset)
    den = models.as_denoiser(model)
    want, _ = _forward_backward(den, model, False)
    counts = apply_fast_path(model)
    assert counts == EXPECTED[preset]
    assert is_fast_path_applied(model)
    with kernels.use_backend(backend):
        got, _ = _forward_backward(den, model, False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    revert_fast_path(model)
    assert not is_fast_path_applied(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    back, _ = _forward_backward(den, model, False)
    assert torch.equal(back, want)


@pytest.mark.parametrize("preset", PRESETS)
def test_fast_path_runs_the_fused_ops(preset, monkeypatch):
    """The patched model really goes through kernels.* (a broken op changes the output)."""
    kernels.set_backend("reference")  # restored by the autouse fixture below
    model = _model(preset)
    den = models.as_denoiser(model)
    apply_fast_path(model)
    calls = {"ada_layer_norm": 0, "gated_residual": 0, "rms_norm": 0, "rotary_emb": 0}
    for name in calls:
        real = getattr(kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    _forward_backward(den, model, False)
    assert calls["ada_layer_norm"] > 0 and calls["gated_residual"] > 0 and calls["rms_norm"] > 0
    assert (calls["rotary_emb"] > 0) == preset.startswith("flux")
    good, _ = _forward_backward(den, model, False)
    monkeypatch.setattr(kernels, "gated_residual", lambda x, y, gate: x + y)  # drop the gate
    bad, _ = _forward_backward(den, model, False)
    assert not torch.allclose(good, bad, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_fast_path_with_lora_gradients_match(preset, backend):
    model = _model(preset, with_lora=True)
    den = models.as_denoiser(model)
    want, want_grads = _forward_backward(den, model, True)
    with lora.use_adapter(model, "old"), torch.no_grad():
        want_old = den(*_inputs())
    apply_fast_path(model)
    with kernels.use_backend(backend):
        got, got_grads = _forward_backward(den, model, True)
        with lora.use_adapter(model, "old"), torch.no_grad():
            got_old = den(*_inputs())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_old, want_old, rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert any(float(w.abs().max()) > 0 for w in want_grads)
    revert_fast_path(model)
    back, back_grads = _forward_backward(den, model, True)
    assert torch.equal(back, want)
    assert all(torch.equal(g, w) for g, w in zip(back_grads, want_grads, strict=True))


@pytest.mark.parametrize("preset", PRESETS)
def test_fast_path_composes_with_attention_backend(preset):
    model = _model(preset)
    den = models.as_denoiser(model)
    want, _ = _forward_backward(den, model, False)
    attention.set_attention_backend(model, "_native_math")  # before patching: carried over
    apply_fast_path(model)
    backends_set = {_name(m.processor._attention_backend) for m in model.modules() if hasattr(m, "processor")}
    assert backends_set == {"_native_math"}
    attention.set_attention_backend(model, "sdpa")  # after patching: reaches the patched processors
    backends_set = {_name(m.processor._attention_backend) for m in model.modules() if hasattr(m, "processor")}
    assert backends_set == {"native"}
    got, _ = _forward_backward(den, model, False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    revert_fast_path(model)
    if preset.startswith("flux"):  # the original processors come back
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        assert all(type(m.processor) is FluxAttnProcessor for m in model.modules() if hasattr(m, "processor"))


@pytest.mark.parametrize("preset", PRESETS)
def test_fast_path_bf16_and_autocast_within_tolerance(preset):
    """bf16 weights and fp32 weights under bf16 autocast (the training recipe): within bf16 rounding."""
    model = _model(preset).to(torch.bfloat16)
    den = models.as_denoiser(model)
    x, t, cond = _inputs(torch.bfloat16)
    with torch.no_grad():
        want = den(x, t, cond).float()
        apply_fast_path(model)
        got = den(x, t, cond).float()
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * scale)
    model = _model(preset)
    den = models.as_denoiser(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = den(*_inputs()).float()
        apply_fast_path(model)
        got = den(*_inputs()).float()
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * float(want.abs().max()))


def test_fast_path_traces_under_torch_compile():
    """The patched FLUX model (custom ops with fake kernels) traces under dynamo + AOT autograd."""
    torch._dynamo.reset()
    model = _model("flux-tiny", with_lora=True)
    den = models.as_denoiser(model)
    want, want_grads = _forward_backward(den, model, True)
    apply_fast_path(model)
    compiled = torch.compile(den, backend="aot_eager")
    got, got_grads = _forward_backward(compiled, model, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_instance_level_forward_wrappers_are_left_alone():
    """A module whose forward is wrapped on the instance (accelerate hooks) keeps its wrapper."""
    model = _model("sd3-tiny")
    norm = model.norm_out
    calls = []

    def hooked(*args, _orig=norm.forward, **kwargs):
        calls.append(1)
        return _orig(*args, **kwargs)

    norm.forward = hooked
    counts = apply_fast_path(model)
    assert counts["AdaLayerNormContinuous"] == EXPECTED["sd3-tiny"]["AdaLayerNormContinuous"] - 1
    assert norm.forward is hooked
    _forward_backward(models.as_denoiser(model), model, False)
    assert calls == [1]
    revert_fast_path(model)
    assert norm.forward is hooked


def test_errors():
    model = _model("sd3-tiny")
    with pytest.raises(ValueError, match="transformer: expected a model patched by apply_fast_path"):
        revert_fast_path(model)
    apply_fast_path(model)
    with pytest.raises(ValueError, match="already patched"):
        apply_fast_path(model)
    with pytest.raises(ValueError, match="nothing to patch"):
        apply_fast_path(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="transformer: expected a torch.nn.Module"):
        apply_fast_path("sd3-tiny")


# ----------------------------------------------------------------------------------------------------------
# GPU: compiled Triton kernels in bf16, torch.compile (inductor) with LoRA, CUDA-graph replay
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_bf16_fast_path_with_lora_and_compile(preset, monkeypatch, cudnn_sdp_restored):
    # training's attention setting: cuDNN SDPA's bf16 backward gave NaN gradients for flux-tiny on an H200
    monkeypatch.delenv("NFT_CUDNN_SDPA", raising=False)
    models.disable_cudnn_sdpa()
    model = _model(preset, with_lora=True).to("cuda")
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    den = models.as_denoiser(model)
    x, t, cond = _inputs()
    x, t = x.cuda(), t.cuda()
    cond = models.Conditioning(cond.prompt_embeds.cuda(), cond.pooled_embeds.cuda())
    params = lora.adapter_parameters(model, "default")

    def run(fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x, t, cond)
        return out.float().detach(), torch.autograd.grad(out.float().square().mean(), params)

    want, want_grads = run(den)
    apply_fast_path(model)
    got, got_grads = run(den)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * scale)
    compiled, compiled_grads = run(torch.compile(den))
    torch.testing.assert_close(compiled, got, rtol=0, atol=0.05 * scale)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0.1, atol=0.05 * float(w.abs().max()) + 1e-6)
