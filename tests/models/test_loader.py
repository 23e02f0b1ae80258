"""models.load_transformer: local diffusers folders (model-only and pipeline-style), presets, clear errors."""

import json

import pytest
import torch

import models
from models.presets import PRESETS, preset_config


def _inputs(cls_name, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    cond = models.Conditioning(torch.randn(batch, 7, 32, generator=g), torch.randn(batch, 32, generator=g))
    return x, torch.tensor([999.0, 312.5])[:batch], cond


def _write_pipeline(root, model, component="transformer"):
    model.save_pretrained(root / component)
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             component: ["diffusers", type(model).__name__], "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("preset", ["sd3-tiny", "flux-tiny"])
@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_roundtrip_matches_original(tmp_path, preset, layout):
    original = models.load_transformer(preset, seed=3)
    if layout == "model":
        original.save_pretrained(tmp_path)
    else:
        _write_pipeline(tmp_path, original)
    loaded = models.load_transformer(tmp_path)
    assert type(loaded) is type(original)
    x, t, cond = _inputs(preset)
    with torch.no_grad():
        want = models.as_denoiser(original)(x, t, cond)
        got = models.as_denoiser(loaded)(x, t, cond)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dtype_is_applied(tmp_path):
    models.load_transformer("sd3-tiny").save_pretrained(tmp_path)
    loaded = models.load_transformer(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_preset_seed_is_deterministic():
    a = models.load_transformer("sd3-tiny", seed=0).state_dict()
    b = models.load_transformer("sd3-tiny", seed=0).state_dict()
    c = models.load_transformer("sd3-tiny", seed=1).state_dict()
    key = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


@pytest.mark.parametrize("name,cls_name,n_params", [
    ("sd3.5-medium", "SD3Transformer2DModel", 2_243_171_520),
    ("sd3.5-large", "SD3Transformer2DModel", 8_056_627_520),
    ("flux-dev", "FluxTransformer2DModel", 11_901_408_320),
])
def test_big_presets_on_meta(name, cls_name, n_params):
    model = models.load_transformer(name, device="meta")
    assert type(model).__name__ == cls_name
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_big_preset_hyperparameters():
    cfg = preset_config("sd3.5-medium")[1]
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"]) == (24, 24, 64)
    assert tuple(cfg["dual_attention_layers"]) == tuple(range(13)) and cfg["qk_norm"] == "rms_norm"
    assert cfg["pos_embed_max_size"] == 384 and cfg["caption_projection_dim"] == 1536
    cfg = preset_config("sd3.5-large")[1]
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["caption_projection_dim"]) == (38, 38, 2432)
    cfg = preset_config("flux-dev")[1]
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["num_attention_heads"]) == (19, 38, 24)
    assert cfg["guidance_embeds"] and tuple(cfg["axes_dims_rope"]) == (16, 56, 56)
    assert set(PRESETS) >= {"sd3.5-medium", "sd3.5-large", "flux-dev", "sd3-tiny", "flux-tiny"}


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        models.load_transformer(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_transformer("sd3.5-meduim")  # a typo of a preset is a path that does not exist


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="model_index.json.*config.json"):
        models.load_transformer(tmp_path)


def test_malformed_configs(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        models.load_transformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="_class_name.*AutoencoderKL"):
        models.load_transformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(FileNotFoundError, match="expected weights"):
        models.load_transformer(tmp_path)


def test_pipeline_without_denoiser_component(tmp_path):
    index = {"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'transformer' or 'unet'.*vae"):
        models.load_transformer(tmp_path)
    index = {"transformer": ["diffusers", "SD3Transformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="transformer/config.json"):
        models.load_transformer(tmp_path)


def test_bad_preset_name():
    with pytest.raises(ValueError, match="preset: expected one of"):
        preset_config("sd4")


def test_unet_pipeline_folder(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4).eval()
    _write_pipeline(tmp_path, unet, component="unet")
    loaded = models.load_transformer(tmp_path)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), models.Conditioning(torch.randn(1, 3, 32))
    # the reload is exact (safetensors round-trip); the forward is not guaranteed bit-equal across two module
    # instances (kernel choice, memory layout), so the outputs agree to fp32 rounding over the reductions: a
    # few ulps of the largest activation per level of the 2-level UNet, with room for the attention/conv sums
    want_sd, got_sd = unet.state_dict(), loaded.state_dict()
    assert want_sd.keys() == got_sd.keys()
    for k, v in want_sd.items():
        torch.testing.assert_close(got_sd[k], v, rtol=0, atol=0, msg=k)
    with torch.no_grad():
        want = models.as_denoiser(unet)(x, t, cond)
        got = models.as_denoiser(loaded)(x, t, cond)
    eps = torch.finfo(torch.float32).eps
    reduction = 3 * 3 * 16  # the widest conv: 3x3 kernel over 16 channels
    torch.testing.assert_close(got, want, rtol=0, atol=eps * reduction**0.5 * 8 * float(want.abs().max()))


def test_compiled_model_is_recognised():
    model = models.load_transformer("sd3-tiny")
    den = models.as_denoiser(torch.compile(model))
    assert den.prediction_type == "flow" and den.transformer._orig_mod is model
