"""LoRA adapters through peft (math.md §2 step 8): a trainable ``default``, a frozen ``old`` copy, the
reference model as "adapters disabled"; old-adapter EMA and an evaluation EMA with multi-tensor (foreach)
updates; saving and loading in the ``pytorch_lora_weights.safetensors`` format diffusers pipelines load.

Switching adapters sets peft's per-layer flags directly instead of calling ``set_adapter`` /
``enable_adapters``, which also flip ``requires_grad`` (that would silently freeze the trainable adapter).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

# math.md §2 step 8 (DiffusionNFT reference, SD3.5-M): the joint attention projections of every MMDiT block.
SD3_TARGET_MODULES = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
# FLUX: the same names cover the double-stream blocks' joint attention and the single-stream blocks' q/k/v
# (single blocks have no to_out; their output projection is proj_out, shared with the MLP).
FLUX_TARGET_MODULES = SD3_TARGET_MODULES
UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")

_DEFAULT_TARGETS = {
    "SD3Transformer2DModel": SD3_TARGET_MODULES,
    "FluxTransformer2DModel": FLUX_TARGET_MODULES,
    "UNet2DConditionModel": UNET_TARGET_MODULES,
}
# diffusers pipeline class whose LoRA mixin writes / reads the weights, and the component prefix
_PIPELINES = {
    "SD3Transformer2DModel": ("StableDiffusion3Pipeline", "transformer"),
    "FluxTransformer2DModel": ("FluxPipeline", "transformer"),
    "UNet2DConditionModel": ("StableDiffusionPipeline", "unet"),
}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    layers = model.__dict__.get("_nft_tuner_layers")
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if not layers:
            raise ValueError(
                f"model: expected a model with LoRA adapters, got a {type(model).__name__} with none"
            )
        model.__dict__["_nft_tuner_layers"] = layers
    return layers


def _invalidate(model: nn.Module) -> None:
    for key in ("_nft_tuner_layers", "_nft_adapter_pairs"):
        model.__dict__.pop(key, None)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters on ``model``."""
    return list(getattr(model, "peft_config", {}) or {})


def _check_adapter(model: nn.Module, name: str, arg: str) -> None:
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"{arg}: expected one of the model's adapters {names}, got {name!r}")


def adapter_parameters(model: nn.Module, adapter: str = "default") -> list[nn.Parameter]:
    """The parameters of one adapter, in ``model.named_parameters()`` order."""
    _check_adapter(model, adapter, "adapter")
    return [p for n, p in model.named_parameters() if _adapter_of(n) == adapter]


def _adapter_of(param_name: str) -> str | None:
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def _swap_adapter(param_name: str, dst: str) -> str:
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            parts[i + 1] = dst
            break
    return ".".join(parts)


def _adapter_pairs(model: nn.Module, src: str, dst: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Cached ``(src params, dst params)`` lists, matched by name, for foreach updates."""
    cache = model.__dict__.setdefault("_nft_adapter_pairs", {})
    if (src, dst) not in cache:
        _check_adapter(model, src, "src")
        _check_adapter(model, dst, "dst")
        params = dict(model.named_parameters())
        src_params, dst_params = [], []
        for name, p in params.items():
            if _adapter_of(name) == src:
                other = _swap_adapter(name, dst)
                if other not in params or params[other].shape != p.shape:
                    raise ValueError(f"dst: expected adapter {dst!r} shaped like {src!r}, {other} differs")
                src_params.append(p)
                dst_params.append(params[other])
        cache[(src, dst)] = (src_params, dst_params)
    return cache[(src, dst)]


def reset_adapter_cache(model: nn.Module) -> None:
    """Forget the cached parameter lists of :func:`copy_adapter` / :func:`ema_update_adapter`: needed after
    something replaced the model's parameters (FSDP2's ``fully_shard`` swaps in sharded ones)."""
    model.__dict__.pop("_nft_adapter_pairs", None)


def add_adapters(
    model: nn.Module,
    *,
    rank: int = 32,
    alpha: float = 64,
    target_modules: Iterable[str] | None = None,
    init: str | bool = "gaussian",
    adapters: Iterable[str] = ("default", "old"),
    lora_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Add LoRA adapters (peft ``LoraConfig(r=rank, lora_alpha=alpha)``, scale ``alpha / rank``) in place.

    The first adapter is active and trainable; the others start as copies of it and are frozen; the base
    weights are frozen. ``target_modules`` defaults to math.md §2 step 8's list for SD3 (same names for FLUX;
    q/k/v/out for a UNet). ``init``: peft's ``init_lora_weights`` ("gaussian": A ~ N(0, 1/r), B = 0).

    Every adapter's weights are ``lora_dtype`` (fp32) whatever the base weights' dtype: they are the master
    weights the optimizer updates, and a bf16/fp16 LoRA loses small updates (bf16 keeps 8 bits of mantissa:
    an update below ~1/256 of an entry rounds away) or, in fp16 with AdamW's eps, turns into NaN.  peft's
    LoRA forward casts its input to the adapter's dtype and its output back to the base layer's; under
    ``torch.autocast`` (the policy's forward, train.policy) the matmuls run in the autocast dtype.
    """
    from peft import LoraConfig

    adapters = tuple(adapters)
    if not adapters or len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters: expected distinct adapter names, got {adapters}")
    existing = set(adapter_names(model)) & set(adapters)
    if existing:
        raise ValueError(f"adapters: expected new names, got {sorted(existing)} already on the model")
    if rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank}")
    if target_modules is None:
        cls_name = type(model).__name__
        if cls_name not in _DEFAULT_TARGETS:
            raise ValueError(f"target_modules: expected a list for a {cls_name} (no default), got None")
        target_modules = _DEFAULT_TARGETS[cls_name]
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    with warnings.catch_warnings():  # several adapters on one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in adapters:
            model.add_adapter(config, adapter_name=name)
    _invalidate(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if _adapter_of(n) in adapters and p.dtype != lora_dtype:
                p.data = p.data.to(lora_dtype)
    for other in adapters[1:]:
        copy_adapter(model, src=adapters[0], dst=other)
    for n, p in model.named_parameters():
        p.requires_grad_(_adapter_of(n) == adapters[0])
    _set_active(model, adapters[0])
    return model


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active one (until changed), leaving ``requires_grad`` as it is."""
    _check_adapter(model, name, "name")
    _set_active(model, name)


def _set_active(model: nn.Module, name: str) -> None:
    for layer in _tuner_layers(model):
        layer._active_adapter = name


def _active(model: nn.Module):
    return [(layer._active_adapter, layer._disable_adapters) for layer in _tuner_layers(model)]


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run ``model`` with adapter ``name`` active (and adapters enabled) inside the block; restore on exit.

    ``requires_grad`` is untouched, so ``with use_adapter(m, "old"), torch.no_grad(): v_old = ...`` is cheap.
    """
    _check_adapter(model, name, "name")
    saved = _active(model)
    for layer in _tuner_layers(model):
        layer._active_adapter = name
        layer._disable_adapters = False
    try:
        yield model
    finally:
        for layer, (active, disabled) in zip(_tuner_layers(model), saved, strict=True):
            layer._active_adapter, layer._disable_adapters = active, disabled


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base (reference) model inside the block: every LoRA layer bypassed; restore on exit."""
    saved = _active(model)
    for layer in _tuner_layers(model):
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, (_, disabled) in zip(_tuner_layers(model), saved, strict=True):
            layer._disable_adapters = disabled


class PerSampleGrads:
    """What :func:`per_sample_lora_grads` yields: ``params`` (an adapter's LoRA weights) and, after a
    backward, :meth:`grads`, each parameter's gradient per sample ``[batch, *param.shape]``."""

    def __init__(self, params: list[nn.Parameter], deltas: list[torch.Tensor]):
        self.params, self.deltas = params, deltas

    def grads(self) -> list[torch.Tensor]:
        return [torch.zeros_like(d) if d.grad is None else d.grad for d in self.deltas]

    def unit_sum(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(units, norms)``: per parameter ``sum_n g_n / |g_n|`` (``params``' order), and ``|g_n|
        [batch]``, the norm of sample ``n``'s gradient over all of them (fp64 sums; a zero gradient adds
        nothing)."""
        grads = self.grads()
        norms = torch.sqrt(sum((g.double() ** 2).flatten(1).sum(1) for g in grads)).float()
        inv = 1.0 / norms.clamp_min(1e-30)
        return [torch.einsum("n,n...->...", inv.to(g.dtype), g) for g in grads], norms


@contextlib.contextmanager
def per_sample_lora_grads(
    model: nn.Module, batch: int, adapter: str = "default"
) -> Iterator[PerSampleGrads]:
    """Per-sample gradients of an adapter's LoRA weights from one batched backward.

    Inside the block, every ``lora_A`` / ``lora_B`` linear of ``adapter`` computes ``x (W + delta_n)^T``
    for row ``n`` of its input, where ``delta [batch, *W.shape]`` is a zero tensor that requires grad (a
    forward hook adds ``einsum(x, delta)``; inputs whose first dimension is ``k * batch``, as CFG's
    concatenated halves, use row ``n mod batch``).  The forward is unchanged (delta is 0), and since row
    ``n`` only ever meets ``delta_n``, after a backward ``delta.grad[n]`` is exactly sample ``n``'s gradient
    of ``W``: the model forward may be checkpointed or run many times (a sampler), the hooks run again in
    the recompute and the contributions add up.  The cost is one more LoRA-sized matmul per LoRA linear
    and ``batch`` copies of the adapter's gradient.  Requires a model whose rows never mix (no batch
    norm) and LoRA without bias."""
    _check_adapter(model, adapter, "adapter")
    if batch < 1:
        raise ValueError(f"batch: expected an integer >= 1, got {batch}")
    params, deltas, handles = [], [], []

    def make_hook(delta: torch.Tensor):
        def hook(_mod, args, out):
            x = args[0]
            n = x.shape[0]
            if n % batch:
                raise ValueError(f"per_sample_lora_grads: expected a leading dimension that is a multiple of "
                                 f"batch = {batch}, got an input shaped {tuple(x.shape)}")
            d = delta if n == batch else delta.repeat(n // batch, *([1] * (delta.ndim - 1)))
            return out + torch.einsum("n...i,noi->n...o", x, d.to(x.dtype)).to(out.dtype)

        return hook

    try:
        for layer in _tuner_layers(model):
            for mods in (layer.lora_A, layer.lora_B):
                if adapter not in mods:
                    continue
                lin = mods[adapter]
                if not isinstance(lin, nn.Linear) or lin.bias is not None:
                    raise ValueError(f"per_sample_lora_grads: expected bias-free nn.Linear LoRA weights, got "
                                     f"{lin!r}")
                delta = torch.zeros(batch, *lin.weight.shape, device=lin.weight.device,
                                    dtype=lin.weight.dtype, requires_grad=True)
                params.append(lin.weight)
                deltas.append(delta)
                handles.append(lin.register_forward_hook(make_hook(delta)))
        yield PerSampleGrads(params, deltas)
    finally:
        for h in handles:
            h.remove()


def _local(tensors) -> list[torch.Tensor]:
    """The local shards of FSDP2's DTensor parameters (identically sharded lists update shard by shard;
    foreach ops have no DTensor sharding rule), the tensors themselves otherwise."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


@torch.no_grad()
def copy_adapter(model: nn.Module, src: str = "default", dst: str = "old") -> None:
    """``dst <- src`` for every LoRA weight (one multi-tensor copy)."""
    src_params, dst_params = _adapter_pairs(model, src, dst)
    torch._foreach_copy_(_local(dst_params), _local(src_params))


@torch.no_grad()
def ema_update_adapter(model: nn.Module, decay: float, src: str = "default", dst: str = "old") -> None:
    """``dst <- decay * dst + (1 - decay) * src`` (math.md §2 step 7); one foreach lerp over cached lists."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay: expected a value in [0, 1], got {decay}")
    src_params, dst_params = _adapter_pairs(model, src, dst)
    torch._foreach_lerp_(_local(dst_params), _local(src_params), 1.0 - decay)


def old_adapter_decay(step: int, *, flat: int = 0, uprate: float = 1e-3, uphold: float = 0.5) -> float:
    """``d = min(max(step - flat, 0) * uprate, uphold)`` (math.md §2 step 7, ref defaults)."""
    return min(max(step - flat, 0) * uprate, uphold)


class EMA:
    """Evaluation EMA: ``shadow <- d * shadow + (1 - d) * param``, ``d = min((1+s)/(10+s), max_decay)``,
    ``s`` the optimizer steps taken so far including the one just taken (1 at the first update), as the
    reference counts it (math.md §2 step 7; NVlabs/DiffusionNFT@24af5554 flow_grpo/ema.py
    ``EMAModuleWrapper``,
    called with ``global_step`` after its increment in scripts/train_nft_sd3.py).  The shadow is kept in
    fp32; updates are foreach.
    """

    def __init__(self, params: Iterable[torch.Tensor], max_decay: float = 0.9):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("params: expected at least one parameter, got none")
        self.max_decay = float(max_decay)
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self.num_updates = 0

    def decay(self, step: int | None = None) -> float:
        """The decay of the update at optimizer step ``step`` (default: the next update, ``num_updates +
        1``)."""
        s = self.num_updates + 1 if step is None else step
        return min((1 + s) / (10 + s), self.max_decay)

    @torch.no_grad()
    def update(self, step: int | None = None) -> float:
        """One EMA step after optimizer step ``step`` (1 at the first; default: ``num_updates + 1``);
        returns the decay used."""
        d = self.decay(step)
        current = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        torch._foreach_lerp_(_local(self.shadow), _local(current), 1.0 - d)
        self.num_updates += 1
        return d

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Write the averaged values into ``params`` (default: the tracked parameters)."""
        params = self.params if params is None else list(params)
        if len(params) != len(self.shadow):
            raise ValueError(f"params: expected {len(self.shadow)} tensors, got {len(params)}")
        torch._foreach_copy_(_local(params), _local(self.shadow))

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Swap the averaged values into the tracked parameters inside the block; restore on exit."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(_local(self.params), _local(saved))

    def state_dict(self) -> dict:
        return {
            "shadow": [s.clone() for s in self.shadow],
            "num_updates": self.num_updates,
            "max_decay": self.max_decay,
        }

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(
            a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=True)
        ):
            raise ValueError(
                f"state['shadow']: expected {len(self.shadow)} tensors shaped like the parameters, "
                f"got {len(shadow)} with shapes {[tuple(s.shape) for s in shadow][:4]}..."
            )
        with torch.no_grad():
            torch._foreach_copy_(self.shadow, [s.to(self.shadow[0].device) for s in shadow])
        self.num_updates = int(state["num_updates"])
        self.max_decay = float(state["max_decay"])


def _pipeline(model: nn.Module):
    import diffusers

    # FSDP2's fully_shard swaps in a subclass (FSDPSD3Transformer2DModel): look the class up through the MRO
    cls_name = next(
        (c.__name__ for c in type(model).__mro__ if c.__name__ in _PIPELINES), type(model).__name__
    )
    if cls_name not in _PIPELINES:
        raise ValueError(f"model: expected one of {sorted(_PIPELINES)} for LoRA save/load, got {cls_name}")
    pipe_name, prefix = _PIPELINES[cls_name]
    # the pipeline module imports transformers' image processors, which warn once that torchvision is missing
    # (this project uses none of them): keep that out of the run's log
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return getattr(diffusers, pipe_name), prefix
    finally:
        hf_logging.set_verbosity(level)


def lora_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``adapter``'s weights under peft's own names (``get_peft_model_state_dict``: the module path
    and ``lora_A.weight`` / ``lora_B.weight``, no adapter name), as whole CPU copies (a snapshot: peft returns
    the live parameters, which e.g. an EMA swap restores afterwards).  Under FSDP2 the parameters are sharded
    DTensors and each is gathered: then every rank must call this, in the same order.
    """
    from peft.utils import get_peft_model_state_dict

    _check_adapter(model, adapter, "adapter")
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    out = {}
    for k, v in state.items():
        v = v.detach()
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.to("cpu", copy=True).contiguous()
    return out


def write_lora(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path,
               adapter: str = "default") -> Path:
    """Write ``state`` (from :func:`lora_state_dict`) with the pipeline class's own ``save_lora_weights``
    (it adds the component prefix, ``transformer.`` or ``unet.``, and the adapter's rank/alpha as metadata)
    to ``path/pytorch_lora_weights.safetensors``."""
    pipe_cls, prefix = _pipeline(model)
    metadata = model.peft_config[adapter].to_dict()
    path = Path(path)
    pipe_cls.save_lora_weights(
        path, **{f"{prefix}_lora_layers": state, f"{prefix}_lora_adapter_metadata": metadata}
    )
    return path / LORA_WEIGHT_NAME


def save_lora(model: nn.Module, path: str | Path, adapter: str = "default") -> Path:
    """Write adapter ``adapter`` to ``path/pytorch_lora_weights.safetensors`` the way diffusers pipelines save
    LoRAs (keys ``transformer.<module>.lora_A.weight``; rank/alpha in the metadata), so
    ``StableDiffusion3Pipeline.load_lora_weights(path)`` / ``FluxPipeline.load_lora_weights(path)`` load it
    (``StableDiffusionPipeline`` for a UNet).
    """
    return write_lora(model, lora_state_dict(model, adapter), path, adapter)


def load_lora(model: nn.Module, path: str | Path, adapter: str = "default") -> nn.Module:
    """Load a LoRA saved by :func:`save_lora` (or any diffusers-format LoRA) into ``model`` as ``adapter``.

    If ``adapter`` already exists its weights are overwritten in place (resume); otherwise it is created
    through diffusers' ``load_lora_adapter`` (rank and alpha from the file's metadata).
    """
    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"path: expected {file} (a diffusers LoRA file), which does not exist")
    pipe_cls, prefix = _pipeline(model)
    if adapter in adapter_names(model):
        from peft.utils import set_peft_model_state_dict

        state = pipe_cls.lora_state_dict(str(file))
        state = state[0] if isinstance(state, tuple) else state
        state = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        result = set_peft_model_state_dict(model, state, adapter_name=adapter)
        missing = [k for k in result.missing_keys if _adapter_of(k) == adapter]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"path: expected LoRA weights matching adapter {adapter!r}, got {len(missing)} missing "
                f"(e.g. {missing[:2]}) and {len(result.unexpected_keys)} unexpected keys"
            )
        return model
    saved = _active(model) if model.__dict__.get("_nft_tuner_layers") else None
    # directory + weight_name (not the file path): only then does diffusers read rank/alpha from the metadata
    model.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=prefix, adapter_name=adapter)
    _invalidate(model)
    if saved is not None:  # keep the previously active adapter active
        active = saved[0][0]
        _set_active(model, active if isinstance(active, str) else active[0])
    return model
