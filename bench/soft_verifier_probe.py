"""Probe (issue 23): is the learned reward's useless gradient the CNN's fault, or would any smooth stand-in
for the GenEval-mini verifier do the same?  This builds the verifier's own measurements as differentiable
functions of the pixels and runs the reward model card's gradient-ascent check on them
(``train.reward_model.ascent_metrics``, docs/math.md §8.5):

- per palette colour, a soft mask: the verifier's nearest-colour rule as a softmax over
  ``-|rgb - colour|^2 / tau`` (background and the four colours), box-averaged over 3x3 pixels and mapped
  through the ramp ``clamp((m - lo) / width, 0, 1)`` (specks go, objects stay);
- the number of 4-connected components of each mask as its expected Euler number (Gray's 2x2 quad counts
  ``(Q1 - Q3 + 2 QD) / 4`` with independent pixel probabilities; exact on binary masks, so on the renders it
  equals the verifier's object count), the mask's area, centroid, normalised second moment and vertical skew;
- matched to the prompt: the total count against the number of objects asked for, each named colour's count
  against its object's, the components of colours the prompt does not name, and the relation's margin
  between the two named colours' centroids (positive when it holds).

Two rewards on these features: ``hand``, no training, ``-(total - asked)^2 - sum of the named colours'
count mismatches^2 - unnamed components + margin / 4`` (the margin in pixels, clipped at 4); ``learned``, an
MLP on the standardised features and the prompt features (``train.reward_model.prompt_features``), fitted to
the verifier's labels with the reward model's loss (``--epochs``).  Data: the reward model's cached
collection (``python -m train.reward_model --cache DIR`` writes ``DIR/reward_model_data-*.pt``).

    python -m bench.soft_verifier_probe --data DIR/reward_model_data-<hash>.pt --json out.json

Not a shipped reward: its results are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench._common import check_json_path
from train import reward_model as rm

_SLOT, _TASKS = 17, 6  # train.reward_model.prompt_features: per object slot, after the task one-hot


def soft_euler4(m: torch.Tensor) -> torch.Tensor:
    """``m [..., H, W]`` in [0, 1] -> ``[...]``: the expected 4-connected Euler number (components minus
    holes) of a mask whose pixels are independently on with probability ``m`` (zero outside)."""
    m = F.pad(m, (1, 1, 1, 1))
    a, b, c, d = m[..., :-1, :-1], m[..., :-1, 1:], m[..., 1:, :-1], m[..., 1:, 1:]
    na, nb, nc, nd = 1 - a, 1 - b, 1 - c, 1 - d
    q1 = a * nb * nc * nd + na * b * nc * nd + na * nb * c * nd + na * nb * nc * d
    q3 = na * b * c * d + a * nb * c * d + a * b * nc * d + a * b * c * nd
    qd = a * nb * nc * d + na * b * c * nd
    return (q1 - q3 + 2 * qd).sum((-1, -2)) / 4


class SoftVerifier(nn.Module):
    """``(images [B, 3, H, W] in [-1, 1], prompt features [B, F]) -> logits [B, 2]`` (both columns the same
    score for ``hand``; the strict and partial logits for ``learned``), with :meth:`features` as above."""

    N_FEATURES = 4 * 6 + 3 + 8 + 2

    def __init__(self, kind: str = "hand", *, tau: float = 0.05, lo: float = 0.35, width: float = 0.3,
                 size: int = 32, hidden: int = 64):
        super().__init__()
        from train.data.geneval_mini import BACKGROUND, PALETTE

        if kind not in ("hand", "learned"):
            raise ValueError(f"kind: expected hand or learned, got {kind!r}")
        self.kind, self.tau, self.lo, self.width = kind, tau, lo, width
        colors = torch.tensor([BACKGROUND, *PALETTE.values()], dtype=torch.float32)
        self.register_buffer("palette", colors[:, :, None, None])
        lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        self.register_buffer("yy", lin.view(1, 1, size, 1))
        self.register_buffer("xx", lin.view(1, 1, 1, size))
        self.register_buffer("mu", torch.zeros(self.N_FEATURES))
        self.register_buffer("sd", torch.ones(self.N_FEATURES))
        self.mlp = nn.Sequential(nn.Linear(self.N_FEATURES + rm.PROMPT_FEATURES, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def masks(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 4, H, W]``: per palette colour the cleaned soft mask."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        d = ((x[:, None] - self.palette[None]) ** 2).sum(2)
        p = torch.softmax(-d / self.tau, 1)[:, 1:]
        return ((F.avg_pool2d(p, 3, 1, 1) - self.lo) / self.width).clamp(0, 1)

    def features(self, images: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """``[B, N_FEATURES]``: per colour (4 each) count, area, centroid x and y, second moment, skew; the
        total count, its squared and absolute mismatch; per slot (2) the named colour's squared count
        mismatch, area, moment and skew (0 when no colour is named); the unnamed colours' components; the
        relation margin in pixels."""
        m = self.masks(images)
        mass = m.sum((-1, -2)).clamp_min(1e-3)
        count = soft_euler4(m)
        area = mass / m.shape[-1] / m.shape[-2]
        cy = (m * self.yy).sum((-1, -2)) / mass
        cx = (m * self.xx).sum((-1, -2)) / mass
        dy, dx = self.yy - cy[..., None, None], self.xx - cx[..., None, None]
        moment = (m * (dx**2 + dy**2)).sum((-1, -2)) / mass.pow(2) * m.shape[-1] * m.shape[-2]
        var_y = (m * dy**2).sum((-1, -2)) / mass
        skew = (m * dy**3).sum((-1, -2)) / mass / var_y.clamp_min(1e-4).pow(1.5)
        f = feats.float()
        slot = lambda k, lo, hi: f[:, _TASKS + k * _SLOT + lo : _TASKS + k * _SLOT + hi]
        asked = [slot(k, 8, 12).argmax(1).float() + 1 for k in range(2)]
        present = [slot(k, 0, 3).sum(1) for k in range(2)]
        named_k = [slot(k, 4, 8) for k in range(2)]  # the colour one-hot without "unspecified"
        total = count.sum(1)
        want = present[0] * asked[0] + present[1] * asked[1]
        per_slot, named = [], torch.zeros_like(count)
        for k in range(2):
            has, pick = named_k[k].sum(1), lambda v, k=k: (v * named_k[k]).sum(1)
            named = named + named_k[k]
            per_slot += [has * (pick(count) - asked[k]) ** 2, has * pick(area), has * pick(moment),
                         has * pick(skew)]
        unnamed = (count * (1 - named.clamp(max=1))).sum(1) * (named.sum(1) > 0).float()
        role = slot(0, 12, 17)  # none, left, right, above, below: the first object's side
        x0, x1 = (cx * named_k[0]).sum(1), (cx * named_k[1]).sum(1)
        y0, y1 = (cy * named_k[0]).sum(1), (cy * named_k[1]).sum(1)
        margin = (role[:, 1] * (x1 - x0) + role[:, 2] * (x0 - x1) + role[:, 3] * (y1 - y0)
                  + role[:, 4] * (y0 - y1)) * m.shape[-1]
        return torch.cat([count, area, cx, cy, moment, skew,
                          torch.stack([total, (total - want) ** 2, (total - want).abs()], 1),
                          torch.stack(per_slot, 1), unnamed[:, None], margin[:, None]], 1)

    def forward(self, images: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        phi = self.features(images, feats)
        if self.kind == "hand":
            s = -phi[:, 25] - phi[:, 27] - phi[:, 31] - phi[:, 35] + phi[:, 36].clamp(max=4) / 4
            return torch.stack([s, s], 1)
        return self.mlp(torch.cat([(phi - self.mu) / self.sd, feats.float()], 1))


def fit(model: SoftVerifier, data: dict, *, epochs: int, lr: float = 3e-3, batch: int = 256, seed: int = 0,
        say=print) -> SoftVerifier:
    """The ``learned`` head on ``data`` (``train.reward_model.fit``: the reward model's loss and optimiser),
    its features standardised with the training set's statistics."""
    x, f = data["images"], data["feats"]
    with torch.no_grad():
        phi = torch.cat([model.features(x[i : i + 512], f[i : i + 512]) for i in range(0, len(x), 512)])
        model.mu.copy_(phi.mean(0))
        model.sd.copy_(phi.std(0).clamp_min(1e-3))
    return rm.fit(model, data, epochs=epochs, lr=lr, batch=batch, seed=seed, params=model.mlp.parameters(),
                  say=say)


def subset(data: dict, mask: torch.Tensor) -> dict:
    """The rows of a collection (``train.reward_model.collect``'s dict) where ``mask``."""
    idx = torch.nonzero(mask).flatten()
    return {k: v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()] if isinstance(v, list)
            else v for k, v in data.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.soft_verifier_probe", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the reward model's cached collection (a .pt file)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of the learned head")
    p.add_argument("--tau", type=float, default=0.05, help="soft palette temperature")
    p.add_argument("--ramp", type=float, nargs=2, default=(0.35, 0.3), metavar=("LO", "WIDTH"),
                   help="mask ramp: clamp((m - LO) / WIDTH, 0, 1)")
    p.add_argument("--per-task", action="store_true",
                   help="also the check per task type (radii 2, 4, 10), with the shipped reward model beside")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    check_json_path(args.json)
    if not Path(args.data).is_file():
        print(f"error: --data: expected the reward model's cached collection (a .pt file), got {args.data}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train, held, *_ = rm._load_data(Path(args.data))
    given = sys.argv[1:] if argv is None else argv
    out = {"command": "python -m bench.soft_verifier_probe " + " ".join(given)}
    for kind in ("hand", "learned"):
        torch.manual_seed(0)  # the head's initial weights
        model = SoftVerifier(kind, tau=args.tau, lo=args.ramp[0], width=args.ramp[1])
        if kind == "learned":
            fit(model, train, epochs=args.epochs)
        model.eval().requires_grad_(False)
        res = {"heldout": rm.heldout_metrics(model, held)["engine"], "ascent": rm.ascent_metrics(model, held)}
        print(kind, json.dumps(res), flush=True)
        out[kind] = res
        out[kind]["model"] = model
    if args.per_task:
        shipped, _ = rm.load_model()
        tasks = [q.task for q in held["prompts"]]
        out["per_task"] = {}
        for task in dict.fromkeys(tasks):
            part = subset(held, torch.tensor([t == task for t in tasks]))
            row = {name: [(a["l2"], a["strict"]) for a in rm.ascent_metrics(m, part, radii=(2.0, 4.0, 10.0))]
                   for name, m in (("shipped", shipped), ("hand", out["hand"]["model"]),
                                   ("learned", out["learned"]["model"]))}
            print(task, json.dumps(row), flush=True)
            out["per_task"][task] = row
    for kind in ("hand", "learned"):
        del out[kind]["model"]
    out["seconds"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
