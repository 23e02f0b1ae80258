"""Attention backend selection through diffusers' attention dispatch (diffusers.models.attention_dispatch).

Names: ``"sdpa"`` (alias ``"native"``: torch ``scaled_dot_product_attention``, which itself picks flash /
memory-efficient / math kernels), ``"flash"`` (flash-attn 3 ``"_flash_3"`` when installed, else flash-attn 2
``"flash"``), ``"xformers"``, ``"auto"``, or any raw ``AttentionBackendName`` value.

``"auto"`` on CPU, or for an fp32 model, is ``native``. On CUDA with fp16/bf16 weights it is flash-attn 3 on
Hopper (sm90) when installed, else flash-attn 2 (sm80+) when installed, else ``native``. xformers is never
picked automatically: torch's SDPA already runs flash / memory-efficient kernels and xformers adds no
consistent speed-up over it; name it explicitly to use it.

diffusers 0.42's SD3 attention processor calls torch SDPA directly and ignores the dispatch setting, so SD3
models get :class:`JointAttnDispatchProcessor` (same math, dispatched); FLUX processors dispatch already.
"""

from __future__ import annotations

import logging
import os

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

logger = logging.getLogger(__name__)

_ALIASES = {"sdpa": "native", "torch": "native", "flash2": "flash", "flash3": "_flash_3"}
_INSTALL = {
    "flash": "flash-attn 2 (`pip install .[gpu]` or `pip install flash-attn`)",
    "_flash_3": "flash-attn 3 (the FlashAttention `hopper/` build, `flash_attn_interface`)",
    "xformers": "xformers (`pip install .[gpu]` or `pip install xformers`)",
}


class JointAttnDispatchProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3 joint attention), routed through ``dispatch_attention_fn``.

    ``softmax(Q K^T / sqrt(d)) V`` over the concatenated ``[image; context]`` tokens, in the ``[B, S, H, D]``
    layout the dispatcher takes; the backend is ``self._attention_backend`` (set_attention_backend sets it).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            ctx_q = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            ctx_k = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            ctx_v = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=1)
            key = torch.cat([key, ctx_k], dim=1)
            value = torch.cat([value, ctx_v], dim=1)
        out = dispatch_attention_fn(query, key, value, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, : residual.shape[1]], out[:, residual.shape[1]:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, encoder_hidden_states) if encoder_hidden_states is not None else out


def disable_cudnn_sdpa() -> bool:
    """Turn torch SDPA's cuDNN backend off process-wide for training (flash, memory-efficient and math stay as
    they are); returns whether it was on.  ``NFT_CUDNN_SDPA=1`` keeps it (then this returns False).

    torch >= 2.11 prefers cuDNN attention on Hopper.  On an H200 (torch 2.11, CUDA 13) its bf16 *backward*
    gave NaN LoRA gradients through the tiny FLUX model's attention (2 heads of 16, 71 tokens, no mask) while
    its forward, and the flash, memory-efficient and math backends forward and backward, were finite
    (``bench/diag/flux_sdpa_nan.py``, results in ``bench/results/gpu-check-h200/``).  Public reports of the
    same kind: pytorch/pytorch#196678, huggingface/trl#7181.  Training calls this before any forward, so a
    checkpointed block's recomputation in the backward cannot pick cuDNN either; rollouts lose only cuDNN's
    forward, which other kernels replace.
    """
    if os.environ.get("NFT_CUDNN_SDPA", "") == "1" or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    logger.info("torch SDPA: cuDNN backend off for training (NFT_CUDNN_SDPA=1 keeps it)")
    return True


def available_backends() -> dict[str, bool]:
    """Which optional attention libraries diffusers can use here (installed and of a supported version)."""
    from diffusers.models import attention_dispatch as ad

    return {
        "native": True,
        "flash": bool(getattr(ad, "_CAN_USE_FLASH_ATTN", False)),
        "_flash_3": bool(getattr(ad, "_CAN_USE_FLASH_ATTN_3", False)),
        "xformers": bool(getattr(ad, "_CAN_USE_XFORMERS_ATTN", False)),
    }


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def resolve_backend(backend: str, model: torch.nn.Module | None = None) -> str:
    """The diffusers ``AttentionBackendName`` value ``backend`` stands for on ``model`` (see module doc)."""
    if not isinstance(backend, str):
        raise ValueError(f"backend: expected a string, got {type(backend).__name__}")
    name = _ALIASES.get(backend.lower(), backend.lower())
    avail = available_backends()
    device, dtype = _model_device_dtype(model) if model is not None else (torch.device("cpu"), torch.float32)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if device.type != "cuda" or not low_precision:
            return "native"
        major = torch.cuda.get_device_capability(device)[0]
        if avail["_flash_3"] and major == 9:
            return "_flash_3"
        if avail["flash"] and major >= 8:
            return "flash"
        return "native"
    if name == "flash":
        name = "_flash_3" if avail["_flash_3"] else "flash"
    valid = {b.value for b in AttentionBackendName}
    if name not in valid:
        raise ValueError(f"backend: expected 'auto', 'sdpa', 'flash', 'xformers' or a diffusers "
                         f"AttentionBackendName value, got {backend!r}")
    if name in _INSTALL and not avail[name]:
        raise ImportError(f"backend {backend!r} needs {_INSTALL[name]}, which is not installed here")
    if name in ("flash", "_flash_3", "xformers"):
        if model is not None and device.type != "cuda":
            raise ValueError(f"backend {backend!r}: expected the model on a CUDA device, got {device}")
        if name != "xformers" and model is not None and not low_precision:
            raise ValueError(f"backend {backend!r}: flash-attn runs fp16/bf16 only, got a {dtype} model "
                             "(cast it first)")
    return name


def _use_dispatch_processors(model: torch.nn.Module) -> int:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    swapped = 0
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), JointAttnProcessor2_0):
            module.set_processor(JointAttnDispatchProcessor())
            swapped += 1
    return swapped


def set_attention_backend(model: torch.nn.Module, backend: str = "auto") -> str:
    """Select the attention backend of a diffusers model; returns (and logs) the diffusers backend name used.

    A named backend that is not installed raises ``ImportError`` saying what to install.
    """
    name = resolve_backend(backend, model)
    _use_dispatch_processors(model)
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    undispatched = sorted({type(m.processor).__name__ for m in model.modules()
                           if isinstance(m, (Attention, AttentionModuleMixin))
                           and not hasattr(m.processor, "_attention_backend")})
    if undispatched and name != "native":
        raise ValueError(f"backend {backend!r}: {type(model).__name__} has attention processors that ignore "
                         f"diffusers' dispatch ({', '.join(undispatched)}); only 'sdpa' applies to it")
    model.set_attention_backend(name)
    logger.info("attention backend: %s (asked for %r)", name, backend)
    return name
