"""Load a diffusion transformer (or UNet) from a local diffusers directory, or build a named preset; read the
scheduler config saved beside it (:func:`load_scheduler_config`)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from .presets import PRESETS, preset_config

logger = logging.getLogger(__name__)

# diffusers model classes this project runs, by the ``_class_name`` of their config.json
SUPPORTED_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel", "UNet2DConditionModel")
# pipeline component that holds the denoiser, in the order they are looked for
_DENOISER_COMPONENTS = ("transformer", "unet")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
# The schedulers a flow model without a saved scheduler config falls back to, by transformer class:
# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json (SD3 and SD3.5 ship this one) and
# black-forest-labs/FLUX.1-dev's (dynamic shifting; FLUX.1-schnell's has none and shift 1: save a pipeline).
SD3_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
FLUX_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
_FALLBACK_SCHEDULERS = {
    "SD3Transformer2DModel": SD3_SCHEDULER_CONFIG,
    "FluxTransformer2DModel": FLUX_SCHEDULER_CONFIG,
}
_warned_fallback: set[str] = set()


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: expected a JSON file, got invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def resolve_model_dir(path: str | Path, *, option: str = "path_or_preset") -> tuple[Path, str]:
    """``(directory holding config.json + weights, diffusers class name)`` for a pipeline or model folder.

    A pipeline folder has ``model_index.json`` and a ``transformer/`` (or ``unet/``) subfolder; a model folder
    has a ``config.json`` whose ``_class_name`` is one of :data:`SUPPORTED_CLASSES`.  ``option`` names the
    argument in errors (``--model`` for the command line).
    """
    root = Path(path).expanduser()
    if not root.exists():
        what = "a local diffusers directory"
        if option == "path_or_preset":
            what += f" or a preset ({', '.join(PRESETS)})"
        raise FileNotFoundError(f"{option}: expected {what}, got {str(path)!r}, which does not exist")
    if not root.is_dir():
        raise ValueError(f"{option}: expected a directory, got the file {str(root)!r}")
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        component = next((c for c in _DENOISER_COMPONENTS if index.get(c) and index[c][0] is not None), None)
        if component is None:
            raise ValueError(
                f"{root / 'model_index.json'}: expected a 'transformer' or 'unet' component, "
                f"got components {sorted(k for k in index if not k.startswith('_'))}"
            )
        model_dir = root / component
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{root}: model_index.json names a {component!r} component, expected "
                f"{model_dir / 'config.json'}, which does not exist"
            )
    elif (root / "config.json").is_file():
        model_dir = root
    else:
        raise FileNotFoundError(
            f"{option}: expected {str(root)!r} to hold model_index.json (a diffusers pipeline) or "
            "config.json (a diffusers model), found neither"
        )
    config = _read_json(model_dir / "config.json")
    cls_name = config.get("_class_name")
    if cls_name not in SUPPORTED_CLASSES:
        raise ValueError(
            f"{model_dir / 'config.json'}: expected _class_name in {SUPPORTED_CLASSES}, got {cls_name!r}"
        )
    if not any(any(model_dir.glob(g)) for g in _WEIGHT_GLOBS):
        raise FileNotFoundError(
            f"{model_dir}: expected weights (diffusion_pytorch_model*.safetensors or *.bin), found none"
        )
    return model_dir, cls_name


def _model_class(cls_name: str):
    import diffusers

    return getattr(diffusers, cls_name)


def build_preset(name: str, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 seed: int | None = None) -> torch.nn.Module:
    """A preset's model with random (diffusers default) weights; ``device="meta"`` allocates none."""
    cls_name, config = preset_config(name)
    cls = _model_class(cls_name)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        with device:
            model = cls.from_config(config)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def load_transformer(path_or_preset: str | Path, *, dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None, seed: int | None = None) -> torch.nn.Module:
    """Load the denoising model of a local diffusers directory, or build a preset with random weights.

    ``path_or_preset``: a pipeline folder (``model_index.json`` + ``transformer/`` or ``unet/``), a model
    folder (``config.json`` with ``_class_name`` SD3Transformer2DModel / FluxTransformer2DModel /
    UNet2DConditionModel),
    or a preset name from :data:`models.presets.PRESETS` (``seed`` seeds its random weights). Nothing is
    downloaded. Returns the model in eval mode.
    """
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS and not Path(path_or_preset).exists():
        logger.info("building preset %s with random weights", path_or_preset)
        return build_preset(path_or_preset, dtype=dtype, device=device, seed=seed)
    if not isinstance(path_or_preset, (str, Path)):
        raise ValueError(
            f"path_or_preset: expected a directory path or a preset name, got {type(path_or_preset).__name__}"
        )
    model_dir, cls_name = resolve_model_dir(path_or_preset)
    cls = _model_class(cls_name)
    model = cls.from_pretrained(str(model_dir), torch_dtype=dtype, local_files_only=True)
    if device is not None:
        model = model.to(device)
    logger.info("loaded %s from %s", cls_name, model_dir)
    return model.eval()


def load_scheduler_config(path: str | Path) -> dict | None:
    """The diffusers scheduler config saved with the model at ``path`` (a dict, as ``scheduler_config.json``
    holds it): a pipeline folder's ``scheduler/scheduler_config.json``, or a ``scheduler_config.json`` beside
    a model folder's ``config.json`` (the embedded default ships one).

    Without one, a flow transformer falls back to its family's reference scheduler (SD3: shift 3; FLUX:
    FLUX.1-dev's dynamic shifting), logged once per folder; an epsilon UNet gets ``None`` (its DDIM schedule's
    defaults apply).  A pipeline whose ``model_index.json`` names no scheduler is treated the same way.
    """
    root = Path(path).expanduser()
    candidates = [root / SCHEDULER_CONFIG_NAME]
    if (root / "model_index.json").is_file():
        candidates.insert(0, root / "scheduler" / SCHEDULER_CONFIG_NAME)
    for cand in candidates:
        if cand.is_file():
            return _read_json(cand)
    model_dir, cls_name = resolve_model_dir(root)
    fallback = _FALLBACK_SCHEDULERS.get(cls_name)
    key = str(model_dir.resolve())
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        what = (
            f"{fallback['_class_name']} {json.dumps({k: v for k, v in fallback.items() if k[0] != '_'})}"
            if fallback
            else "the DDIM defaults (SD1.5)"
        )
        logger.warning(
            "%s has no scheduler config (looked for %s); sampling and training on %s",
            root,
            " and ".join(str(c) for c in candidates),
            what,
        )
    return dict(fallback) if fallback is not None else None
