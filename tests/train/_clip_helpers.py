"""Tiny random-weight CLIP checkpoints in the real on-disk layout (config.json + weights from
``save_pretrained``, an offline character-level CLIP tokenizer, a legacy-format preprocessor_config.json like
openai/clip-vit-large-patch14's and laion/CLIP-ViT-H-14's) and a random LAION aesthetic head saved with the
real file's state-dict keys, for the model-reward tests."""

from __future__ import annotations

import json
import string

import torch

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def write_tokenizer(path, max_length: int = 77) -> None:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(path)


def write_processor(path, size: int) -> None:
    """The legacy preprocessor_config.json of the real CLIP checkpoints (ints for size and crop_size)."""
    cfg = {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": OPENAI_MEAN,
        "image_std": OPENAI_STD,
        "resample": 3,
        "size": size,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(cfg))


def write_clip(path, *, projection_dim: int = 8, image_size: int = 32, seed: int = 0,
               processor: bool = True, tokenizer: bool = True) -> None:
    """A tiny ``CLIPModel`` (1 layer, width 16) saved with ``save_pretrained``; the tokenizer and processor
    beside it unless told otherwise."""
    from transformers import CLIPConfig, CLIPModel

    path.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        write_tokenizer(path)
    if processor:
        write_processor(path, image_size)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=2 + 2 * 26, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    with torch.no_grad():  # a logit scale other than the init value, as a trained checkpoint has
        model.logit_scale.fill_(4.6052)
    model.save_pretrained(path)


def write_aesthetic_head(file, seed: int = 0) -> dict:
    """A random head with the keys and shapes of sac+logos+ava1-l14-linearMSE.pth (``layers.{0,2,4,6,7}``)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for i, (o, n) in shapes.items():
        state[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n**0.5
        state[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    torch.save(state, file)
    return state


def images(b: int = 3, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random images in [-1, 1] (a low-resolution field upsampled, plus a little noise), not
    square, so the resize and the centre crop both act."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 6, 7, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.randn(b, 3, h, w, generator=g)).clamp(-0.95, 0.95)


PROMPTS = ["a red circle", "two blue squares", "a cat on a mat"]
