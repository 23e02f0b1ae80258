"""Peak memory of one DRaFT-K step (train.reward_backprop.sample_with_grad: sample, decode, reward, backward)
against the gradient window K, with and without per-step gradient checkpointing (math.md §5).

Each (model, K, checkpointing) runs in its own subprocess: on the CPU the number is the growth of the peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over the peak after a warm-up step with the same batch
and K = 1 without gradient (glibc's mmap threshold is set to 64 KiB in the subprocess so that freed
activations leave the RSS instead of fragmenting the heap); on CUDA ``torch.cuda.max_memory_allocated``
after a reset, minus the memory allocated before the step.  Models: the embedded default (identity
decoder) and a tiny random SD3 pipeline built with diffusers (VAE decode with grad).

    python -m bench.bench_reward_backprop_memory                      # both models, K = 1 2 5 10
    python -m bench.bench_reward_backprop_memory --model sd3-tiny --batch 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench._common import (
    check_json_path,
    memory_bench_models,
    memory_bench_parser,
    peak_memory_of,
    run_isolated,
)


def _policy(model: str, device, resolution: int, workdir: Path):
    import torch

    from train.policy import ModelConfig, build_policy

    if model == "embedded":
        return build_policy(ModelConfig(lora_rank=32, lora_alpha=32.0), preset="tiny", model_path=None,
                            device=device, seed=0)  # fmt: skip
    from tests.models.test_text_vae import _sd3_pipeline

    pipe_dir = workdir / "pipe"
    if not (pipe_dir / "model_index.json").exists():
        _sd3_pipeline(workdir).save_pretrained(pipe_dir)
    (workdir / "prompts.txt").write_text("a red cat\na blue dog\n")
    mc = ModelConfig(lora_rank=8, lora_alpha=8.0, resolution=resolution)
    torch.manual_seed(0)
    return build_policy(mc, preset="sd3.5-m", model_path=str(pipe_dir), device=device, seed=0,
                        prompts=str(workdir / "prompts.txt"))  # fmt: skip


def _one(args) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from train import reward_backprop as rb
    from train.rewards.registry import build_reward

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    workdir = Path(args.workdir)
    policy = _policy(args.model, device, args.resolution, workdir)
    sc = rb.RBSampleConfig(solver="euler", num_steps=args.steps)
    sched = rb.make_schedule(policy, sc, "euler")
    reward = build_reward("saturation")
    prompts = policy.sample_train_prompts(args.batch, 0)
    seeds = list(range(args.batch))

    def step(k, grad):
        for p in policy.trainable_parameters():
            p.grad = None
        with policy.adapter("default"), torch.set_grad_enabled(grad):
            ws = rb.sample_with_grad(policy, prompts, seeds, sched, sc, grad_from=args.steps - k,
                                     use_checkpoint=args.checkpoint)  # fmt: skip
            r, _ = reward(policy.decode(ws.x0_hat), prompts)
            if grad:
                (-r.mean()).backward()
        return ws.grad_forwards

    step(1, False)  # warm-up: weights, text encoders, allocator pools
    peak = peak_memory_of(lambda: step(args.k, True), device)
    return {"model": args.model, "k": args.k, "checkpoint": args.checkpoint, "steps": args.steps,
            "batch": args.batch, "device": device.type, "peak_mb": peak / 2**20}  # fmt: skip


def main(argv=None) -> int:
    ap = memory_bench_parser(__doc__.split("\n")[0])
    ap.add_argument("--ks", default="1,2,5,10")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=0, help="0: 64 for the embedded default, 8 for sd3-tiny")
    ap.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    check_json_path(args.json)
    try:
        ks = [int(v) for v in args.ks.split(",")]
    except ValueError:
        ks = []
    bad = None
    if args.steps < 1:
        bad = f"--steps: expected an integer >= 1, got {args.steps}"
    elif args.batch < 0:
        bad = f"--batch: expected an integer >= 0 (0: the model's default), got {args.batch}"
    elif not ks or any(not 1 <= k <= args.steps for k in ([args.k] if args.one else ks)):
        bad = f"--ks: expected windows K in 1..{args.steps} (--steps), comma separated, got {args.ks}"
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(_one(args)), flush=True)
        return 0
    models = memory_bench_models(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            batch = args.batch or (64 if model == "embedded" else 8)
            for ckpt in (1, 0):
                for k in ks:
                    argv = ["--model", model, "--k", str(k), "--checkpoint", str(ckpt), "--steps",
                            str(args.steps), "--batch", str(batch), "--resolution", str(args.resolution),
                            "--device", args.device, "--threads", str(args.threads),
                            "--workdir", tmp]  # fmt: skip
                    try:
                        row = run_isolated("bench.bench_reward_backprop_memory", argv)
                    except RuntimeError as e:
                        print(e, file=sys.stderr)
                        return 1
                    rows.append(row)
                    print(f"{row['model']:9s} {row['device']} batch {row['batch']:3d} steps {row['steps']} "
                          f"K {k:2d} checkpoint {'on ' if ckpt else 'off'}: peak +{row['peak_mb']:8.1f} MB",
                          flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
