"""Probe (issue 23): at which sampler step is a sample's verdict decided, and how well does the learned reward
judge the one-step predictions ``x0_hat`` the gradient methods score there?

ReFL scores the one-step prediction ``x0_hat = x_t - t v`` at its stop step ``j``, AlignProp and DRaFT-K pass
their gradient through the last steps only, and Nabla-GFlowNet takes the reward's gradient at every state's
``x0_hat``.  A method can only change what is still undecided inside its window.  This probe samples held-out
prompts with the loops' training sampler (Euler, 10 steps on the shipped schedule, CFG-free, the rollout
engine's per-sample noise) and, for every step ``j``, decodes step ``j``'s ``x0_hat`` (the sampler stopped
after step ``j``'s model call, as ReFL stops it) and reports:

- ``pass``: the GenEval-mini verifier's pass rate on the ``x0_hat`` images themselves;
- ``agree``: the share of samples whose ``x0_hat`` verdict equals the final sample's (1 at the last step,
  whose ``x0_hat`` is the final sample);
- ``learned``: the learned reward's mean on ``x0_hat``; ``auc_final``: its ROC AUC on ``x0_hat`` against the
  final sample's verdict (how well it predicts, from step ``j``, whether the sample will pass);
  ``auc_own``: against ``x0_hat``'s own verdict.

    python -m bench.x0hat_probe --n 256 --threads 2 --json out.json

Not a shipped reward or method: its results are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench._common import add_heldout_probe_args, check_json_path, heldout_probe_setup, write_probe_json
from train import reward_model as rm
from train.reward_backprop import RBSampleConfig, make_schedule, sample_with_grad


@torch.no_grad()
def x0hat_images(policy, sched, sc, prompts, seeds, j: int | None, *, batch: int) -> torch.Tensor:
    """Decoded images ``[N, 3, 32, 32]``: step ``j``'s ``x0_hat`` (``None``: the final samples)."""
    out = []
    for lo in range(0, len(prompts), batch):
        w = sample_with_grad(policy, prompts[lo : lo + batch], seeds[lo : lo + batch], sched, sc,
                             grad_from=sched.num_steps, stop_at=j)
        out.append(policy.decode((w.x if j is None else w.x0_hat).to(policy.dtype)).float())
    return torch.cat(out)


def run(policy, reward, prompts, seeds, *, num_steps: int = 10, batch: int = 64, say=print) -> dict:
    """``{"final": {...}, "steps": [{...} per step]}`` (the module docstring's numbers)."""
    sc = RBSampleConfig(solver="euler", num_steps=num_steps)
    sched = make_schedule(policy, sc, "euler")
    final = x0hat_images(policy, sched, sc, prompts, seeds, None, batch=batch)
    y_final, _ = rm.label(final, prompts)
    r_final = reward(final, prompts)
    out = {"sigmas": [round(float(p), 4) for p in sched.p],
           "final": {"pass": round(float(y_final.mean()), 4), "learned": round(float(r_final.mean()), 4),
                     "auc": round(rm._auc(r_final, y_final), 4)},
           "steps": []}
    say("final", json.dumps(out["final"]), flush=True)
    for j in range(num_steps):
        im = x0hat_images(policy, sched, sc, prompts, seeds, j, batch=batch)
        y, _ = rm.label(im, prompts)
        r = reward(im, prompts)
        row = {"step": j, "sigma": round(float(sched.p[j]), 4), "pass": round(float(y.mean()), 4),
               "agree": round(float((y == y_final).float().mean()), 4),
               "learned": round(float(r.mean()), 4), "auc_final": round(rm._auc(r, y_final), 4),
               "auc_own": round(rm._auc(r, y), 4)}
        out["steps"].append(row)
        say("step", json.dumps(row), flush=True)
    return out


def _check(args) -> str | None:
    for name in ("n", "batch", "threads"):
        if getattr(args, name) < 1:
            return f"--{name}: expected an integer >= 1, got {getattr(args, name)}"
    if args.num_steps < 2:
        return f"--num-steps: expected an integer >= 2, got {args.num_steps}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.x0hat_probe", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256, help="held-out prompts, one sample each")
    p.add_argument("--num-steps", type=int, default=10, help="Euler steps of the sampler")
    add_heldout_probe_args(p)
    args = p.parse_args(argv)
    check_json_path(args.json)
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    t0 = time.time()
    policy, reward, prompts, seeds = heldout_probe_setup("x0hat_probe", n=args.n, seed=args.seed,
                                                         threads=args.threads, reward_path=args.reward_path)
    res = run(policy, reward, prompts, seeds, num_steps=args.num_steps, batch=args.batch)
    write_probe_json(args.json, "bench.x0hat_probe", argv, res, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
