"""Probe (issue 23): does the learned reward's gradient, taken *through the generator*, find samples that the
GenEval-mini verifier passes?

The reward model card's ascent check (``train.reward_model.ascent_metrics``, docs/math.md §8.5) moves the
images themselves, and no smooth reward tried so far turns a failing image into a passing one by small pixel
moves (docs/results.md).  The gradient methods do not move pixels, though: they move the generator, whose
output can change its layout under a small change of its input.  This probe asks the question in the
generator's own input space, with no weights trained:

- each held-out prompt gets its starting noise ``z`` (the Philox draw ``engine.rollout`` makes for its seed);
- *ascent*: ``z`` moves along the normalised gradient of the learned reward's strict logit of the final
  image, taken through the whole deterministic sampler (``train.reward_backprop.sample_with_grad``, every step
  with grad, checkpointed), ``--step`` in L2 per step, then back onto ``z``'s own sphere (``|z|`` is kept, so
  the moved noise stays a typical Gaussian draw);
- *random*: the same ``z`` moves the same way along one fixed random direction per sample (the control: a
  move of the noise alone changes some samples' verdicts, in both directions).

After each step the new samples are scored by the verifier: the pass rate, how many failing samples now pass
and how many passing ones now fail.  If ascent turns more failures into passes than the random moves do, the
reward's gradient carries what the verifier wants through the generator, and a method that follows it can
lift the gold score in principle.

With ``--lora-steps K`` a third walk moves the weights instead, as the gradient methods do: ``K`` Adam steps
(``--lora-lr``) on the LoRA adapter, each on the mean strict logit of the same samples (the same noise ``z``)
through the whole sampler (DRaFT with its window over every step, on one fixed batch).  After each step it
scores the same samples (``lora``) and, to see whether the update carries over, the same prompts from fresh
noise (``lora_fresh``; flips counted against the fresh samples before training).  ``--lora-per-sample``
steps on the mean of each sample's own gradient scaled to unit norm instead, so that the few samples near a
layout switch, whose gradients are largest, do not set the whole step.

    python -m bench.noise_ascent_probe --n 128 --steps 8 --step 0.5 --threads 2 --json out.json
    python -m bench.noise_ascent_probe --n 128 --steps 0 --lora-steps 8 --lora-lr 1e-3 --threads 2

Not a shipped reward or method: its results are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import models
from bench._common import add_heldout_probe_args, check_json_path, heldout_probe_setup, write_probe_json
from engine import per_sample_randn
from train import common
from train import reward_model as rm
from train.reward_backprop import RBSampleConfig, make_schedule, sample_with_grad
from train.reward_model import _unit


def on_sphere(z: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """``z`` scaled per row to L2 norm ``radius [B]``."""
    return _unit(z) * radius.view(-1, *([1] * (z.ndim - 1)))


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row angle between ``a`` and ``b`` in radians."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    return torch.acos(cos)


def images_from(policy, sched, sc, prompts, seeds, z, *, grad: bool) -> torch.Tensor:
    """The decoded samples from starting noise ``z`` (the sampler is deterministic: Euler, no noise drawn)."""
    with torch.set_grad_enabled(grad):
        w = sample_with_grad(policy, prompts, seeds, sched, sc, grad_from=0 if grad else sched.num_steps,
                             x_start=z)
        return policy.decode(w.x).float()


def reward_grad(policy, sched, sc, reward, prompts, seeds, z) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, d strict logit / d z)`` at ``z``."""
    z = z.detach().requires_grad_(True)
    x = images_from(policy, sched, sc, prompts, seeds, z, grad=True)
    (g,) = torch.autograd.grad(reward.logits(x, prompts).sum(), z)
    return x.detach(), g


def verdicts(images: torch.Tensor, prompts: list) -> torch.Tensor:
    strict, _ = rm.label(images, prompts)
    return strict > 0.5


def summary(reward, images, prompts, passed, start, z, z0) -> dict:
    r4 = lambda v: round(float(v), 4)  # noqa: E731
    return {
        "angle": r4(angle(z, z0).mean()),
        "learned": r4(reward(images, prompts).mean()),
        "pass_rate": r4(passed.float().mean()),
        "fail_to_pass": int((passed & ~start).sum()),
        "pass_to_fail": int((~passed & start).sum()),
    }


def start_noise(policy, seeds: list) -> torch.Tensor:
    """The starting noise ``engine.rollout`` draws for ``seeds``."""
    seeds_t = torch.tensor(seeds, dtype=torch.int64)
    return per_sample_randn(tuple(policy.latent_shape), seeds_t, 0).to(policy.dtype)


def per_sample_unit_grad(policy, sched, sc, reward, prompts, seeds, z, params, chunks=None) -> None:
    """Set ``params``' ``.grad`` to minus the mean over samples of each sample's own gradient of its strict
    logit scaled to unit norm (per chunk of samples, one batched backward with
    :func:`models.per_sample_lora_grads`, as ``--train.unit-sample-grads`` does), so that no sample
    dominates the step."""
    n = len(prompts)
    for p in params:
        p.grad = torch.zeros_like(p)
    for c in chunks or [slice(0, n)]:
        b = len(prompts[c])
        with models.per_sample_lora_grads(policy.transformer, b) as ps:
            x = images_from(policy, sched, sc, prompts[c], seeds[c], z[c], grad=True)
            reward.logits(x, prompts[c]).sum().backward(inputs=ps.deltas)
        units, _ = ps.unit_sum()
        for p, u in zip(ps.params, units, strict=True):
            p.grad.sub_(u / n)


def lora_walk(policy, sched, sc, reward, prompts, seeds, fresh_seeds, chunks, *, steps: int, lr: float,
              per_sample: bool = False, say=print) -> dict:
    """``steps`` Adam steps on the LoRA adapter, each on the mean strict logit of the samples from ``seeds``'
    noise through the whole sampler (``per_sample``: the mean of each sample's unit-norm gradient,
    :func:`per_sample_unit_grad`) -> ``{"lora": [...], "lora_fresh": [...]}`` (the same samples, and the
    same prompts from ``fresh_seeds``' noise), one summary per step.  The adapter is restored afterwards."""
    params = policy.trainable_parameters()
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    z, zf = start_noise(policy, seeds), start_noise(policy, fresh_seeds)
    n, out = len(prompts), {"lora": [], "lora_fresh": []}
    starts = {}
    try:
        for k in range(steps + 1):
            for name, zz, ss in (("lora", z, seeds), ("lora_fresh", zf, fresh_seeds)):
                with torch.no_grad():
                    images = torch.cat([images_from(policy, sched, sc, prompts[c], ss[c], zz[c], grad=False)
                                        for c in chunks])
                    passed = verdicts(images, prompts)
                    starts.setdefault(name, passed)
                    out[name].append(summary(reward, images, prompts, passed, starts[name], zz, zz))
                say(name, k, json.dumps(out[name][-1]), flush=True)
            if k == steps:
                break
            opt.zero_grad(set_to_none=True)
            if per_sample:
                per_sample_unit_grad(policy, sched, sc, reward, prompts, seeds, z, params, chunks)
            else:
                for c in chunks:
                    x = images_from(policy, sched, sc, prompts[c], seeds[c], z[c], grad=True)
                    loss = -reward.logits(x, prompts[c]).sum() / n
                    loss.backward()
            opt.step()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
                p.grad = None
    return out


def run(policy, reward, prompts, seeds, *, steps: int, step: float, batch: int, seed: int,
        lora_steps: int = 0, lora_lr: float = 1e-3, lora_per_sample: bool = False, say=print):
    """The walks over ``prompts`` (one sample each) -> ``{"ascent": [...], "random": [...]}`` (and with
    ``lora_steps``, :func:`lora_walk`'s two), one summary per step (step 0: the unmoved samples, the same in
    every walk on the same noise)."""
    sc = RBSampleConfig(solver="euler", num_steps=10)
    sched = make_schedule(policy, sc, "euler")
    n = len(prompts)
    z0 = start_noise(policy, seeds)
    radius = z0.flatten(1).norm(dim=1)
    g = torch.Generator().manual_seed(common.derive_seed(seed, "noise_ascent_probe", "random"))
    u = _unit(torch.randn(z0.shape, generator=g))
    chunks = [slice(lo, min(lo + batch, n)) for lo in range(0, n, batch)]
    out = {}
    if lora_steps:
        fresh = [common.derive_seed(seed, "noise_ascent_probe", "fresh", i) for i in range(n)]
        out.update(lora_walk(policy, sched, sc, reward, prompts, seeds, fresh, chunks, steps=lora_steps,
                             lr=lora_lr, per_sample=lora_per_sample, say=say))
    for walk in ("ascent", "random") if steps else ():
        z, rows, start = z0.clone(), [], None
        for k in range(steps + 1):
            last = k == steps
            imgs, grads = [], []
            for c in chunks:
                if walk == "ascent" and not last:
                    x, gr = reward_grad(policy, sched, sc, reward, prompts[c], seeds[c], z[c])
                    grads.append(gr)
                else:
                    x = images_from(policy, sched, sc, prompts[c], seeds[c], z[c], grad=False)
                imgs.append(x)
            images = torch.cat(imgs)
            passed = verdicts(images, prompts)
            start = passed if start is None else start
            with torch.no_grad():
                rows.append(summary(reward, images, prompts, passed, start, z, z0))
            say(walk, k, json.dumps(rows[-1]), flush=True)
            if not last:
                d = torch.cat(grads) if walk == "ascent" else u
                z = on_sphere(z + step * _unit(d), radius)
        out[walk] = rows
    return out


def _check(args) -> str | None:
    for name in ("n", "batch"):
        if getattr(args, name) < 1:
            return f"--{name}: expected an integer >= 1, got {getattr(args, name)}"
    for name in ("steps", "lora_steps"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')}: expected an integer >= 0, got {getattr(args, name)}"
    if args.steps == args.lora_steps == 0:
        return "--steps, --lora-steps: expected at least one walk (a value >= 1), got 0 and 0"
    if not (args.step > 0 and math.isfinite(args.step)):
        return f"--step: expected a finite L2 length > 0, got {args.step}"
    if not (args.lora_lr > 0 and math.isfinite(args.lora_lr)):
        return f"--lora-lr: expected a finite learning rate > 0, got {args.lora_lr}"
    if args.threads < 1:
        return f"--threads: expected an integer >= 1, got {args.threads}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.noise_ascent_probe", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=128, help="held-out prompts, one sample each")
    p.add_argument("--steps", type=int, default=8, help="moves of the starting noise")
    p.add_argument("--step", type=float, default=2.0,
                   help="L2 length of each move (|z| is about 55 on the embedded default's 3x32x32 latents)")
    p.add_argument("--lora-steps", type=int, default=0,
                   help="Adam steps of the LoRA walk on the same samples (0: no LoRA walk)")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="the LoRA walk's Adam learning rate")
    p.add_argument("--lora-per-sample", action="store_true",
                   help="LoRA walk: step on the mean of each sample's unit-norm gradient")
    add_heldout_probe_args(p)
    args = p.parse_args(argv)
    check_json_path(args.json)
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    t0 = time.time()
    policy, reward, prompts, seeds = heldout_probe_setup("noise_ascent_probe", n=args.n, seed=args.seed,
                                                         threads=args.threads, reward_path=args.reward_path)
    res = run(policy, reward, prompts, seeds, steps=args.steps, step=args.step, batch=args.batch,
              seed=args.seed, lora_steps=args.lora_steps, lora_lr=args.lora_lr,
              lora_per_sample=args.lora_per_sample)
    write_probe_json(args.json, "bench.noise_ascent_probe", argv, res, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
