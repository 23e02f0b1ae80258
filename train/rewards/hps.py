"""HPS v2.1 reward: the Human Preference Score v2.1 checkpoint (an open_clip ViT-H-14 state dict) from a local
file, scored as ``tgxs002/HPSv2@866735ecaae999fa714bd9edfa05aa2672669ee3 hpsv2/img_score.py`` does (math.md
§8.2).

``score = <f_img / |f_img|, f_txt / |f_txt|>`` (the diagonal of ``image_features @ text_features.T``; no logit
scale), with HPSv2's validation preprocessing (``hpsv2/src/open_clip/transform.py`` ``image_transform(..,
is_train=False)``): ``ToTensor`` -> ``Resize(224, bicubic)`` on the *tensor* (torchvision's tensor resize:
``F.interpolate(.., "bicubic", align_corners=False, antialias=True)``, shorter side to 224) ->
``CenterCrop(224)`` -> normalise with the OpenAI mean/std.  Its tokenizer is open_clip's ``SimpleTokenizer``
(transcribed below from ``hpsv2/src/open_clip/tokenizer.py``; 77 tokens, zero padded).

The open_clip package itself is not used: it requires torchvision (and timm), which do not import beside this
project's torch build.  The checkpoint's open_clip keys are mapped onto transformers' ``CLIPModel`` instead
(the same weights, the layout of ``huggingface/transformers@8ed5bffc7d24d63cfe85d24469ee48fb5804270f
src/transformers/models/clip/convert_clip_original_pytorch_to_hf.py``: ``in_proj_weight`` split into
q/k/v, ``proj`` / ``text_projection`` transposed into linear weights, GELU activations, argmax-of-token-id
text pooling as open_clip's ``text.argmax(dim=-1)``).

Differentiable: when grad is enabled and the images require grad, the preprocessing runs on the float images
(no uint8 rounding), so the graph reaches the images; otherwise the images are first rounded to uint8 as the
reference's PIL input is.  Both paths are the same torch ops after that rounding.
"""

from __future__ import annotations

import gzip
import html
import re as _re
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["HPSv21", "OpenClipTokenizer", "hps_preprocess", "open_clip_to_hf", "OPENAI_MEAN", "OPENAI_STD"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip ViT-H-14 (hpsv2/src/open_clip/model_configs/ViT-H-14.json): vision head_width 80; the text tower's
# 1024 wide with 16 heads, i.e. 64 per head.  Neither is visible in the state dict's shapes.
VISION_HEAD_WIDTH = 80
TEXT_HEAD_WIDTH = 64
CHECKPOINT_NAMES = ("HPS_v2.1_compressed.pt",)
BPE_NAMES = ("bpe_simple_vocab_16e6.txt.gz", "bpe_simple_vocab_16e6.txt")
OPTION = "--reward-paths"


# ----------------------------------------------------------------------------------------------------------
# open_clip's SimpleTokenizer (hpsv2/src/open_clip/tokenizer.py), transcribed.
# ----------------------------------------------------------------------------------------------------------


@lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _get_pairs(word):
    return {(a, b) for a, b in zip(word[:-1], word[1:], strict=True)}


_FTFY_WARNED = False


def _basic_clean(text: str) -> str:
    """``ftfy.fix_text`` then two ``html.unescape``.  Without ftfy (the ``rewards`` extra) only its NFC
    normalisation is applied, which is the same on text without mojibake, curly quotes, ligatures or
    full-width characters; a warning says so once."""
    global _FTFY_WARNED
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        if not _FTFY_WARNED:
            warnings.warn(
                "hpsv2.1: ftfy is not installed (pip install 'nft-engine[rewards]'); prompts are cleaned "
                "with NFC normalisation only, as ftfy does on plain text",
                stacklevel=3,
            )
            _FTFY_WARNED = True
        text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _whitespace_clean(text: str) -> str:
    return _re.sub(r"\s+", " ", text).strip()


class OpenClipTokenizer:
    """open_clip's byte-level BPE tokenizer from its ``bpe_simple_vocab_16e6.txt.gz`` merges file:
    ``[<start_of_text>] + bpe(clean(text).lower()) + [<end_of_text>]``, truncated to ``context_length`` with
    the last token forced to ``<end_of_text>``, zero padded."""

    def __init__(self, bpe_path: str | Path, context_length: int = 77):
        import regex

        p = Path(bpe_path)
        raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
        merges = raw.decode("utf-8").split("\n")
        merges = merges[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(_bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab]
        for m in merges:
            vocab.append("".join(m))
        special = ["<start_of_text>", "<end_of_text>"]
        vocab.extend(special)
        self.byte_encoder = _bytes_to_unicode()
        self.encoder = dict(zip(vocab, range(len(vocab)), strict=True))
        self.bpe_ranks = dict(zip(merges, range(len(merges)), strict=True))
        self.cache = {t: t for t in special}
        self.pat = regex.compile(
            "|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self._regex = regex
        self.vocab_size = len(self.encoder)
        self.sot = self.encoder["<start_of_text>"]
        self.eot = self.encoder["<end_of_text>"]
        self.context_length = context_length

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _get_pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        text = _whitespace_clean(_basic_clean(text)).lower()
        for token in self._regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot] + self.encode(str(t)) + [self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            out[i, : len(ids)] = torch.tensor(ids)
        return out


# ----------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------


def hps_preprocess(x01: torch.Tensor, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """HPSv2's validation transform on a float batch in [0, 1] (after ``ToTensor``): torchvision's tensor
    ``Resize(size, BICUBIC)`` (shorter side to ``size``, the longer ``int(size * long / short)``; antialiased,
    unclamped; skipped when already that size) -> ``CenterCrop(size)`` -> ``Normalize(mean, std)``."""
    h, w = x01.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        x01 = F.interpolate(x01, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    x01 = x01[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - m) / s


# ----------------------------------------------------------------------------------------------------------
# open_clip state dict -> transformers CLIPModel
# ----------------------------------------------------------------------------------------------------------


def _count_blocks(sd, prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def open_clip_to_hf(sd: dict[str, torch.Tensor]):
    """An open_clip ViT (``visual.*`` + text tower) state dict -> ``(CLIPConfig, HF state dict)``.  Shapes
    give widths, depths, patch and image size, context length and vocabulary; head counts follow ViT-H-14's
    head widths (80 vision, 64 text).  A key this mapping does not know is refused, never dropped silently."""
    from transformers import CLIPConfig

    need = (
        "visual.conv1.weight",
        "visual.positional_embedding",
        "visual.proj",
        "token_embedding.weight",
        "positional_embedding",
        "text_projection",
        "ln_final.weight",
    )
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(
            f"{OPTION}: expected hpsv2.1=FILE, an open_clip ViT-H-14 state dict (HPS_v2.1_compressed.pt), "
            f"got a checkpoint without {', '.join(missing)}"
        )
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = int(round((n_pos - 1) ** 0.5))
    embed_dim = sd["visual.proj"].shape[1]
    vocab, t_width = sd["token_embedding.weight"].shape
    ctx = sd["positional_embedding"].shape[0]
    v_layers = _count_blocks(sd, "visual.transformer.resblocks.")
    t_layers = _count_blocks(sd, "transformer.resblocks.")
    v_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    t_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=t_width,
            intermediate_size=t_mlp,
            num_hidden_layers=t_layers,
            num_attention_heads=t_width // TEXT_HEAD_WIDTH,
            max_position_embeddings=ctx,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=embed_dim,
            # eos_token_id 2 selects transformers' argmax-of-token-id pooling: open_clip's text.argmax(dim=-1)
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=v_width,
            intermediate_size=v_mlp,
            num_hidden_layers=v_layers,
            num_attention_heads=v_width // VISION_HEAD_WIDTH,
            image_size=grid * patch,
            patch_size=patch,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=embed_dim,
        ),
        projection_dim=embed_dim,
    )

    out: dict[str, torch.Tensor] = {}
    block_map = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    top_map = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    unknown = []
    for k, v in sd.items():
        if k in top_map:
            out[top_map[k]] = v
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif k == "attn_mask":  # open_clip's causal mask buffer; transformers builds its own
            continue
        elif k.startswith(("visual.transformer.resblocks.", "transformer.resblocks.")):
            tower, rest = (
                ("vision_model", k[len("visual.transformer.resblocks.") :])
                if k.startswith("visual.")
                else ("text_model", k[len("transformer.resblocks.") :])
            )
            i, _, name = rest.partition(".")
            base = f"{tower}.encoder.layers.{i}."
            if name.startswith("attn.in_proj_"):
                kind = name.rsplit("_", 1)[1]  # weight | bias
                q, kk, vv = v.chunk(3, dim=0)
                out[base + f"self_attn.q_proj.{kind}"] = q.contiguous()
                out[base + f"self_attn.k_proj.{kind}"] = kk.contiguous()
                out[base + f"self_attn.v_proj.{kind}"] = vv.contiguous()
                continue
            mod, _, kind = name.rpartition(".")
            if mod not in block_map:
                unknown.append(k)
                continue
            out[base + f"{block_map[mod]}.{kind}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(
            f"{OPTION}: expected hpsv2.1=FILE, an open_clip ViT-H-14 state dict, got unknown keys "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    return cfg, out


def resolve_paths(path: str | None) -> tuple[Path, Path]:
    """``hpsv2.1=FILE_OR_DIR`` -> (checkpoint, bpe merges file), refusing what is not there by the option."""
    if not path:
        raise ValueError(
            f"{OPTION}: expected hpsv2.1=FILE_OR_DIR (HPS_v2.1_compressed.pt, beside open_clip's "
            f"bpe_simple_vocab_16e6.txt.gz) for the hpsv2.1 reward, got no entry"
        )
    p = Path(path)
    if p.is_dir():
        ckpts = [p / n for n in CHECKPOINT_NAMES if (p / n).is_file()]
        if not ckpts:
            ckpts = sorted(q for q in p.iterdir() if q.suffix in (".pt", ".pth", ".bin") and q.is_file())
        if len(ckpts) != 1:
            raise FileNotFoundError(
                f"{OPTION}: expected hpsv2.1=DIR holding one checkpoint (HPS_v2.1_compressed.pt), "
                f"got {path!r} "
                f"with {len(ckpts)} .pt/.pth/.bin files"
            )
        ckpt, folder = ckpts[0], p
    elif p.is_file():
        ckpt, folder = p, p.parent
    else:
        raise FileNotFoundError(
            f"{OPTION}: expected hpsv2.1=FILE_OR_DIR, the HPS v2.1 checkpoint or its folder, got {path!r} "
            f"(no such file or directory)"
        )
    bpe = [folder / n for n in BPE_NAMES if (folder / n).is_file()]
    if not bpe:
        raise FileNotFoundError(
            f"{OPTION}: expected open_clip's tokenizer file {BPE_NAMES[0]} beside the hpsv2.1 checkpoint "
            f"(in {str(folder)!r}), got none"
        )
    return ckpt, bpe[0]


def _load_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{OPTION}: expected hpsv2.1=FILE to hold a state dict, got {type(obj).__name__}")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


class HPSv21:
    """HPS v2.1 (math.md §8.2): cosine similarity of the normalised open_clip ViT-H-14 image and text
    features, ``[B]`` float32 on the images' device (the model runs on ``device``).  ``differentiable``: the
    graph reaches the images when grad is enabled and they require it."""

    name = "hpsv2.1"
    differentiable = True

    def __init__(self, path: str | None, device: str = "cpu"):
        ckpt, bpe = resolve_paths(path)
        from transformers import CLIPModel

        cfg, sd = open_clip_to_hf(_load_state_dict(ckpt))
        model = CLIPModel(cfg)
        result = model.load_state_dict(sd, strict=False)
        # position_ids buffers are rebuilt by transformers; anything else missing is a broken checkpoint
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{OPTION}: expected hpsv2.1=FILE to fill every ViT-H-14 weight, got missing "
                f"{missing[:5]} unexpected {result.unexpected_keys[:5]}"
            )
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = OpenClipTokenizer(bpe, context_length=cfg.text_config.max_position_embeddings)
        self.size = cfg.vision_config.image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` images -> the model's input.  With grad on floats; otherwise rounded to uint8 first
        (the reference's PIL input, ``ToTensor`` = ``/ 255``)."""
        x = (images.to(self.device, torch.float32).clamp(-1, 1) + 1.0) / 2.0
        if not (torch.is_grad_enabled() and images.requires_grad):
            x = (x * 255.0).round() / 255.0
        return hps_preprocess(x, self.size)

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"hpsv2.1: expected one prompt per image ({images.shape[0]}), got {len(prompts)}"
            )
        pixels = self.preprocess(images)
        ids = self.tokenizer([str(p) for p in prompts]).to(self.device)
        img = self.model.get_image_features(pixel_values=pixels)
        txt = self.model.get_text_features(input_ids=ids)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img = F.normalize(img.float(), dim=-1)
        txt = F.normalize(txt.float(), dim=-1)
        return (img * txt).sum(-1).to(images.device)
