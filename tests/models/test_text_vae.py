"""models.text.TextEncoder and models.vae.Vae on tiny random pipelines saved with save_pretrained.

Tokenizers are built offline: a CLIPTokenizer from a written vocab.json/merges.txt and a T5 tokenizer from a
``tokenizers`` Unigram model (no sentencepiece file). The expected embeddings are diffusers' own
``encode_prompt`` on the same pipeline object.
"""

import json

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tok_models
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

import models
from models.text import TextEncoder
from models.vae import Vae

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CLIP_LEN = 12
T5_LEN = 9
PROMPTS = ["a red cat", "two blue dogs", "", "a red cat"]


def _clip_tokenizer(tmp):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    vocab["re"], vocab["red</w>"] = len(vocab), len(vocab) + 1
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=CLIP_LEN)


def _t5_tokenizer():
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in LETTERS] + [("\u2581" + c, -1.5) for c in LETTERS]
    tok = Tokenizer(tok_models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0)


def _clip(cls, hidden, proj, seed):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=60, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CLIP_LEN, projection_dim=proj,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return cls(cfg).eval()


def _t5(seed):
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=60, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=1)).eval()


def _vae(latent_channels, shift):
    torch.manual_seed(7)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                         scaling_factor=1.5305, shift_factor=shift).eval()


def _sd3_pipeline(tmp, with_t5=True):
    tok = _clip_tokenizer(tmp)
    return StableDiffusion3Pipeline(
        transformer=models.load_transformer("sd3-tiny", seed=0), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, 0.0609),
        text_encoder=_clip(CLIPTextModelWithProjection, 8, 12, 1), tokenizer=tok,
        text_encoder_2=_clip(CLIPTextModelWithProjection, 16, 20, 2), tokenizer_2=tok,
        text_encoder_3=_t5(3) if with_t5 else None, tokenizer_3=_t5_tokenizer() if with_t5 else None,
    )


def _flux_pipeline(tmp):
    return FluxPipeline(
        transformer=models.load_transformer("flux-tiny", seed=0), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, 0.1159), text_encoder=_clip(CLIPTextModel, 32, 32, 1), tokenizer=_clip_tokenizer(tmp),
        text_encoder_2=_t5(3), tokenizer_2=_t5_tokenizer(),
    )


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    pipe = _sd3_pipeline(tmp)
    pipe.save_pretrained(tmp / "pipe")
    return tmp / "pipe", pipe


def test_sd3_matches_diffusers_encode_prompt(sd3_dir):
    path, pipe = sd3_dir
    enc = TextEncoder.from_pretrained(path, max_sequence_length=T5_LEN)
    assert enc.family == "sd3"
    got = enc.encode(PROMPTS)
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=T5_LEN)
    assert got.prompt_embeds.shape == (4, CLIP_LEN + T5_LEN, 32) and got.pooled_embeds.shape == (4, 32)
    torch.testing.assert_close(got.prompt_embeds, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooled_embeds, want_pooled, rtol=1e-5, atol=1e-6)
    # CLIP features padded with zeros from 8 + 16 to the T5 width 32
    assert torch.count_nonzero(got.prompt_embeds[:, :CLIP_LEN, 24:]) == 0
    assert torch.count_nonzero(got.prompt_embeds[:, CLIP_LEN:]) > 0
    # the embeddings drive the transformer they were made for
    with torch.no_grad():
        out = models.as_denoiser(pipe.transformer)(torch.randn(4, 4, 8, 8), torch.full((4,), 500.0), got)
    assert out.shape == (4, 4, 8, 8)


def test_cache_encodes_each_prompt_once(sd3_dir):
    path, _ = sd3_dir
    enc = TextEncoder.from_pretrained(path, max_sequence_length=T5_LEN)
    calls = []
    original = enc.encode_uncached
    enc.encode_uncached = lambda prompts: calls.append(list(prompts)) or original(prompts)
    first = enc.encode(PROMPTS)
    second = enc.encode(["two blue dogs", "a red cat"])
    assert calls == [["a red cat", "two blue dogs", ""]]
    torch.testing.assert_close(second.prompt_embeds, first.prompt_embeds[[1, 0]], rtol=0, atol=0)
    torch.testing.assert_close(first.prompt_embeds[0], first.prompt_embeds[3], rtol=0, atol=0)
    uncond = enc.uncond(3)
    assert len(uncond) == 3 and calls == [["a red cat", "two blue dogs", ""]]
    torch.testing.assert_close(uncond.prompt_embeds[0], first.prompt_embeds[2], rtol=0, atol=0)
    assert not torch.equal(first.prompt_embeds[2], first.prompt_embeds[0])
    with pytest.raises(ValueError, match="prompts: expected a non-empty list of strings"):
        enc.encode([])


def test_sd3_without_t5_is_zeros_like_diffusers(tmp_path):
    pipe = _sd3_pipeline(tmp_path, with_t5=False)
    pipe.save_pretrained(tmp_path / "pipe")
    enc = TextEncoder.from_pretrained(tmp_path / "pipe", max_sequence_length=T5_LEN)
    got = enc.encode(PROMPTS[:2])
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS[:2], None, None,
                                                     do_classifier_free_guidance=False,
                                                     max_sequence_length=T5_LEN)
    torch.testing.assert_close(got.prompt_embeds, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooled_embeds, want_pooled, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(got.prompt_embeds[:, CLIP_LEN:]) == 0


def test_flux_matches_diffusers_encode_prompt(tmp_path):
    pipe = _flux_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "pipe")
    enc = TextEncoder.from_pretrained(tmp_path / "pipe", max_sequence_length=T5_LEN)
    assert enc.family == "flux"
    got = enc.encode(PROMPTS)
    with torch.no_grad():
        want, want_pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_LEN)
    assert got.prompt_embeds.shape == (4, T5_LEN, 32)
    torch.testing.assert_close(got.prompt_embeds, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooled_embeds, want_pooled, rtol=1e-5, atol=1e-6)


def test_text_errors(tmp_path, sd3_dir):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="family: expected one of"):
        TextEncoder.from_pretrained(sd3_dir[0], family="sdxl")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(FileNotFoundError, match="component folder .*tokenizer"):
        TextEncoder.from_pretrained(tmp_path)


def test_vae_scaling_and_shift(sd3_dir):
    path, pipe = sd3_dir
    vae = Vae.from_pretrained(path)
    assert (vae.scaling_factor, vae.shift_factor, vae.downsample_factor) == (1.5305, 0.0609, 2)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = vae.encode(images)
    with torch.no_grad():
        raw = pipe.vae.encode(images).latent_dist.mode()
        torch.testing.assert_close(latents, (raw - 0.0609) * 1.5305)
        decoded = vae.decode(latents)
        torch.testing.assert_close(decoded, pipe.vae.decode(raw).sample, rtol=1e-5, atol=1e-5)
    assert latents.shape == (2, 4, 8, 8) and decoded.shape == images.shape
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(vae.encode(images, sample=True, generator=g1),
                               vae.encode(images, sample=True, generator=g2))
    assert not torch.equal(vae.encode(images, sample=True), latents)


def test_vae_decode_is_differentiable(sd3_dir):
    vae = Vae.from_pretrained(sd3_dir[0])
    latents = torch.randn(1, 4, 4, 4, requires_grad=True)
    vae.decode(latents).square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_vae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae/config.json"):
        Vae.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ValueError, match="expected _class_name 'AutoencoderKL', got 'SD3Transformer2DModel'"):
        Vae.from_pretrained(tmp_path)
