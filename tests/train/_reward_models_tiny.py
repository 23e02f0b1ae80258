"""Tiny random-weight checkpoints of the HPS v2.1 (open_clip ViT-H-14 layout) and ImageReward (BLIP ViT-L +
med BERT + MLP layout) reward models, written with the real files' names and key names, so the rewards load
them as they load the real ones.  Widths and depths are small; head widths follow the real architectures
(ViT-H-14: 80 vision / 64 text; BLIP ViT-L: 64), as do patch sizes, the 224 input and the 77 / 35 token
contexts."""

from __future__ import annotations

import gzip
import json

import torch

# open_clip merges file: a header line, then one merge per line (no trailing newline, as the slice in
# SimpleTokenizer would otherwise add an empty merge for a short file)
BPE_MERGES = [
    "a b</w>",
    "r e",
    "re d</w>",
    "c i",
    "ci r",
    "cir c",
    "circ l",
    "circl e</w>",
    "t w",
    "tw o</w>",
]
N_BPE = 512 + len(BPE_MERGES) + 2
BERT_WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "red",
    "circle",
    "two",
    "square",
    "##s",
    "blue",
    "triangle",
    "green",
    "on",
    "the",
    "left",
    "of",
    ".",
    ",",
]


def _rand(g, *shape):
    """Standard normal values; ``g`` None (``seed=None``): an empty tensor on the meta device, for checking
    the real architectures' shapes without their memory."""
    if g is None:
        return torch.empty(shape, device="meta")
    return torch.randn(*shape, generator=g)


def _ln(g, d, prefix, out):
    out[prefix + "weight"] = 1.0 + 0.1 * _rand(g, d)
    out[prefix + "bias"] = 0.05 * _rand(g, d)


def _lin(g, d_out, d_in, prefix, out, bias=True):
    out[prefix + "weight"] = _rand(g, d_out, d_in) / d_in**0.5
    if bias:
        out[prefix + "bias"] = 0.05 * _rand(g, d_out)


def tiny_open_clip_state_dict(
    seed=0,
    v_width=160,
    v_layers=2,
    t_width=128,
    t_layers=2,
    embed=32,
    patch=14,
    image=224,
    ctx=77,
    vocab=N_BPE,
):
    """open_clip ``CLIP.state_dict()`` keys (as in HPS_v2.1_compressed.pt's ``state_dict``)."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    grid = image // patch
    sd["visual.class_embedding"] = 0.5 * _rand(g, v_width)
    sd["visual.positional_embedding"] = 0.5 * _rand(g, grid * grid + 1, v_width)
    sd["visual.proj"] = _rand(g, v_width, embed) / v_width**0.5
    sd["visual.conv1.weight"] = (
        _rand(g, v_width, 3, patch, patch) / (3 * patch * patch) ** 0.5
    )
    _ln(g, v_width, "visual.ln_pre.", sd)
    for tower, w, n in (
        ("visual.transformer.resblocks.", v_width, v_layers),
        ("transformer.resblocks.", t_width, t_layers),
    ):
        for i in range(n):
            p = f"{tower}{i}."
            _ln(g, w, p + "ln_1.", sd)
            sd[p + "attn.in_proj_weight"] = _rand(g, 3 * w, w) / w**0.5
            sd[p + "attn.in_proj_bias"] = 0.05 * _rand(g, 3 * w)
            _lin(g, w, w, p + "attn.out_proj.", sd)
            _ln(g, w, p + "ln_2.", sd)
            _lin(g, 4 * w, w, p + "mlp.c_fc.", sd)
            _lin(g, w, 4 * w, p + "mlp.c_proj.", sd)
    _ln(g, v_width, "visual.ln_post.", sd)
    sd["token_embedding.weight"] = _rand(g, vocab, t_width)
    sd["positional_embedding"] = 0.5 * _rand(g, ctx, t_width)
    _ln(g, t_width, "ln_final.", sd)
    sd["text_projection"] = _rand(g, t_width, embed) / t_width**0.5
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


def write_tiny_hps(folder, seed=0):
    """``folder/HPS_v2.1_compressed.pt`` (``{"state_dict": ...}``) and ``bpe_simple_vocab_16e6.txt.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = tiny_open_clip_state_dict(seed)
    torch.save({"epoch": 1, "state_dict": sd}, folder / "HPS_v2.1_compressed.pt")
    with gzip.open(folder / "bpe_simple_vocab_16e6.txt.gz", "wb") as f:
        f.write(("\n".join(["#version: 0.2"] + BPE_MERGES)).encode("utf-8"))
    return sd


def tiny_med_config(hidden=64, layers=2, heads=2, vocab=None):
    vocab = len(BERT_WORDS) + 2 if vocab is None else vocab  # + BLIP's [DEC], [ENC]
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "model_type": "bert",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab,
        "encoder_width": 768,
        "add_cross_attention": True,
    }


def tiny_imagereward_state_dict(med, seed=0, v_width=128, v_layers=2, patch=16, image=224, embed=16):
    """``ImageReward`` module keys (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``blip.vision_proj``,
    ``blip.text_proj``, ``mlp.layers.{0,2,4,6,7}``), with med's persistent ``position_ids`` buffer."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    grid = image // patch
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = 0.5 * _rand(g, 1, 1, v_width)
    sd[v + "pos_embed"] = 0.5 * _rand(g, 1, grid * grid + 1, v_width)
    sd[v + "patch_embed.proj.weight"] = (
        _rand(g, v_width, 3, patch, patch) / (3 * patch * patch) ** 0.5
    )
    sd[v + "patch_embed.proj.bias"] = 0.05 * _rand(g, v_width)
    for i in range(v_layers):
        p = f"{v}blocks.{i}."
        _ln(g, v_width, p + "norm1.", sd)
        _lin(g, 3 * v_width, v_width, p + "attn.qkv.", sd)
        _lin(g, v_width, v_width, p + "attn.proj.", sd)
        _ln(g, v_width, p + "norm2.", sd)
        _lin(g, 4 * v_width, v_width, p + "mlp.fc1.", sd)
        _lin(g, v_width, 4 * v_width, p + "mlp.fc2.", sd)
    _ln(g, v_width, v + "norm.", sd)
    h, inter = med["hidden_size"], med["intermediate_size"]
    t = "blip.text_encoder."
    sd[t + "embeddings.position_ids"] = torch.arange(med["max_position_embeddings"]).expand((1, -1))
    sd[t + "embeddings.word_embeddings.weight"] = _rand(g, med["vocab_size"], h)
    sd[t + "embeddings.position_embeddings.weight"] = 0.5 * _rand(g, med["max_position_embeddings"], h)
    _ln(g, h, t + "embeddings.LayerNorm.", sd)
    for i in range(med["num_hidden_layers"]):
        p = f"{t}encoder.layer.{i}."
        for att, kv in (("attention.", h), ("crossattention.", v_width)):
            _lin(g, h, h, p + att + "self.query.", sd)
            _lin(g, h, kv, p + att + "self.key.", sd)
            _lin(g, h, kv, p + att + "self.value.", sd)
            _lin(g, h, h, p + att + "output.dense.", sd)
            _ln(g, h, p + att + "output.LayerNorm.", sd)
        _lin(g, inter, h, p + "intermediate.dense.", sd)
        _lin(g, h, inter, p + "output.dense.", sd)
        _ln(g, h, p + "output.LayerNorm.", sd)
    _lin(g, embed, v_width, "blip.vision_proj.", sd)
    _lin(g, embed, h, "blip.text_proj.", sd)
    dims = [h, 1024, 128, 64, 16, 1]
    for idx, (d_in, d_out) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:], strict=True), strict=True):
        _lin(g, d_out, d_in, f"mlp.layers.{idx}.", sd)
    return sd


def write_tiny_imagereward(folder, seed=0):
    """``folder/ImageReward.pt`` (a plain state dict), ``med_config.json`` and a bert-style ``vocab.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    med = tiny_med_config()
    sd = tiny_imagereward_state_dict(med, seed)
    torch.save(sd, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n", encoding="utf-8")
    return sd, med
