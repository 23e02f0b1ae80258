"""Triton implementations of every op (layers 1-3 of CONVENTIONS.md "An op, in four layers").

Importing this package decorates the ``@triton.jit`` kernels (compiled, or interpreted when
``TRITON_INTERPRET=1`` is set at that moment) and registers the ``nft_kernels::*`` custom ops with
``torch.library`` (fake tensors and autograd included, so they trace under ``torch.compile(fullgraph=True)``).
It needs triton; ``kernels`` imports it only where triton is installed.
"""

from .elementwise import dpm2_step_op, euler_step_op, interpolate_op, paired_interpolate_op
from .gaussian import gaussian_kl_op, gaussian_log_prob_op
from .nft import nft_loss_op
from .preference import FORM_DPO, FORM_MAPO, preference_loss_op
from .random import randn_op
from .transition import (
    KIND_CPS,
    KIND_DDIM,
    KIND_SDE,
    LOGP_GAUSSIAN,
    LOGP_SQUARED,
    cps_level,
    transition_sample_op,
    transition_score_op,
)

__all__ = [
    "interpolate_op",
    "paired_interpolate_op",
    "euler_step_op",
    "dpm2_step_op",
    "randn_op",
    "transition_sample_op",
    "transition_score_op",
    "KIND_SDE",
    "KIND_CPS",
    "KIND_DDIM",
    "LOGP_GAUSSIAN",
    "LOGP_SQUARED",
    "cps_level",
    "gaussian_log_prob_op",
    "gaussian_kl_op",
    "nft_loss_op",
    "preference_loss_op",
    "FORM_DPO",
    "FORM_MAPO",
]
