"""The DiT fast path: swap the fused ``kernels`` DiT ops into a diffusers SD3 / FLUX transformer, and undo it.

``apply_fast_path(transformer)`` rebinds, on the instance only (the diffusers classes are untouched):

* adaLN norms -- ``AdaLayerNormZero``, ``SD35AdaLayerNormZeroX``, ``AdaLayerNormZeroSingle``,
  ``AdaLayerNormContinuous`` (LayerNorm without affine): ``norm(x) * (1 + scale) + shift`` in one pass
  (``kernels.ada_layer_norm``);
* QK norms -- diffusers ``RMSNorm`` (SD3.5) and ``torch.nn.RMSNorm`` (FLUX): ``kernels.rms_norm``;
* block bodies -- ``JointTransformerBlock`` (SD3 / SD3.5, dual attention included), ``FluxTransformerBlock``
  and ``FluxSingleTransformerBlock``: every ``x + gate * y`` is ``kernels.gated_residual`` and every
  ``norm2(x) * (1 + scale) + shift`` is ``kernels.ada_layer_norm``; the block bodies are otherwise diffusers'
  0.42 code (feed-forward chunking, IP-adapter outputs and the fp16 clip kept);
* FLUX attention -- ``FluxAttnProcessor`` becomes :class:`FastFluxAttnProcessor` (rotary embedding by
  ``kernels.rotary_emb``; its attention backend setting is carried over, so
  ``models.attention.set_attention_backend`` works before or after patching).

Attention itself, the linears and peft's LoRA layers are untouched, so LoRA adapters (``models.lora``) and
gradient checkpointing compose with the patch.  The ops are ``torch.library`` custom ops with fake kernels
(``torch.compile`` traces them) and do no host reads (CUDA graphs capture them).  Outputs match the unpatched
model to the storage dtype's rounding: the fused ops do their math in fp32 where the eager chain rounds
intermediates (e.g. ``1 + scale`` in bf16).  ``revert_fast_path`` restores the original ``forward`` methods
and processor objects exactly.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

import kernels

_STATE = "_nft_fast_path"
_MISSING = object()


# ----------------------------------------------------------------------------------------------------------
# Norm modules
# ----------------------------------------------------------------------------------------------------------
def _plain_layer_norm(norm) -> bool:
    """A LayerNorm over the last dim with no affine: what ``kernels.ada_layer_norm`` computes."""
    return (
        isinstance(norm, nn.LayerNorm)
        and norm.weight is None
        and norm.bias is None
        and len(norm.normalized_shape) == 1
    )


def _ada_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    x = kernels.ada_layer_norm(x, scale_msa, shift_msa, self.norm.eps)
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_zero_x_forward(self, hidden_states, emb=None):
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = (
        emb.chunk(9, dim=1)
    )
    norm_hidden_states = kernels.ada_layer_norm(hidden_states, scale_msa, shift_msa, self.norm.eps)
    norm_hidden_states2 = kernels.ada_layer_norm(hidden_states, scale_msa2, shift_msa2, self.norm.eps)
    return norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2


def _ada_zero_single_forward(self, x, emb=None):
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
    return kernels.ada_layer_norm(x, scale_msa, shift_msa, self.norm.eps), gate_msa


def _ada_continuous_forward(self, x, conditioning_embedding):
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return kernels.ada_layer_norm(x, scale, shift, self.norm.eps)


def _diffusers_rms_forward(self, hidden_states):
    # diffusers' RMSNorm returns the weight's dtype for a half-precision weight, fp32 for an fp32 weight
    # (the fp32 statistics promote the product), and the input's dtype without a weight.
    if self.weight is None:
        out_dtype = hidden_states.dtype
    elif self.weight.dtype in (torch.float16, torch.bfloat16):
        out_dtype = self.weight.dtype
    else:
        out_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    return kernels.rms_norm(hidden_states, self.weight, self.eps, out_dtype=out_dtype)


def _torch_rms_forward(self, x):
    return kernels.rms_norm(x, self.weight, self.eps, out_dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Transformer blocks (diffusers 0.42's bodies with the fused gated residuals / second adaLN)
# ----------------------------------------------------------------------------------------------------------
def _feed_forward(block, ff, x):
    if getattr(block, "_chunk_size", None) is not None:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)
    return ff(x)


def _sd3_block_forward(
    self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs: dict[str, Any] | None = None
):
    joint_attention_kwargs = joint_attention_kwargs or {}
    if self.use_dual_attention:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2 = (
            self.norm1(hidden_states, emb=temb)
        )
    else:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    if self.context_pre_only:
        norm_encoder_hidden_states = self.norm1_context(encoder_hidden_states, temb)
    else:
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb
        )
    attn_output, context_attn_output = self.attn(
        hidden_states=norm_hidden_states,
        encoder_hidden_states=norm_encoder_hidden_states,
        **joint_attention_kwargs,
    )
    hidden_states = kernels.gated_residual(hidden_states, attn_output, gate_msa)
    if self.use_dual_attention:
        attn_output2 = self.attn2(hidden_states=norm_hidden_states2, **joint_attention_kwargs)
        hidden_states = kernels.gated_residual(hidden_states, attn_output2, gate_msa2)
    norm_hidden_states = kernels.ada_layer_norm(hidden_states, scale_mlp, shift_mlp, self.norm2.eps)
    ff_output = _feed_forward(self, self.ff, norm_hidden_states)
    hidden_states = kernels.gated_residual(hidden_states, ff_output, gate_mlp)
    if self.context_pre_only:
        return None, hidden_states
    encoder_hidden_states = kernels.gated_residual(encoder_hidden_states, context_attn_output, c_gate_msa)
    norm_encoder_hidden_states = kernels.ada_layer_norm(
        encoder_hidden_states, c_scale_mlp, c_shift_mlp, self.norm2_context.eps
    )
    context_ff_output = _feed_forward(self, self.ff_context, norm_encoder_hidden_states)
    encoder_hidden_states = kernels.gated_residual(encoder_hidden_states, context_ff_output, c_gate_mlp)
    return encoder_hidden_states, hidden_states


def _flux_block_forward(
    self,
    hidden_states,
    encoder_hidden_states,
    temb,
    image_rotary_emb=None,
    joint_attention_kwargs: dict[str, Any] | None = None,
):
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
        encoder_hidden_states, emb=temb
    )
    joint_attention_kwargs = joint_attention_kwargs or {}
    attention_outputs = self.attn(
        hidden_states=norm_hidden_states,
        encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb,
        **joint_attention_kwargs,
    )
    attn_output, context_attn_output = attention_outputs[0], attention_outputs[1]
    hidden_states = kernels.gated_residual(hidden_states, attn_output, gate_msa)
    norm_hidden_states = kernels.ada_layer_norm(hidden_states, scale_mlp, shift_mlp, self.norm2.eps)
    hidden_states = kernels.gated_residual(hidden_states, self.ff(norm_hidden_states), gate_mlp)
    if len(attention_outputs) == 3:
        hidden_states = hidden_states + attention_outputs[2]
    encoder_hidden_states = kernels.gated_residual(encoder_hidden_states, context_attn_output, c_gate_msa)
    norm_encoder_hidden_states = kernels.ada_layer_norm(
        encoder_hidden_states, c_scale_mlp, c_shift_mlp, self.norm2_context.eps
    )
    encoder_hidden_states = kernels.gated_residual(
        encoder_hidden_states, self.ff_context(norm_encoder_hidden_states), c_gate_mlp
    )
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _flux_single_block_forward(
    self,
    hidden_states,
    encoder_hidden_states,
    temb,
    image_rotary_emb=None,
    joint_attention_kwargs: dict[str, Any] | None = None,
):
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
    joint_attention_kwargs = joint_attention_kwargs or {}
    attn_output = self.attn(
        hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **joint_attention_kwargs
    )
    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    hidden_states = kernels.gated_residual(residual, self.proj_out(hidden_states), gate)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


# ----------------------------------------------------------------------------------------------------------
# FLUX attention processor with the fused rotary embedding
# ----------------------------------------------------------------------------------------------------------
def _fast_flux_processor_class():
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

    class FastFluxAttnProcessor(FluxAttnProcessor):
        """diffusers' ``FluxAttnProcessor`` (0.42), rotary embedding fused (``kernels.rotary_emb``)."""

        def __call__(
            self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
        ):
            query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
                attn, hidden_states, encoder_hidden_states
            )
            query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
            key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
            value = value.unflatten(-1, (-1, attn.head_dim))
            if attn.added_kv_proj_dim is not None:
                encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
                encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
                encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
                query = torch.cat([encoder_query, query], dim=1)
                key = torch.cat([encoder_key, key], dim=1)
                value = torch.cat([encoder_value, value], dim=1)
            if image_rotary_emb is not None:
                cos, sin = image_rotary_emb
                cos, sin = cos.to(query.device), sin.to(query.device)
                query = kernels.rotary_emb(query, cos, sin, sequence_dim=1)
                key = kernels.rotary_emb(key, cos, sin, sequence_dim=1)
            hidden_states = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
            hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
            if encoder_hidden_states is not None:
                encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                    [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                    dim=1,
                )
                hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
                return hidden_states, encoder_hidden_states
            return hidden_states

    return FluxAttnProcessor, FastFluxAttnProcessor


# ----------------------------------------------------------------------------------------------------------
# apply / revert
# ----------------------------------------------------------------------------------------------------------
def _forward_patches() -> list[tuple[type, Any, Any]]:
    """``(module class, predicate, fast forward)``: exact class matches only (subclasses may differ)."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.normalization import (
        AdaLayerNormContinuous,
        AdaLayerNormZero,
        AdaLayerNormZeroSingle,
        RMSNorm,
        SD35AdaLayerNormZeroX,
    )
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    def plain_norm(m):
        return _plain_layer_norm(m.norm)

    def plain_norm2(m):
        return _plain_layer_norm(m.norm2) and (m.norm2_context is None or _plain_layer_norm(m.norm2_context))

    return [
        (AdaLayerNormZero, plain_norm, _ada_zero_forward),
        (SD35AdaLayerNormZeroX, plain_norm, _ada_zero_x_forward),
        (AdaLayerNormZeroSingle, plain_norm, _ada_zero_single_forward),
        (AdaLayerNormContinuous, plain_norm, _ada_continuous_forward),
        (RMSNorm, lambda m: m.bias is None, _diffusers_rms_forward),
        (nn.RMSNorm, lambda m: len(m.normalized_shape) == 1 and m.eps is not None, _torch_rms_forward),
        (JointTransformerBlock, plain_norm2, _sd3_block_forward),
        (FluxTransformerBlock, plain_norm2, _flux_block_forward),
        (FluxSingleTransformerBlock, lambda m: True, _flux_single_block_forward),
    ]


def is_fast_path_applied(transformer: nn.Module) -> bool:
    return _STATE in transformer.__dict__


def apply_fast_path(transformer: nn.Module) -> dict[str, int]:
    """Swap the fused DiT ops into ``transformer`` (an SD3Transformer2DModel or FluxTransformer2DModel, with
    or without peft LoRA adapters) in place; returns how many modules of each kind were patched.

    Undo with :func:`revert_fast_path`.  Applying twice raises ``ValueError``.
    """
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"transformer: expected a torch.nn.Module, got {type(transformer).__name__}")
    if is_fast_path_applied(transformer):
        raise ValueError(
            "transformer: expected a model without the fast path, got one already patched "
            "(call revert_fast_path first)"
        )
    patches = _forward_patches()
    flux_processor, fast_processor = _fast_flux_processor_class()
    undo: list[tuple[Any, str, Any]] = []
    counts: dict[str, int] = {}
    for module in transformer.modules():
        for cls, applies, fast_forward in patches:
            # a module whose forward is already wrapped on the instance (accelerate hooks, another patch)
            # is left alone: replacing it would drop the wrapper
            if type(module) is cls and "forward" not in module.__dict__ and applies(module):
                undo.append((module, "forward", _MISSING))
                module.forward = types.MethodType(fast_forward, module)
                counts[cls.__name__] = counts.get(cls.__name__, 0) + 1
                break
        processor = getattr(module, "processor", None)
        if type(processor) is flux_processor:
            fast = fast_processor()
            fast._attention_backend = processor._attention_backend
            fast._parallel_config = processor._parallel_config
            undo.append((module, "processor", processor))
            module.processor = fast
            counts["FluxAttnProcessor"] = counts.get("FluxAttnProcessor", 0) + 1
    if not undo:
        raise ValueError(
            f"transformer: expected an SD3 / FLUX diffusers transformer with adaLN norms, got a "
            f"{type(transformer).__name__} with nothing to patch"
        )
    transformer.__dict__[_STATE] = undo
    return counts


def revert_fast_path(transformer: nn.Module) -> None:
    """Undo :func:`apply_fast_path`: the original ``forward`` methods and processor objects come back."""
    undo = transformer.__dict__.pop(_STATE, None)
    if undo is None:
        raise ValueError("transformer: expected a model patched by apply_fast_path, got an unpatched one")
    for module, attr, original in reversed(undo):
        if attr == "forward":  # patched only where the instance had no forward of its own
            del module.forward
        else:
            module.processor = original
