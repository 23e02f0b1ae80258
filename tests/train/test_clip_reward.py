"""The CLIP-score reward loads a local CLIP directory (a tiny random one written here) and scores images."""

import json
import string

import pytest
import torch


def _tiny_clip(path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tok.save_pretrained(path)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)


def test_clip_score_reward_from_local_dir(tmp_path):
    from train.rewards.registry import build_reward

    _tiny_clip(tmp_path)
    reward = build_reward("clip_score", clip_path=str(tmp_path))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    prompts = ["a red circle", "two squares", "a blue triangle"]
    score, comps = reward(images, prompts)
    assert score.shape == (3,) and torch.isfinite(score).all()
    assert (score.abs() <= 1 + 1e-5).all()  # cosine similarity
    again, _ = reward(images, prompts)
    torch.testing.assert_close(score, again)
    # the score depends on the image and on the text
    other, _ = reward(images.flip(0), prompts)
    assert not torch.allclose(score, other)


def test_clip_score_missing_dir(tmp_path):
    from train.rewards.registry import build_reward

    with pytest.raises(FileNotFoundError, match="--reward-clip-path"):
        build_reward("clip_score", clip_path=str(tmp_path / "nothing"))
