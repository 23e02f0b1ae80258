"""Every run exports its adapter in diffusers' LoRA format: one iteration of train.nft through its CLI
on tiny random SD3 and FLUX pipelines (train.ddpo on an SD1.5-style UNet one), then the exported
``<run>/lora`` and ``<run>/lora_ema`` loaded into a fresh pipeline instance with ``pipe.load_lora_weights``
give the pipeline's denoiser the engine's adapter output on the same inputs; ``python -m train.export`` writes
the same file from the checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import models
import train.ddpo as ddpo
import train.nft as nft
from models.lora import LORA_WEIGHT_NAME
from train import export

from ._pg_helpers import make_tiny_sd_pipeline

PROMPTS = ["a red cat", "two blue dogs", "a green bird", "an apple"]


def _pipeline(family, tmp):
    """``(pipeline class, saved pipeline folder, prompts file)`` for a tiny random pipeline of ``family``."""
    if family == "sd15":
        from diffusers import StableDiffusionPipeline

        root, prompts = make_tiny_sd_pipeline(tmp)
        return StableDiffusionPipeline, root, prompts
    from tests.models.test_text_vae import _flux_pipeline, _sd3_pipeline

    pipe = _sd3_pipeline(tmp) if family == "sd3" else _flux_pipeline(tmp)
    pipe.save_pretrained(tmp / "pipe")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return type(pipe), tmp / "pipe", tmp / "prompts.txt"


def _train_one_iteration(family, root, prompts, run):
    """One iteration through the module's command line; a high learning rate so the adapter moves."""
    argv = [
        "--model", str(root), "--prompts", str(prompts), "--reward", "jpeg_compressibility",
        "--models.resolution", "16", "--models.lora-rank", "4", "--models.lora-alpha", "8",
        "--sample.prompts-per-iter", "2", "--sample.images-per-prompt", "4", "--sample.num-steps", "4",
        "--eval.num-prompts", "2", "--eval.num-steps", "2", "--eval.grid-images", "2",
        "--log.progress", "false", "--max-iters", "1", "--run-dir", str(run), "--seed", "3",
    ]  # fmt: skip
    if family == "sd15":
        argv += ["--preset", "sd1.5", "--models.dtype", "float32", "--sample.rollout-batch", "8",
                 "--train.batch-size", "4", "--sample.forward-chunk", "4", "--train.lr", "3e-2",
                 "--train.clip-range", "10"]  # fmt: skip
        assert ddpo.main(argv) == 0
    else:
        argv += ["--sample.rollout-batch", "8", "--train.batch-size", "8", "--train.lr", "3e-2"]
        assert nft.main(argv) == 0


def _max_ulp_tol(want: torch.Tensor, reduction: int) -> float:
    """fp32 rounding over a sum of ``reduction`` terms, relative to the output's magnitude, with room for the
    depth of the tiny models (a few such layers)."""
    return 16 * torch.finfo(torch.float32).eps * reduction**0.5 * float(want.abs().max())


@pytest.mark.parametrize("family", ["sd3", "flux", "sd15"])
def test_exported_lora_loads_into_a_diffusers_pipeline(tmp_path, capsys, family):
    pipe_cls, root, prompts = _pipeline(family, tmp_path)
    run = tmp_path / "run"
    capsys.readouterr()
    _train_one_iteration(family, root, prompts, run)
    cap = capsys.readouterr()
    out = cap.out
    assert "\r" not in cap.err  # no loading bars from diffusers / transformers in a log
    assert f"LoRA: {run / 'lora'} (trained), {run / 'lora_ema'} (eval EMA" in out
    assert "held-out score (reward jpeg_compressibility" in out

    policy, it = export.load_policy(run)
    assert it == 1
    torch.manual_seed(0)
    x = torch.randn(2, *policy.latent_shape)
    ts = torch.tensor([700.0, 250.0])
    cond = policy.encode(PROMPTS[:2])
    with torch.no_grad():
        with policy.adapter("default"):
            want = policy.denoiser(x, ts, cond)
            with policy.eval_weights():
                want_ema = policy.denoiser(x, ts, cond)
        with policy.adapters_disabled():
            base = policy.denoiser(x, ts, cond)
    # widest reduction: the attention / MLP inner products over the model width
    width = max(p.shape[-1] for p in policy.transformer.parameters() if p.dim() == 2)
    tol = _max_ulp_tol(want, width)
    assert (want - base).abs().max() > 100 * tol  # the trained adapter moved the output
    assert (want - want_ema).abs().max() > 100 * tol  # and the EMA is not the trained adapter

    for sub, expected in (("lora", want), ("lora_ema", want_ema)):
        pipe = pipe_cls.from_pretrained(str(root))
        pipe.load_lora_weights(str(run / sub))
        denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
        with torch.no_grad():
            got = models.as_denoiser(denoiser)(x, ts, cond)
        torch.testing.assert_close(got, expected, rtol=0, atol=tol, msg=f"{family} {sub}")

    # train.export writes the same file from the checkpoint
    for ema, sub in ((False, "lora"), (True, "lora_ema")):
        args = [str(run), "--iteration", "1", "--out", str(tmp_path / f"export_{sub}")]
        assert export.main(args + (["--ema"] if ema else [])) == 0
        a = load_file(tmp_path / f"export_{sub}" / LORA_WEIGHT_NAME)
        b = load_file(run / sub / LORA_WEIGHT_NAME)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_export_refuses_bad_input(tmp_path, capsys):
    assert export.main([str(tmp_path / "nowhere")]) == 2
    assert "RUN_DIR: expected a run directory holding config.json" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "checkpoints" / "iter_000005.pt").write_bytes(b"")
    # as a run writes it: the checkpoint's checksum beside it is not a checkpoint
    (tmp_path / "run" / "checkpoints" / "iter_000005.pt.sha256").write_text("0  iter_000005.pt\n")
    assert export.main([str(tmp_path / "run"), "--iteration", "3"]) == 2
    assert "--iteration: expected one of the checkpointed iterations [5], got 3" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "a_file")]) == 2
    assert f"--out: expected a directory (new or existing), got the file {str(tmp_path / 'a_file')!r}" in (
        capsys.readouterr().err
    )
