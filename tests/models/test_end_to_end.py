"""A whole local pipeline folder through every models/ piece: load, encode, attention, LoRA, a training step,
the reference / old predictions, save, and reload into a fresh diffusers model."""

import pytest
import torch

import models
from models import lora
from tests.models.test_text_vae import T5_LEN, _flux_pipeline, _sd3_pipeline


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipeline_folder_end_to_end(tmp_path, family):
    pipe = _sd3_pipeline(tmp_path) if family == "sd3" else _flux_pipeline(tmp_path)
    root = tmp_path / "pipe"
    pipe.save_pretrained(root)

    transformer = models.load_transformer(root)
    assert models.set_attention_backend(transformer, "auto") == "native"
    encoder = models.TextEncoder.from_pretrained(root, max_sequence_length=T5_LEN)
    vae = models.Vae.from_pretrained(root)
    lora.add_adapters(transformer, rank=4, alpha=8)
    den = models.as_denoiser(transformer)

    images = torch.rand(2, 3, 16, 16) * 2 - 1
    x0 = vae.encode(images)
    cond = encoder.encode(["a red cat", "two blue dogs"])
    sigma = torch.tensor([0.8, 0.3])
    noise = torch.randn_like(x0)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    opt = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        v = den(x_t, 1000 * sigma, cond)
        loss = (v - (noise - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the adapter learns the flow-matching target

    with torch.no_grad():
        v = den(x_t, 1000 * sigma, cond)
        with lora.adapters_disabled(transformer):
            v_ref = den(x_t, 1000 * sigma, cond)
        with lora.use_adapter(transformer, "old"):
            v_old = den(x_t, 1000 * sigma, cond)
    torch.testing.assert_close(v_old, v_ref, rtol=0, atol=0)  # old is still the (no-op) init
    assert (v - v_ref).abs().max() > 1e-4
    lora.ema_update_adapter(transformer, 0.5)
    with torch.no_grad(), lora.use_adapter(transformer, "old"):
        v_half = den(x_t, 1000 * sigma, cond)
    assert (v_half - v_ref).abs().max() > 0 and (v_half - v).abs().max() > 0

    lora.save_lora(transformer, tmp_path / "lora")
    fresh = lora.load_lora(models.load_transformer(root), tmp_path / "lora")
    with torch.no_grad():
        v_fresh = models.as_denoiser(fresh)(x_t, 1000 * sigma, cond)
    torch.testing.assert_close(v_fresh, v, rtol=1e-5, atol=1e-5)
    assert vae.decode(x0).shape == images.shape
