"""models.attention: backend names, errors for missing libraries, SD3 routed through diffusers' dispatch."""

import pytest
import torch

import models
from models import attention
from models.attention import JointAttnDispatchProcessor


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = models.Conditioning(torch.randn(2, 7, 32, generator=g), torch.randn(2, 32, generator=g))
    return x, torch.tensor([700.0, 30.0]), cond


@pytest.mark.parametrize("preset", ["sd3-tiny", "flux-tiny"])
@pytest.mark.parametrize("backend", ["sdpa", "auto", "native", "_native_math"])
def test_cpu_backends_match_default(preset, backend):
    model = models.load_transformer(preset, seed=0)
    den = models.as_denoiser(model)
    with torch.no_grad():
        want = den(*_inputs())
    used = attention.set_attention_backend(model, backend)
    assert used == ("native" if backend in ("sdpa", "auto") else backend)
    with torch.no_grad():
        got = den(*_inputs())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    backends = {m.processor._attention_backend for m in model.modules() if hasattr(m, "processor")}
    assert backends == {used}


def test_sd3_runs_through_dispatch(monkeypatch):
    model = models.load_transformer("sd3-tiny", seed=0)
    attention.set_attention_backend(model, "sdpa")
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    # 2 joint attentions + the dual-attention block's attn2
    assert len(processors) == 3 and all(isinstance(p, JointAttnDispatchProcessor) for p in processors)
    calls = []
    real = attention.dispatch_attention_fn

    def spy(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "dispatch_attention_fn", spy)
    with torch.no_grad():
        models.as_denoiser(model)(*_inputs())
    assert len(calls) == 3 and {str(getattr(c, "value", c)) for c in calls} == {"native"}


@pytest.mark.parametrize("backend,library", [("flash", "flash-attn"), ("xformers", "xformers"),
                                             ("flash3", "flash-attn 3")])
def test_missing_library_is_a_clear_error(monkeypatch, backend, library):
    monkeypatch.setattr(attention, "available_backends",
                        lambda: {"native": True, "flash": False, "_flash_3": False, "xformers": False})
    model = models.load_transformer("sd3-tiny")
    with pytest.raises(ImportError, match=rf"backend '{backend}' needs {library}.*not installed"):
        attention.set_attention_backend(model, backend)


def test_installed_flash_still_needs_cuda_and_half_precision(monkeypatch):
    monkeypatch.setattr(attention, "available_backends",
                        lambda: {"native": True, "flash": True, "_flash_3": False, "xformers": True})
    model = models.load_transformer("sd3-tiny")
    with pytest.raises(ValueError, match="expected the model on a CUDA device, got cpu"):
        attention.set_attention_backend(model, "flash")
    assert attention.resolve_backend("flash") == "flash"
    assert attention.resolve_backend("auto", model) == "native"  # CPU


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend: expected 'auto', 'sdpa'.*got 'cuda-magic'"):
        attention.set_attention_backend(models.load_transformer("sd3-tiny"), "cuda-magic")


@pytest.mark.gpu
def test_auto_on_cuda_bf16():
    model = models.load_transformer("sd3-tiny", dtype=torch.bfloat16, device="cuda")
    used = attention.set_attention_backend(model, "auto")
    assert used in ("native", "flash", "_flash_3")
    x, t, cond = _inputs()
    with torch.no_grad():
        out = models.as_denoiser(model)(x.cuda().bfloat16(), t.cuda(), cond.to("cuda", torch.bfloat16))
    assert torch.isfinite(out).all()


def test_unet_processors_without_dispatch(monkeypatch):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4)
    assert attention.set_attention_backend(unet, "sdpa") == "native"
    monkeypatch.setattr(attention, "available_backends",
                        lambda: {"native": True, "flash": False, "_flash_3": False, "xformers": False})
    with pytest.raises(ValueError, match="ignore diffusers' dispatch.*only 'sdpa'"):
        attention.set_attention_backend(unet, "_native_math")


def test_training_turns_cudnn_sdpa_off_unless_asked_to_keep_it(monkeypatch, cudnn_sdp_restored):
    cuda = torch.backends.cuda
    others = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled())
    torch.backends.cuda.enable_cudnn_sdp(True)
    monkeypatch.setenv("NFT_CUDNN_SDPA", "1")
    assert models.disable_cudnn_sdpa() is False
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.delenv("NFT_CUDNN_SDPA")
    assert models.disable_cudnn_sdpa() is True
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert models.disable_cudnn_sdpa() is False  # already off
    # the other backends are left as they were
    assert (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled()) == others


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["sd3-tiny", "flux-tiny"])
def test_bf16_lora_gradients_are_finite_on_cuda_with_the_training_setting(preset, cudnn_sdp_restored):
    """The H200 run's failure: with cuDNN SDPA (torch 2.11's default on Hopper) the tiny FLUX model's LoRA
    gradients were NaN in bf16 autocast; with the setting training uses they are finite."""
    from models import lora

    model = models.load_transformer(preset, seed=0).to("cuda")
    lora.add_adapters(model, rank=4, alpha=8)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in lora.adapter_parameters(model, "default"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    models.disable_cudnn_sdpa()
    den = models.as_denoiser(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g).cuda()
    cond = models.Conditioning(
        torch.randn(2, 7, 32, generator=g).cuda(), torch.randn(2, 32, generator=g).cuda()
    )
    params = lora.adapter_parameters(model, "default")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = den(x, torch.tensor([700.0, 30.0], device="cuda"), cond)
    grads = torch.autograd.grad(out.float().square().mean(), params)
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert any(float(gr.abs().max()) > 0 for gr in grads)
