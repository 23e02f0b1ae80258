"""The policy every training loop drives: a transformer with LoRA adapters, its text encoder, its decoder and
the prompts.

Adapters (math.md §2): ``default`` is trained, ``old`` (frozen) drives rollouts, and the reference model is
the
transformer with adapters disabled.  The eval EMA of ``default`` (math.md §2 step 7) lives here too.

Precision (``--models.dtype``): the frozen weights (transformer, text encoders, VAE) are stored in that dtype;
the LoRA adapters and so the optimizer state are fp32 whatever it is (models.lora); every denoiser forward
runs under ``torch.autocast`` in that dtype (:class:`AutocastDenoiser`), as the reference code does with its
fp32 model.  For fp16 the trainer adds a gradient scaler whose scale enters at the denoiser's output
(:meth:`AutocastDenoiser.set_grad_scale`): the loss is computed in fp32 from that output, so scaling the
gradient there is scaling the loss where fp16 starts.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import models
from engine import rollout, scheduler_sigmas
from models.conditioning import Conditioning

from .config import ConfigError

__all__ = [
    "ModelConfig",
    "Policy",
    "AutocastDenoiser",
    "build_policy",
    "check_model_path",
    "check_schedule",
    "resolve_solver",
    "SD3_LORA_TARGETS",
]

SD3_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    dtype: str = field(
        default="float32", metadata={"help": "weights/activations dtype: float32, bfloat16, float16"}
    )
    attention: str = field(
        default="auto", metadata={"help": "attention backend: auto, sdpa, flash, xformers"}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    lora_init: str = field(
        default="gaussian",
        metadata={"help": "LoRA init: gaussian (A ~ N(0, 1/r), B = 0) or true (A Kaiming-uniform, B = 0)"},
    )
    lora_targets: tuple[str, ...] = field(default=SD3_LORA_TARGETS, metadata={"help": "LoRA target modules"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "gradient checkpointing"})
    resolution: int = field(
        default=512, metadata={"help": "image size of a --model run (latent size: / VAE factor)"}
    )
    embedded_dir: str | None = field(
        default=None,
        metadata={
            "help": "embedded default only: a directory with default.safetensors and default.json (a "
            "train.pretrain --out, models/embedded/stage1 or stage3) to train instead of the shipped model"
        },
    )


def check_embedded_dir(path: str | None, *, embedded: bool) -> None:
    """Fail before any work unless ``--models.embedded-dir`` is unset, or set on an embedded-default run to a
    directory holding an embedded checkpoint (``default.safetensors`` and ``default.json``)."""
    if not path:
        return
    if not embedded:
        raise ValueError(
            f"--models.embedded-dir: replaces the embedded default; expected none with --model or a preset "
            f"other than tiny, got {path!r}"
        )
    from models.embedded.model import CONFIG_NAME, DEFAULT_DIR, WEIGHTS_NAME

    def complete(d: Path) -> list[str]:
        return [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not (d / n).is_file()]

    root = Path(path).expanduser()
    missing = complete(root)
    if missing:
        # the README's relative paths (models/embedded/stage1) are from the repository root
        shipped = DEFAULT_DIR.parents[1] / root
        hint = (
            f"; relative paths are from the working directory, and the shipped one is {str(shipped)!r}"
            if not root.is_absolute() and not complete(shipped)
            else ""
        )
        raise ValueError(
            f"--models.embedded-dir: expected a directory with {WEIGHTS_NAME} and {CONFIG_NAME} (a "
            f"train.pretrain --out), got {path!r} without {' and '.join(missing)}{hint}"
        )


# ``--models.lora-init``: the inits that leave the base weights alone and start with B A = 0, so that the
# several adapters a loop keeps on one base (trained, old, reference) all start as the base model.  peft's
# others do not fit that: pissa, olora, loftq and corda change the base weights per adapter, orthogonal starts
# with B A != 0, eva and mica need their own setup.
LORA_INITS = {"gaussian": "gaussian", "true": True}


def check_model_options(mc: ModelConfig) -> None:
    """Fail before any work on a ``--models.dtype``, ``--models.lora-init``, ``--models.attention`` or an
    empty ``--models.lora-targets`` that the policy could not be built with, naming the option (whether the
    targets name layers of the model is known once it is loaded: :func:`build_policy`)."""
    if mc.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--models.dtype: expected float32, bfloat16 or float16, got {mc.dtype!r}")
    if not mc.lora_targets:
        raise ValueError("--models.lora-targets: expected at least one module name, got none")
    if mc.lora_init not in LORA_INITS:
        raise ValueError(
            f"--models.lora-init: expected gaussian (A ~ N(0, 1/r), B = 0, the references' init) or true "
            f"(peft's default: A Kaiming-uniform, B = 0), got {mc.lora_init!r}"
        )
    from models.attention import resolve_backend

    try:
        resolve_backend(mc.attention)
    except (ValueError, ImportError) as e:
        raise ValueError(f"--models.attention: {str(e).removeprefix('backend: ')}") from None


def _linear_names(model: torch.nn.Module) -> list[str]:
    """The model's ``nn.Linear`` names with any ``<blocks>.<index>.`` prefix dropped, each once: the attention
    layers first, then the others, each in the model's order."""
    import re

    seen = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            seen.setdefault(re.sub(r"^(?:.*?\.\d+\.)+", "", name), None)
    return sorted(seen, key=lambda n: "attn" not in n)  # the attention projections first


def check_resolution(model: str | None, resolution: int, *, embedded: bool) -> None:
    """Fail before any work unless ``--models.resolution`` fits the run: unset (its default) on the embedded
    default, whose checkpoint fixes its image size, and a positive multiple of the VAE's downsampling
    factor (``2 ** (len(block_out_channels) - 1)`` of ``vae/config.json``) on a ``--model`` run."""
    if embedded:
        if resolution != ModelConfig.resolution:
            raise ValueError(
                f"--models.resolution: sets a --model run's image size; the embedded default samples at its "
                f"checkpoint's own size (32x32 for the shipped ones), expected it unset, got {resolution}"
            )
        return
    vae_config = Path(model).expanduser() / "vae" / "config.json"
    try:
        blocks = json.loads(vae_config.read_text(encoding="utf-8")).get("block_out_channels") or [0]
    except (OSError, ValueError):
        raise ValueError(f"--model: expected a VAE config at {vae_config}, found none readable") from None
    f = 2 ** (len(blocks) - 1)
    if resolution < f or resolution % f:
        raise ValueError(
            f"--models.resolution: expected a positive multiple of the VAE factor {f}, got {resolution}"
        )


# The loops that also train SD1.5-style (epsilon-prediction) UNet pipelines; DiffusionNFT and Flow-GRPO are
# defined on flow models only.
UNET_LOOPS = ("train.ddpo", "train.dpo", "train.d3po", "train.spo", "train.draft", "train.alignprop",
              "train.refl", "train.nabla_gfn")


def check_model_path(path: str | None, *, preset: str, unet_ok: bool = False) -> None:
    """Fail before any work unless ``--model`` is a diffusers pipeline directory (a training run needs its
    text encoders and VAE too, not only the denoiser) whose denoiser this loop trains: SD3/SD3.5/FLUX
    transformers, and an SD1.5-style UNet only where ``unet_ok`` (:data:`UNET_LOOPS`; DiffusionNFT and
    Flow-GRPO have no epsilon-prediction rollout)."""
    if not path:
        raise ValueError(f"--model: expected a local diffusers directory for preset {preset!r}, got none")
    from models.loader import resolve_model_dir

    root = Path(path).expanduser()
    model_dir, cls_name = resolve_model_dir(root, option="--model")
    if model_dir == root:  # a model folder, not a pipeline
        parent = root.resolve().parent
        hint = (
            f"; {str(parent)!r} is the pipeline: pass that"
            if (parent / "model_index.json").is_file()
            else ""
        )
        raise ValueError(
            f"--model: expected a diffusers pipeline directory (model_index.json with the text encoders "
            f"and VAE a run needs), got the {cls_name} model folder {path!r}{hint}"
        )
    if cls_name == "UNet2DConditionModel" and not unet_ok:
        raise ValueError(
            f"--model: expected an SD3/SD3.5/FLUX pipeline (a flow-matching transformer) for this loop, got "
            f"the UNet pipeline {path!r}; UNets (epsilon prediction) train with {', '.join(UNET_LOOPS)}"
        )


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale`` (a GradScaler's)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class AutocastDenoiser(torch.nn.Module):
    """``denoiser(x, timestep, cond)`` under ``torch.autocast(dtype)`` (frozen weights stored in ``dtype``,
    fp32 LoRA weights cast per matmul), its prediction returned in ``dtype``.  ``prediction_type`` and the
    CUDA-graph key are the wrapped denoiser's (plus the dtype).  With a gradient scale set (fp16 training),
    a gradient flowing back into the prediction is multiplied by it."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self.autocast_dtype = dtype
        self.prediction_type = getattr(inner, "prediction_type", "flow")
        self.grad_scale: float | None = None

    def set_grad_scale(self, scale: float | None) -> None:
        self.grad_scale = None if scale is None else float(scale)

    def graph_key(self):
        gk = getattr(self.inner, "graph_key", None)
        key = gk() if callable(gk) else getattr(self.inner, "active_adapter", None)
        return (key if not isinstance(key, list) else tuple(key), str(self.autocast_dtype))

    def forward(self, x: torch.Tensor, timestep, cond) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            out = self.inner(x, timestep, cond)
        out = out.to(self.autocast_dtype)
        if self.grad_scale is not None and out.requires_grad:
            out = _ScaleGrad.apply(out, self.grad_scale)
        return out


def _count_nonfinite(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` holding a NaN or inf (a 0-d tensor on ``t``'s device)."""
    return (~torch.isfinite(t)).flatten(1).any(1).sum()


class Policy:
    def __init__(
        self,
        *,
        transformer,
        denoiser,
        encoder,
        decode: Callable,
        latent_shape,
        device,
        dtype,
        train_prompts: list,
        test_prompts: list,
        prompt_text: Callable = str,
        prompt_sampler: Callable | None = None,
        scheduler_config: dict | None = None,
        schedule_family: str = "sd3",
        image_seq_len: int | None = None,
        vae=None,
    ):
        self.transformer, self.denoiser, self.encoder = transformer, denoiser, encoder
        # models.Vae of a --model run; None: the latents are the images (the embedded default)
        self._vae, self._vae_fingerprint = vae, None
        # math.md §0: the model's own diffusers scheduler (None: SD3's, shift 3) and the pipeline that drives
        # it
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        self.schedule_family, self.image_seq_len = schedule_family, image_seq_len
        # the forward that carries gradients (DistributedDataParallel under torchrun; else the denoiser
        # itself)
        self.train_denoiser = denoiser
        self._decode = decode
        self.latent_shape = tuple(latent_shape)
        self.device, self.dtype = device, dtype
        self.train_prompts, self.test_prompts = train_prompts, test_prompts
        self.prompt_text = prompt_text
        self._prompt_sampler = prompt_sampler
        self._nonfinite = None  # [latents, images, total] rows with NaN/inf since take_nonfinite()
        self.refresh_parameters()

    def refresh_parameters(self) -> None:
        """Collect the ``default`` / ``old`` LoRA parameters (again after FSDP2 replaced them with sharded
        ones)
        and start the eval EMA from them."""
        from models.lora import reset_adapter_cache

        reset_adapter_cache(self.transformer)
        named = list(self.transformer.named_parameters())
        self._trainable = [p for n, p in named if "lora_" in n and ".default." in n]
        self._old = [p for n, p in named if "lora_" in n and ".old." in n]
        if not self._trainable or len(self._trainable) != len(self._old):
            raise RuntimeError(
                "policy: expected matching 'default' and 'old' LoRA adapters on the transformer"
            )
        for p in self._old:
            p.requires_grad_(False)
        self.eval_ema = models.EMA(self._trainable)

    # adapters -----------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._trainable

    def old_parameters(self) -> list[torch.nn.Parameter]:
        """The frozen ``old`` adapter's LoRA parameters (same order as :meth:`trainable_parameters`)."""
        return self._old

    def adapter(self, name: str):
        return models.use_adapter(self.transformer, name)

    def adapters_disabled(self):
        return models.adapters_disabled(self.transformer)

    @torch.no_grad()
    def ema_old(self, decay: float) -> None:
        """math.md §2 step 7: ``old <- d old + (1 - d) default``."""
        models.ema_update_adapter(self.transformer, decay, src="default", dst="old")

    def update_eval_ema(self, step: int) -> None:
        """The eval EMA after optimizer step ``step`` (1 at the first: the reference's count)."""
        self.eval_ema.update(step)

    @contextlib.contextmanager
    def eval_weights(self):
        """Temporarily load the eval EMA into the ``default`` adapter."""
        with self.eval_ema.average_parameters():
            yield

    def adapter_state(self) -> dict:
        return {
            "default": [p.detach().cpu().clone() for p in self._trainable],
            "old": [p.detach().cpu().clone() for p in self._old],
            "eval_ema": self.eval_ema.state_dict(),
        }

    def load_adapter_state(self, state: dict) -> None:
        with torch.no_grad():
            for dst, src in ((self._trainable, state["default"]), (self._old, state["old"])):
                if len(dst) != len(src):
                    raise ValueError(f"checkpoint: expected {len(dst)} LoRA tensors, got {len(src)}")
                for p, s in zip(dst, src, strict=True):
                    p.copy_(s.to(p.device, p.dtype))
        self.eval_ema.load_state_dict(state["eval_ema"])

    # data ---------------------------------------------------------------------------------------------------
    def encode(self, prompts: list) -> Conditioning:
        return self.encoder.encode([self.prompt_text(p) for p in prompts]).to(self.device)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from clean latents.  Rows with a NaN/inf latent or image are counted (without a
        host read) for :meth:`take_nonfinite`: a clamp would turn an inf latent into a valid-looking image,
        and a reward may score a NaN image, so the trainer checks the count before training."""
        images = self._decode(x0)
        rows = torch.tensor(len(x0), device=x0.device)
        counts = torch.stack([_count_nonfinite(x0), _count_nonfinite(images).to(x0.device), rows])
        self._nonfinite = counts if self._nonfinite is None else self._nonfinite + counts
        return images

    @property
    def image_size(self) -> int:
        """Pixels per side of the images this policy generates and encodes (latent side x VAE factor)."""
        factor = 1 if self._vae is None else self._vae.downsample_factor
        return int(self.latent_shape[-1]) * factor

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None, moments: bool = False
    ):
        """The inverse of :meth:`decode`: images ``[B, 3, R, R]`` in [-1, 1] (``R`` = :attr:`image_size`) ->
        latents ``(E(x) - shift_factor) * scaling_factor`` (fp32, on the policy's device), the VAE posterior's
        mean, or with ``generator`` a sample of it (as SalesforceAIResearch/DiffusionDPO@5233e759 train.py
        ``vae.encode(x).latent_dist.sample() * scaling_factor``); ``moments`` returns ``(mean, std)`` in
        latent units instead (math.md §6.1).  The embedded default's latents are the images: identity
        (std 0)."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"images: expected [B, 3, {self.image_size}, {self.image_size}] (the policy's resolution), "
                f"got shape {tuple(images.shape)}"
            )
        x = images.to(self.device)
        if self._vae is None:
            if tuple(self.latent_shape) != tuple(images.shape[1:]):
                raise ValueError(
                    f"encode_images: this policy has no VAE and its latents {self.latent_shape} are not "
                    f"images of shape {tuple(images.shape[1:])}"
                )
            mean = x.float()
            return (mean, torch.zeros_like(mean)) if moments else mean
        if moments:
            mean, std = self._vae.moments(x)
            return mean.float(), std.float()
        return self._vae.encode(x, sample=generator is not None, generator=generator).float()

    @property
    def vae_fingerprint(self) -> str:
        """What latents encoded by this policy depend on, as a string (the latent cache's key): for the
        embedded default a fixed identity string; for a VAE its class, config (without bookkeeping keys
        such as the path it was loaded from), dtype and a SHA-256 of every weight's bytes (computed once)."""
        if self._vae_fingerprint is None:
            if self._vae is None:
                c, h, w = self.latent_shape
                self._vae_fingerprint = f"identity:embedded-default:rgb-{c}x{h}x{w}"
            else:
                self._vae_fingerprint = _module_fingerprint(self._vae.vae)
        return self._vae_fingerprint

    def take_nonfinite(self) -> tuple[int, int, int]:
        """``(latent rows, image rows with a NaN/inf, rows decoded)`` since the last call; resets them."""
        counts, self._nonfinite = self._nonfinite, None
        return (0, 0, 0) if counts is None else tuple(int(c) for c in counts.tolist())

    def sample_train_prompts(self, n: int, seed: int) -> list:
        """``n`` training prompts drawn from a generator seeded with ``seed`` (uniform, or the benchmark's own
        sampler: GenEval-mini draws a task uniformly, then a prompt of it)."""
        if self._prompt_sampler is not None:
            return self._prompt_sampler(n, seed)
        if not self.train_prompts:
            raise ValueError(
                "--prompts: expected training prompts to draw from, got none (only --eval-prompts)"
            )
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(self.train_prompts), (n,), generator=g)
        return [self.train_prompts[i] for i in idx.tolist()]

    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """math.md §0: the ``[N+1]`` sigmas (last 0) the model's diffusers scheduler gives for ``num_steps``
        (FLUX: dynamic shifting from this policy's image token count); ``shift`` (None: the config's)
        overrides a static shift.  Rollouts and NFT's trained timesteps both read it."""
        config = self.scheduler_config if self.scheduler_config is not None else {"shift": 3.0}
        return scheduler_sigmas(
            config, num_steps, family=self.schedule_family, image_seq_len=self.image_seq_len, shift=shift
        )

    @torch.no_grad()
    def sample(
        self,
        prompts: list,
        seeds,
        *,
        solver: str,
        num_steps: int,
        shift: float | None = None,
        noise_level: float = 0.7,
        guidance_scale: float = 1.0,
        eta: float = 1.0,
    ) -> torch.Tensor:
        """Clean samples of ``prompts`` (one Philox seed each) with the active adapter on the model's schedule
        (:meth:`sigmas`; ``shift`` overrides its static shift); ``eta`` is DDIM's."""
        cond = self.encode(prompts)
        uncond = self.encode([""] * len(prompts)) if guidance_scale != 1.0 else None
        out = rollout(
            self.denoiser,
            cond,
            num_steps=num_steps,
            latent_shape=self.latent_shape,
            solver=solver,
            sigmas=self.sigmas(num_steps, shift) if solver != "ddim" else None,
            noise_level=noise_level,
            eta=eta,
            guidance_scale=guidance_scale,
            uncond=uncond,
            seed=[int(s) for s in seeds],
            dtype=self.dtype,
            device=self.device,
            # an epsilon model's DDIM schedule from its scheduler config (engine.schedules.ddim_alpha_bars)
            scheduler_config=getattr(self, "scheduler_config", None) if solver == "ddim" else None,
        )
        return out.x0


def _module_fingerprint(module: torch.nn.Module) -> str:
    """``<class>:<sha256>`` of a diffusers model's config (keys starting with ``_`` left out), its dtype and
    every state-dict tensor's name, shape, dtype and bytes."""
    import hashlib
    import json

    h = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(module, "config", {})).items() if not str(k).startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(module).__name__}:{h.hexdigest()}"


def _identity_decode(x0: torch.Tensor) -> torch.Tensor:
    return x0.float().clamp(-1, 1)


def build_policy(
    mc: ModelConfig,
    *,
    preset: str,
    model_path: str | None,
    device: torch.device,
    seed: int,
    prompts: str | None = None,
    eval_prompts: str | None = None,
    tasks: tuple[str, ...] = (),
    embedded_dir: str | None = None,
) -> Policy:
    """The embedded default (``preset == 'tiny'`` without ``--model``) or a local SD3/SD3.5/FLUX directory.
    ``tasks`` (embedded default only) keeps those GenEval-mini task types, in training and in evaluation;
    ``embedded_dir`` (embedded only; default ``--models.embedded-dir``) loads another embedded checkpoint (a
    directory with ``default.json`` and ``default.safetensors``, e.g. ``models/embedded/stage3``) in place of
    the shipped one."""
    dtype = _DTYPES[mc.dtype]
    embedded_dir = embedded_dir or mc.embedded_dir
    torch.manual_seed(seed)  # LoRA init
    vae = None
    if model_path is None:
        import numpy as np

        from models.embedded import DEFAULT_DIR, load_default
        from train.data import geneval_mini

        if embedded_dir is None:
            bundle = load_default(device=device, dtype=dtype)
        else:
            bundle = load_default(device=device, dtype=dtype, directory=Path(embedded_dir).expanduser())
        transformer, encoder = bundle.transformer, bundle.text_encoder
        scheduler_config = models.load_scheduler_config(DEFAULT_DIR)  # SD3's, shift 3 (shipped)
        latent_shape = (bundle.latent_channels, bundle.sample_size, bundle.sample_size)
        decode = _identity_decode
        tasks = tuple(tasks) or geneval_mini.TASKS
        train_p = [p for t, ps in geneval_mini.train_prompts().items() if t in tasks for p in ps]
        test_p = [p for p in geneval_mini.test_prompts() if p.task in tasks]
        prompt_text = lambda p: p.text if hasattr(p, "text") else str(p)
        sampler = lambda n, s: geneval_mini.sample_prompts(
            n, np.random.default_rng(s), split="train", tasks=tasks
        )
    else:
        check_resolution(model_path, mc.resolution, embedded=False)  # before loading anything
        transformer = models.load_transformer(model_path, dtype=dtype, device=device)
        scheduler_config = models.load_scheduler_config(model_path)
        root = Path(model_path)
        encoder = models.TextEncoder.from_pretrained(root, device=device, dtype=dtype)
        vae = models.Vae.from_pretrained(root, device=device, dtype=dtype)
        decode = lambda x0: vae.decode(x0).float().clamp(-1, 1)
        f = vae.downsample_factor
        latent_shape = (vae.vae.config.latent_channels, mc.resolution // f, mc.resolution // f)
        # no training prompts with held-out ones: a run that trains on a dataset's prompts (train.dpo --data)
        train_p = read_prompt_file(prompts, "--prompts") if prompts or not eval_prompts else []
        test_p = read_prompt_file(eval_prompts or prompts, "--eval-prompts")
        prompt_text, sampler = str, None
    transformer.requires_grad_(False)
    if device.type == "cuda":
        models.disable_cudnn_sdpa()  # its bf16 backward returned NaN gradients on an H200
    if mc.attention != "auto" or device.type == "cuda":
        models.set_attention_backend(transformer, mc.attention)
    targets = list(mc.lora_targets)
    if type(transformer).__name__ == "UNet2DConditionModel" and tuple(targets) == SD3_LORA_TARGETS:
        targets = None  # the SD3 names do not exist in a UNet: models.lora's UNet default (q/k/v/out)
    try:
        models.add_adapters(
            transformer,
            rank=mc.lora_rank,
            alpha=mc.lora_alpha,
            target_modules=targets,
            init=LORA_INITS.get(mc.lora_init, mc.lora_init),
        )
    except ValueError as e:
        if "target modules" not in str(e).lower():
            raise
        raise ValueError(
            f"--models.lora-targets: expected linear layers of the {type(transformer).__name__}, such as "
            f"{', '.join(_linear_names(transformer)[:12])}; got {','.join(mc.lora_targets)} ({e})"
        ) from None
    if mc.gradient_checkpointing and hasattr(transformer, "enable_gradient_checkpointing"):
        transformer.enable_gradient_checkpointing()
    denoiser = models.as_denoiser(transformer)
    if dtype != torch.float32:  # fp32 LoRA (models.lora) on frozen weights in ``dtype``: mixed precision
        denoiser = AutocastDenoiser(denoiser, dtype)
    family = _schedule_family(transformer)
    return Policy(
        transformer=transformer,
        denoiser=denoiser,
        encoder=encoder,
        decode=decode,
        latent_shape=latent_shape,
        device=device,
        dtype=dtype,
        train_prompts=train_p,
        test_prompts=test_p,
        prompt_text=prompt_text,
        prompt_sampler=sampler,
        scheduler_config=scheduler_config,
        schedule_family=family,
        image_seq_len=_image_seq_len(transformer, latent_shape, family),
        vae=vae,
    )


def _schedule_family(transformer) -> str:
    """Whose pipeline drives the scheduler (engine.schedules.FLOW_FAMILIES): FLUX's or SD3's."""
    return "flux" if type(transformer).__name__ == "FluxTransformer2DModel" else "sd3"


def _image_seq_len(transformer, latent_shape, family: str) -> int:
    """The image token count diffusers' pipelines compute ``mu`` from: FLUX packs 2x2 latent patches,
    ``(H/2) (W/2)``; SD3 ``(H/p) (W/p)`` with the transformer's patch size."""
    _, h, w = latent_shape
    config = getattr(transformer, "config", None)
    p = 2 if family == "flux" else int(getattr(config, "patch_size", None) or 1)
    return (h // p) * (w // p)


def resolve_solver(
    solver: str, prediction: str, *, flow_auto: str, flow_fits: str, option: str = "--sample.solver"
) -> str:
    """The sampler a loop runs: ``auto`` is ``flow_auto`` for a flow model and ``ddim`` for an epsilon UNet
    (``prediction``: ``"flow"`` or ``"epsilon"``, the denoiser's ``prediction_type``); an explicit solver must
    fit the model (``ddim`` exactly for epsilon models; ``flow_fits`` names the loop's flow solvers in the
    error, which names the CLI ``option``)."""
    if solver == "auto":
        return "ddim" if prediction == "epsilon" else flow_auto
    if (solver == "ddim") != (prediction == "epsilon"):
        fits = "ddim" if prediction == "epsilon" else flow_fits
        raise ConfigError(f"{option}: expected {fits} for a {prediction} model, got {solver!r}")
    return solver


def check_schedule(model_path: str | None, shift: float | None, *, option: str = "--sample.shift") -> None:
    """Fail before any work if the model's scheduler config gives no flow schedule, or ``shift`` (the CLI
    ``option``) is not None / > 0 or does not apply (an epsilon UNet, or dynamic shifting)."""
    from models.loader import load_scheduler_config, resolve_model_dir

    bad = isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0
    if shift is not None and bad:
        raise ValueError(f"{option}: expected a float > 0 (or none: the model's scheduler's), got {shift!r}")
    if model_path is None:
        from models.embedded import DEFAULT_DIR

        config, family = load_scheduler_config(DEFAULT_DIR), "sd3"
    else:
        _, cls_name = resolve_model_dir(model_path)
        if cls_name == "UNet2DConditionModel":  # epsilon model: the DDIM schedule
            if shift is not None:
                raise ValueError(
                    f"{option}: shifts a flow model's sigma schedule; {model_path} is an epsilon UNet "
                    f"(DDIM schedule), expected none, got {shift}"
                )
            return
        config = load_scheduler_config(model_path)
        family = "flux" if cls_name == "FluxTransformer2DModel" else "sd3"
    try:
        scheduler_sigmas(config, 1, family=family, image_seq_len=1, shift=shift)
    except ValueError as e:
        where = "the embedded default" if model_path is None else str(model_path)
        msg = str(e)
        if msg.startswith("shift: "):
            raise ValueError(f"{option} ({where}): {msg[len('shift: '):]}") from None
        raise ValueError(f"the scheduler config of {where}: {msg}") from None


def read_prompt_file(path: str | None, option: str) -> list[str]:
    """One prompt per line; blank lines skipped."""
    if not path:
        raise ValueError(
            f"{option}: expected a text file with one prompt per line for a --model run, got none"
        )
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{option}: expected a text file with one prompt per line, got {path!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{option}: expected a UTF-8 text file with one prompt per line, got {path!r}, whose byte "
            f"{e.start} ({e.object[e.start : e.start + 1]!r}) is not UTF-8"
        ) from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"{option}: expected at least one prompt in {path!r}, found none")
    return prompts
