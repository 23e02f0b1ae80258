"""The hpsv2.1 and imagereward rewards through the registry: local paths via --reward-paths, refusals before
work naming the option, batching, the differentiable contract (math.md §8.2, §8.3).  Tiny random checkpoints
in the real layout (_reward_models_tiny.py); fidelity to the reference scorers is in
tests/fidelity/test_reward_scorers_hps.py."""

from __future__ import annotations

import pytest
import torch

from ._reward_models_tiny import (
    tiny_imagereward_state_dict,
    tiny_open_clip_state_dict,
    write_tiny_hps,
    write_tiny_imagereward,
)

PROMPTS = ["a red circle", "two squares", "a blue triangle"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    write_tiny_hps(root / "hps")
    write_tiny_imagereward(root / "ir")
    return root


@pytest.fixture(scope="module")
def both(folders):
    from train.rewards.registry import build_reward

    return build_reward(
        ["hpsv2.1", "imagereward"],
        paths=[f"hpsv2.1={folders / 'hps' / 'HPS_v2.1_compressed.pt'}", f"imagereward={folders / 'ir'}"],
        device="cpu",
    )


def _images(seed, b=3, h=64, w=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_registered_and_differentiable(both):
    from train.rewards.registry import REWARD_NAMES, require_differentiable

    assert "hpsv2.1" in REWARD_NAMES and "imagereward" in REWARD_NAMES
    assert both.differentiable
    require_differentiable(both)  # does not raise
    assert both.fns["hpsv2.1"].name == "hpsv2.1" and both.fns["imagereward"].name == "imagereward"


def test_batched_equals_one_by_one_and_depends_on_prompt(both):
    images = _images(0)
    with torch.no_grad():
        _, comps = both(images, PROMPTS)
        for name, fn in both.fns.items():
            assert comps[name].shape == (3,) and comps[name].dtype == torch.float32
            single = torch.cat([fn(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
            torch.testing.assert_close(comps[name], single, atol=1e-5, rtol=0)
            other = fn(images, ["two squares"] * 3)
            assert not torch.allclose(other, comps[name])


def test_gradient_reaches_images(both):
    """With grad enabled the graph reaches the images through each reward, and one gradient step along it
    raises that reward (a first-order check that the gradient is the reward's, not noise)."""
    images = _images(1)
    for name, fn in both.fns.items():
        x = images.clone().requires_grad_(True)
        r = fn(x, PROMPTS)
        assert r.requires_grad and r.device == x.device
        (g,) = torch.autograd.grad(r.sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        step = 1e-2 / g.abs().max()
        with torch.enable_grad():
            x2 = (images + step * g).clone().requires_grad_(True)
            r2 = fn(x2, PROMPTS)
        assert (r2.detach() - r.detach()).sum() > 0, name


def test_no_grad_result_has_no_graph(both):
    with torch.no_grad():
        for fn in both.fns.values():
            assert not fn(_images(2, b=2), PROMPTS[:2]).requires_grad


def test_missing_entry_refused_naming_option(folders):
    from train.rewards.registry import build_reward

    for name in ("hpsv2.1", "imagereward"):
        with pytest.raises(ValueError, match=rf"--reward-paths: expected {name}="):
            build_reward(name, paths=[], device="cpu")


def test_wrong_paths_refused_naming_option(folders, tmp_path):
    from train.rewards.registry import build_reward

    with pytest.raises(FileNotFoundError, match="--reward-paths.*hpsv2.1.*no such file"):
        build_reward("hpsv2.1", paths=[f"hpsv2.1={tmp_path / 'nothing.pt'}"], device="cpu")
    with pytest.raises(FileNotFoundError, match="--reward-paths.*imagereward=DIR.*not a directory"):
        build_reward("imagereward", paths=[f"imagereward={tmp_path / 'nothing'}"], device="cpu")
    # a checkpoint without its tokenizer file beside it
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "HPS_v2.1_compressed.pt").write_bytes((folders / "hps" / "HPS_v2.1_compressed.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match="--reward-paths.*bpe_simple_vocab_16e6.txt.gz"):
        build_reward("hpsv2.1", paths=[f"hpsv2.1={lone}"], device="cpu")
    # an ImageReward folder without med_config.json
    ir = tmp_path / "ir"
    ir.mkdir()
    (ir / "ImageReward.pt").write_bytes((folders / "ir" / "ImageReward.pt").read_bytes())
    (ir / "vocab.txt").write_text((folders / "ir" / "vocab.txt").read_text())
    with pytest.raises(FileNotFoundError, match="--reward-paths.*without med_config.json"):
        build_reward("imagereward", paths=[f"imagereward={ir}"], device="cpu")


def test_wrong_checkpoint_refused_naming_option(folders, tmp_path):
    """Each reward's folder given to the other: refused by the key check, naming the option."""
    from train.rewards.registry import build_reward

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "HPS_v2.1_compressed.pt").write_bytes((folders / "ir" / "ImageReward.pt").read_bytes())
    (bad / "bpe_simple_vocab_16e6.txt.gz").write_bytes(
        (folders / "hps" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    )
    with pytest.raises(ValueError, match="--reward-paths: expected hpsv2.1=FILE, an open_clip ViT-H-14"):
        build_reward("hpsv2.1", paths=[f"hpsv2.1={bad}"], device="cpu")
    ir = tmp_path / "ir"
    ir.mkdir()
    torch.save(
        torch.load(folders / "hps" / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"],
        ir / "ImageReward.pt",
    )
    for n in ("med_config.json", "vocab.txt"):
        (ir / n).write_text((folders / "ir" / n).read_text())
    with pytest.raises(
        ValueError, match="--reward-paths: expected imagereward=DIR with THUDM's ImageReward.pt"
    ):
        build_reward("imagereward", paths=[f"imagereward={ir}"], device="cpu")


def test_bad_path_refused_before_any_model_loads(folders, monkeypatch):
    """build_reward runs every factory's path check first: a bad imagereward folder is refused before the
    (valid) hpsv2.1 model is built."""
    from train.rewards import hps
    from train.rewards.registry import build_reward

    def never(*a, **k):
        raise AssertionError("hpsv2.1 was loaded before the imagereward path was checked")

    monkeypatch.setattr(hps, "HPSv21", never)
    with pytest.raises(FileNotFoundError, match="--reward-paths.*imagereward=DIR"):
        build_reward(
            ["hpsv2.1", "imagereward"],
            paths=[f"hpsv2.1={folders / 'hps'}", f"imagereward={folders / 'nothing'}"],
            device="cpu",
        )


# THUDM/ImageReward@c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb train/src/config/med_config.json (the file
# ImageReward.load fetches beside ImageReward.pt)
REAL_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
    "encoder_width": 768, "add_cross_attention": True,
}  # fmt: skip


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("position_ids")}


def test_real_architectures_map_shape_for_shape():
    """The real checkpoints' shapes, on the meta device (no memory): HPS v2.1 = open_clip ViT-H-14 (vision
    1280 wide, 32 layers, patch 14; text 1024 wide, 24 layers, 49408 tokens, 77 positions; embedding 1024) and
    ImageReward = BLIP ViT-L/16 (1024 wide, 24 layers) + med BERT (768 wide, 12 layers, 30524 tokens) + MLP
    768-1024-128-64-16-1.  The inferred configs have the real head counts (16 / 16; 16 / 12) and every mapped
    tensor has the shape of the transformers module's parameter it loads into."""
    from transformers import BlipTextModel, BlipVisionModel, CLIPModel

    from train.rewards.hps import open_clip_to_hf
    from train.rewards.imagereward import blip_to_hf

    sd = tiny_open_clip_state_dict(
        seed=None, v_width=1280, v_layers=32, t_width=1024, t_layers=24, embed=1024, vocab=49408
    )
    cfg, mapped = open_clip_to_hf(sd)
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.num_attention_heads, vc.intermediate_size, vc.image_size, vc.patch_size) == (16, 5120, 224, 14)
    assert (tc.num_attention_heads, tc.intermediate_size, tc.max_position_embeddings) == (16, 4096, 77)
    with torch.device("meta"):
        clip = CLIPModel(cfg)
    assert _shapes(mapped) == _shapes(clip.state_dict())

    sd = tiny_imagereward_state_dict(REAL_MED_CONFIG, seed=None, v_width=1024, v_layers=24, embed=256)
    vcfg, vis, tcfg, txt, mlp = blip_to_hf(sd, REAL_MED_CONFIG)
    assert (vcfg.num_attention_heads, vcfg.num_hidden_layers, vcfg.image_size, vcfg.layer_norm_eps) == (
        16, 24, 224, 1e-6
    )
    assert (tcfg.num_attention_heads, tcfg.encoder_hidden_size, tcfg.vocab_size) == (12, 1024, 30524)
    assert [tuple(w.shape) for w, _ in mlp] == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    with torch.device("meta"):
        vision, text = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
    assert _shapes(vis) == _shapes(vision.state_dict())
    assert _shapes(txt) == _shapes(text.state_dict())
