"""models.as_denoiser: each adapter reproduces the call its diffusers pipeline makes."""

import pytest
import torch
from diffusers import FluxPipeline, UNet2DConditionModel

import models
from models.denoiser import flux_image_ids, pack_latents, unpack_latents


def _cond(batch, length=7, width=32, pooled=32):
    g = torch.Generator().manual_seed(2)
    return models.Conditioning(torch.randn(batch, length, width, generator=g),
                               torch.randn(batch, pooled, generator=g))


def test_sd3_matches_direct_call():
    transformer = models.load_transformer("sd3-tiny", seed=0)
    den = models.as_denoiser(transformer)
    assert den.prediction_type == "flow"
    x, t, cond = torch.randn(3, 4, 16, 16), torch.tensor([1000.0, 437.25, 1.5]), _cond(3)
    with torch.no_grad():
        got = den(x, t, cond)
        want = transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt_embeds,
                           pooled_projections=cond.pooled_embeds).sample
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # float timesteps are not truncated: 437.25 and 437.0 give different predictions
    with torch.no_grad():
        other = den(x, torch.tensor([1000.0, 437.0, 1.5]), cond)
    assert not torch.allclose(other[1], got[1])


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_flux_matches_pipeline_convention(guidance):
    transformer = models.load_transformer("flux-tiny", seed=0)
    den = models.as_denoiser(transformer, guidance=guidance)
    assert den.prediction_type == "flow"
    b, h, w = 2, 6, 10
    x, t, cond = torch.randn(b, 4, h, w), torch.tensor([900.0, 125.5]), _cond(b)
    # what FluxPipeline.__call__ does for one step
    packed = FluxPipeline._pack_latents(x, b, 4, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 3)
    with torch.no_grad():
        out = transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.full([b], guidance),
                          pooled_projections=cond.pooled_embeds, encoder_hidden_states=cond.prompt_embeds,
                          txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        want = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
        got = den(x, t, cond)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        other = models.as_denoiser(transformer, guidance=guidance + 2.0)(x, t, cond)
    assert not torch.allclose(other, got)  # guidance reaches the model


def test_flux_packing_helpers():
    x = torch.randn(2, 3, 4, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 6, 12)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 3, 4, 6))
    torch.testing.assert_close(unpack_latents(tokens, 4, 6), x)
    torch.testing.assert_close(flux_image_ids(4, 6, "cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even latent height"):
        pack_latents(torch.randn(1, 3, 5, 6))


def test_flux_rejects_wrong_channels():
    den = models.as_denoiser(models.load_transformer("flux-tiny"))
    with pytest.raises(ValueError, match="expected 4 latent channels"):
        den(torch.randn(1, 3, 4, 4), torch.tensor([10.0]), _cond(1))


def test_unet_epsilon():
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4).eval()
    den = models.as_denoiser(unet)
    assert den.prediction_type == "epsilon"
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 20.0]), _cond(2)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=cond.prompt_embeds).sample
        torch.testing.assert_close(den(x, t, cond), want, rtol=0, atol=0)


def test_errors_and_passthrough():
    with pytest.raises(ValueError, match="model: expected a diffusers.*got Linear"):
        models.as_denoiser(torch.nn.Linear(2, 2))
    den = models.as_denoiser(models.load_transformer("sd3-tiny"))
    assert models.as_denoiser(den) is den
    with pytest.raises(ValueError, match="pooled_embeds: expected"):
        den(torch.randn(1, 4, 16, 16), torch.tensor([1.0]), models.Conditioning(torch.randn(1, 7, 32)))
    with pytest.raises(ValueError, match=r"timestep: expected a scalar or shape \[1\]"):
        den(torch.randn(1, 4, 16, 16), torch.tensor([1.0, 2.0]), _cond(1))
