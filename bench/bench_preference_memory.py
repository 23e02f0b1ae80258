"""Peak memory and time of one preference optimizer step (``train.dpo``'s ``train_on``: the paired forward,
the loss, the backward, AdamW) for Diffusion-DPO against MaPO on the same batch (docs/math.md §6).

MaPO has no reference model: no reference forward and no adapter switch.  Diffusion-DPO's reference is the
same network with the LoRA adapters disabled (no second copy of the weights), run without gradient before
the trained forward.  Each (model, loss) runs in its own subprocess: on the CPU the number is the growth of
the peak RSS (``ru_maxrss``) over the peak after a warm-up (the trained forward on the same batch without
gradient), with glibc's mmap threshold at 64 KiB so that freed activations leave the RSS; on CUDA
``torch.cuda.max_memory_allocated`` after a reset, minus the memory allocated before the step.  The time is
the median of three further steps.  Models: the embedded default and a tiny random SD3 pipeline built with
diffusers.

    python -m bench.bench_preference_memory                      # both models, DPO and MaPO
    python -m bench.bench_preference_memory --model sd3-tiny --batch 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._common import (
    check_json_path,
    memory_bench_models,
    memory_bench_parser,
    peak_memory_of,
    run_isolated,
)

LOSSES = ("dpo", "mapo")


def _trainer(model: str, loss: str, batch: int, device, resolution: int, workdir: Path):
    import torch

    from train import dpo
    from train.config import parse_cli
    from train.evaluation import Evaluator
    from train.policy import build_policy
    from train.rewards.registry import build_reward

    argv = ["--loss", loss, "--train.batch-size", str(batch), "--train.grad-accum", "1",
            "--train.timestep-draws", "1", "--log.progress", "false"]  # fmt: skip
    if model == "sd3-tiny":
        from tests.models.test_text_vae import _sd3_pipeline

        pipe_dir = workdir / "pipe"
        if not (pipe_dir / "model_index.json").exists():
            _sd3_pipeline(workdir).save_pretrained(pipe_dir)
        (workdir / "prompts.txt").write_text("a red cat\na blue dog\n")
        argv += ["--model", str(pipe_dir), "--prompts", str(workdir / "prompts.txt"), "--preset", "sd3.5-m",
                 "--models.dtype", "float32", "--models.resolution", str(resolution), "--models.lora-rank",
                 "8", "--models.lora-alpha", "8", "--reward", "jpeg_compressibility", "--online"]  # fmt: skip
    cfg = parse_cli(dpo.DPOConfig, argv, prog="bench", description="", presets=dpo.PRESETS)
    dpo.validate(cfg)
    reward = build_reward(cfg.reward)
    torch.manual_seed(0)
    policy = build_policy(cfg.models, preset=cfg.preset, model_path=cfg.model, device=device, seed=0,
                          prompts=cfg.prompts, eval_prompts=cfg.eval_prompts)  # fmt: skip
    evaluator = Evaluator(cfg.eval, seed=0, reward=reward)
    tr = dpo.DPOTrainer(cfg, workdir / f"run-{loss}", policy, reward, evaluator)
    g = torch.Generator().manual_seed(0)
    texts = [policy.prompt_text(p) for p in policy.sample_train_prompts(batch, 0)]
    shape = (batch, *policy.latent_shape)
    pairs = dpo.PairSet(texts, torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1)
    return tr, pairs


def _one(args) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    tr, pairs = _trainer(args.model, args.loss, args.batch, device, args.resolution, Path(args.workdir))
    pol = tr.policy
    ref_ctx = pol.adapters_disabled

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad(), pol.adapter("default"):  # warm-up: weights, text encoders, the forward's buffers
        x = torch.cat([pairs.x_w, pairs.x_l]).to(device, pol.dtype)
        t = torch.full((len(x),), 500.0, device=device)
        pol.train_denoiser(x, t, pol.encode(list(pairs.texts) * 2))
    peak = peak_memory_of(lambda: tr.train_on(1, pairs, ref_ctx), device)
    times = []
    for it in range(2, 5):
        sync()
        t0 = time.perf_counter()
        tr.train_on(it, pairs, ref_ctx)
        sync()
        times.append(time.perf_counter() - t0)
    return {"model": args.model, "loss": args.loss, "batch": args.batch, "device": device.type,
            "peak_mb": peak / 2**20, "step_s": statistics.median(times),
            "ref_forwards": tr.ref_forwards}  # fmt: skip


def main(argv=None) -> int:
    ap = memory_bench_parser(__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=0, help="pairs per step; 0: 32 (embedded), 4 (sd3-tiny)")
    ap.add_argument("--loss", default="dpo", choices=LOSSES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    check_json_path(args.json)
    if args.one:
        print(json.dumps(_one(args)), flush=True)
        return 0
    models = memory_bench_models(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            batch = args.batch or (32 if model == "embedded" else 4)
            for loss in LOSSES:
                argv = ["--model", model, "--loss", loss, "--batch", str(batch), "--resolution",
                        str(args.resolution), "--device", args.device, "--threads", str(args.threads),
                        "--workdir", tmp]  # fmt: skip
                try:
                    row = run_isolated("bench.bench_preference_memory", argv)
                except RuntimeError as e:
                    print(e, file=sys.stderr)
                    return 1
                rows.append(row)
                print(f"{row['model']:9s} {row['device']} {batch:3d} pairs {loss:4s}: peak "
                      f"+{row['peak_mb']:7.1f} MB, {row['step_s'] * 1000:7.1f} ms/step, "
                      f"{row['ref_forwards']} reference forwards", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
