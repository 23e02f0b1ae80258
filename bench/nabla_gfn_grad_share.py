"""Where Nabla-GFlowNet's LoRA gradient comes from: the norm of each transition slot's loss gradient on the
LoRA, by slot (the terminal transition, then one random step per block of ``N / n_blocks`` steps), over a
short ``train.nabla_gfn`` run on the embedded default.

On the flow port the scores are ``(x' - mean) / std^2`` (math.md §7). The last step's ``std`` is tiny, so a
drift of the last step's velocity costs ``1 / std^4`` in the forward term, and that slot can set the LoRA's
whole (Adam-normalised) step while the layout steps' reward signal adds almost nothing.  The probe wraps
``NablaGFNTrainer.transition_loss`` and takes ``autograd.grad`` of each call's loss on the trainable LoRA
parameters (phi excluded); the training itself is unchanged.

    python -m bench.nabla_gfn_grad_share --reward saturation --max-iters 3 --train.reward-scale 1e3 \\
        --json out.json

Every option is passed to ``python -m train.nabla_gfn`` (``--json PATH`` and ``--run-dir`` excepted; the
run goes to a temporary folder unless ``--run-dir`` is given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench._common import check_json_path


def slot_name(steps: torch.Tensor, n_steps: int, n_blocks: int) -> str:
    """``terminal`` when every transition of the call is the last step, else the block of its first step
    (``block 0`` holds the first ``N / n_blocks`` steps)."""
    if bool((steps == n_steps - 1).all()):
        return "terminal"
    return f"block {int(steps.min()) // (n_steps // n_blocks)}"


def summarise(calls: list[dict]) -> dict:
    out = {}
    for c in calls:
        out.setdefault(c["slot"], []).append(c["lora_grad_norm"])
    return {
        k: {"calls": len(v), "mean": statistics.fmean(v), "median": statistics.median(v), "first": v[0]}
        for k, v in sorted(out.items())
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    ap.add_argument("--json", default=None, help="write the calls and the summary here")
    ap.add_argument("--run-dir", default=None)
    args, rest = ap.parse_known_args(argv)
    check_json_path(args.json)
    import train.nabla_gfn as ngfn

    calls: list[dict] = []
    original = ngfn.NablaGFNTrainer.transition_loss

    def recorded(self, traj, rows, steps, first):
        loss, parts = original(self, traj, rows, steps, first)
        params = [p for p in self.policy.trainable_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
        n = len(traj.timesteps)
        nb = ngfn.n_blocks(n, self.cfg.train.timestep_fraction)
        slot = slot_name(steps, n, nb)
        calls.append({"slot": slot, "steps": steps.tolist(), "lora_grad_norm": float(norm)})
        return loss, parts

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or str(Path(tmp) / "run")
        ngfn.NablaGFNTrainer.transition_loss = recorded
        try:
            rc = ngfn.main(["--run-dir", run_dir, "--log.progress", "false", *rest])
        finally:
            ngfn.NablaGFNTrainer.transition_loss = original
    if rc != 0:
        return rc
    summary = summarise(calls)
    print("slot | calls | LoRA gradient norm: first call, mean, median")
    for k, v in summary.items():
        print(f"{k} | {v['calls']} | {v['first']:.4g}, {v['mean']:.4g}, {v['median']:.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": rest, "summary": summary, "calls": calls}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
