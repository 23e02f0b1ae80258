"""Which torch SDPA backend gives NaN LoRA gradients through the tiny FLUX model in bf16 autocast on CUDA.

    python -m bench.diag.flux_sdpa_nan            # on a GPU machine (diffusers carried, see bench.gpu_check)

The case of ``tests/models/test_patch.py::test_cuda_bf16_fast_path_with_lora_and_compile[flux-tiny]``: for
each backend set (torch's default choice, each backend alone, all but cuDNN) and for bf16 autocast and fp32,
one forward and the LoRA gradients of ``mean(out^2)``; prints one line per case: NaN in the output, how many
adapter gradients are non-finite, and the SDPA calls' shapes.
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import models
from models import lora

BACKEND_SETS = {
    "default": None,
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
    "no_cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}


def _model(preset: str, bf16: bool, device: str):
    model = models.load_transformer(preset, seed=0)
    lora.add_adapters(model, rank=4, alpha=8)
    with torch.no_grad():  # non-zero B so the adapters matter (as the test does)
        g = torch.Generator().manual_seed(7)
        for p in lora.adapter_parameters(model, "default"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model = model.to(device)
    if bf16:
        for n, p in model.named_parameters():
            if "lora_" not in n:
                p.data = p.data.to(torch.bfloat16)
    return model


def run_case(preset: str, backends, bf16: bool, device: str = "cuda") -> dict:
    calls = []
    original = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        q = args[0] if args else kwargs["query"]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        calls.append({"q": list(q.shape), "dtype": str(q.dtype), "mask": mask is not None})
        return original(*args, **kwargs)

    model = _model(preset, bf16, device)
    den = models.as_denoiser(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g).to(device)
    cond = models.Conditioning(
        torch.randn(2, 7, 32, generator=g).to(device), torch.randn(2, 32, generator=g).to(device)
    )
    names = [n for n, p in model.named_parameters() if "lora_" in n and ".default." in n]
    params = lora.adapter_parameters(model, "default")
    F.scaled_dot_product_attention = recording
    try:
        with (
            sdpa_kernel(backends) if backends else contextlib.nullcontext(),
            torch.autocast(device, dtype=torch.bfloat16, enabled=bf16),
        ):
            out = den(x, torch.tensor([700.0, 30.0], device=device), cond)
            grads = torch.autograd.grad(out.float().square().mean(), params)
    except RuntimeError as exc:
        return {"error": str(exc)[:200]}
    finally:
        F.scaled_dot_product_attention = original
    bad = [n for n, gr in zip(names, grads, strict=True) if not torch.isfinite(gr).all()]
    return {
        "out_nan": bool(out.isnan().any()),
        "nonfinite_grads": len(bad),
        "of": len(names),
        "first": bad[:3],
        "sdpa_calls": len(calls),
        "sdpa_call_0": calls[0] if calls else None,
    }


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        print("bench.diag.flux_sdpa_nan: needs a CUDA device", file=sys.stderr)
        return 2
    presets = (argv if argv is not None else sys.argv[1:]) or ["flux-tiny", "sd3-tiny"]
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "cudnn": torch.backends.cudnn.version(),
                "device": torch.cuda.get_device_name(),
            }
        )
    )
    for preset in presets:
        for label, backends in BACKEND_SETS.items():
            for bf16 in (True, False):
                case = f"{preset}/{label}/{'bf16-autocast' if bf16 else 'fp32'}"
                print(case, json.dumps(run_case(preset, backends, bf16)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
