"""A learned, differentiable GenEval-mini reward for the embedded default (math.md §8.5): a small CNN,
FiLM-conditioned on the prompt's structure (per object its shape, colour, count and side), that
predicts whether the rule-based GenEval-mini verifier passes an image.  It is trained on the verifier's
labels, as real reward models are trained on human labels, and it is what the reward-backprop methods
(math.md §5) and Nabla-GFlowNet (math.md §7) can differentiate; the verifier stays the gold reward, so
over-optimisation of the learned one shows (``--eval.rewards geneval_mini``).

``python -m train.reward_model --help``.  The data: the embedded model's own samples from the engine
(several samplers and guidance scales, so both passing and failing images; ``--base DIR`` samples another
embedded checkpoint, e.g. ``models/embedded/stage3``, the shipped default's samples are then scored beside the
held-out ones), renders of the prompt (pass),
renders of another prompt shown with this one (mostly fail), and noisy copies of the samples; every image
is labelled by the verifier with the prompt it is paired with (strict 0/1, and the partial score).

Held out: prompts the model never sees in training, in any role: the benchmark's test split of position
and colour-attribute prompts (unseen bags of colours and shapes) and every third prompt of the four small
tasks (:func:`heldout_pool`).  The card records, on engine samples of held-out prompts: accuracy of
``p > 0.5`` against the strict label (and the majority-class rate beside it), ROC AUC, and the Pearson
correlation of ``p`` with the strict and with the partial score.

Output (``--out DIR``): ``reward_model.safetensors`` (fp32 weights, < 1 MB) and ``reward_model.json`` (the
card: architecture, command, data counts, held-out numbers, a small fixed check subset of the shipped
default's samples that the tests recompute, and the SHA-256 of the weights of the model that made the samples
and of the shipped default the check used).  ``--out models/embedded --overwrite`` replaces the shipped
model that the ``geneval_learned`` reward loads by default.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import common
from .config import ConfigError, parse_cli, to_dict

__all__ = [
    "RewardModelConfig",
    "LearnedReward",
    "GenEvalLearned",
    "prompt_features",
    "PROMPT_FEATURES",
    "reward_train_pool",
    "heldout_pool",
    "collect",
    "train_model",
    "fit",
    "evaluate",
    "check_subset",
    "save_model",
    "load_model",
    "SHIPPED",
    "main",
]

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "embedded" / "reward_model.safetensors"
OUTPUT = "probability that the GenEval-mini strict verifier passes the image for its prompt"
SOURCES = ("engine", "render", "mismatched_render", "noisy_engine", "adversarial")

# ------------------------------------------------------------------------------------------------------------
# Prompt conditioning: the prompt's structure, as the verifier reads it
# ------------------------------------------------------------------------------------------------------------
_SLOT = 3 + 5 + 4 + 5  # shape, colour (0: unspecified), count - 1, role (math.md §8.5)
_TASKS = 6
PROMPT_FEATURES = _TASKS + 2 * _SLOT


def prompt_features(prompts) -> torch.Tensor:
    """``[B, PROMPT_FEATURES]`` float32: the task one-hot, then per object slot (two; counting and single
    prompts leave the second at zero) the one-hots of its shape, colour (unspecified is its own class),
    count and role (``none``; for position prompts the side of the relation it takes).  ``prompts`` are
    GenEval-mini :class:`~train.data.geneval_mini.Prompt` objects or their texts."""
    from models.embedded.vocab import COLORS, SHAPES
    from train.data.geneval_mini import ROLES, TASKS, parse_prompt

    sides = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("above", "below"),
             "below": ("below", "above")}
    out = torch.zeros(len(prompts), PROMPT_FEATURES)
    for row, p in enumerate(prompts):
        p = p if hasattr(p, "objects") else parse_prompt(str(p))
        out[row, TASKS.index(p.task)] = 1.0
        roles = sides[p.relation] if p.relation else ("none",) * len(p.objects)
        for k, o in enumerate(p.objects[:2]):
            base = 6 + k * _SLOT
            out[row, base + SHAPES.index(o.shape)] = 1.0
            out[row, base + 3 + (0 if o.color is None else 1 + COLORS.index(o.color))] = 1.0
            out[row, base + 8 + o.count - 1] = 1.0
            out[row, base + 12 + ROLES.index(roles[k])] = 1.0
    return out


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------
class LearnedReward(nn.Module):
    """``(images [B, 3, 32, 32] in [-1, 1], prompt features [B, F]) -> logits [B, 2]``: column 0 the logit
    of the strict pass, column 1 the logit of the partial score.  The input is the image, its
    soft palette assignment (:meth:`soft_palette`; none when ``palette_tau`` is None) and the pixel
    coordinates (CoordConv, for the position prompts); a conv stack, each layer group-normalised and
    FiLM-modulated by the prompt, then an MLP on the flattened 8x8 map and the prompt embedding."""

    def __init__(self, width: int = 32, hidden: int = 96, size: int = 32, palette_tau: float | None = None,
                 head: str = "flat", use_task: bool = True):
        super().__init__()
        from train.data.geneval_mini import BACKGROUND, PALETTE

        if head not in ("flat", "pool"):
            raise ValueError(f"head: expected flat or pool, got {head!r}")
        self.config = dict(width=width, hidden=hidden, size=size, palette_tau=palette_tau, head=head,
                           use_task=use_task)
        self.head_kind, self.use_task = head, use_task
        self.tau = palette_tau
        w = width
        n_feats = PROMPT_FEATURES if use_task else PROMPT_FEATURES - _TASKS
        self.cond = nn.Sequential(nn.Linear(n_feats, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU())
        self.c1 = nn.Conv2d(3 + (5 if palette_tau else 0) + 2, w, 3, padding=1)
        self.c2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)
        self.film = nn.Linear(64, 2 * (w + 2 * w + 2 * w))
        side = math.ceil(math.ceil(size / 2) / 2)
        if head == "flat":
            self.c4 = nn.Conv2d(2 * w, 16, 1)
            n_in = 16 * side * side
        else:
            self.c4 = nn.Conv2d(2 * w, w, 1)
            n_in = 4 * w
            g = torch.linspace(-1, 1, side)
            self.register_buffer("coords_out", torch.stack(torch.meshgrid(g, g, indexing="ij")).flatten(1),
                                 persistent=False)
        self.head = nn.Sequential(nn.Linear(n_in + 64, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        lin = torch.linspace(-1, 1, size)
        self.register_buffer("coords", torch.stack(torch.meshgrid(lin, lin, indexing="ij"))[None],
                             persistent=False)
        colors = torch.tensor([BACKGROUND] + list(PALETTE.values()), dtype=torch.float32)  # [5, 3] in [0, 1]
        self.register_buffer("palette", colors[:, :, None, None], persistent=False)

    def soft_palette(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 5, H, W]``: per pixel a softmax over the background and the four palette colours of
        ``-|rgb - colour|^2 / tau`` (rgb in [0, 1]): the verifier's nearest-colour rule, made smooth."""
        u = (x + 1) / 2
        d = ((u[:, None] - self.palette.to(x.device)[None]) ** 2).sum(2)  # [B, 5, H, W]
        return torch.softmax(-d / self.tau, dim=1)

    def forward(self, images: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(-1, 1)
        b = x.shape[0]
        parts = [x, self.soft_palette(x)] if self.tau else [x]
        x = torch.cat(parts + [self.coords.to(x.device).expand(b, -1, -1, -1)], 1)
        feats = feats.float().to(x.device)
        c = self.cond(feats if self.use_task else feats[:, _TASKS:])
        w = self.c1.out_channels
        s1, b1, s2, b2, s3, b3 = self.film(c)[:, :, None, None].split([w, w, 2 * w, 2 * w, 2 * w, 2 * w], 1)
        h = F.silu(F.group_norm(self.c1(x), 4) * (1 + s1) + b1)
        h = F.silu(F.group_norm(self.c2(h), 4) * (1 + s2) + b2)
        h = F.silu(F.group_norm(self.c3(h), 4) * (1 + s3) + b3)
        h = self.c4(h).flatten(2)  # [B, K, side * side]
        if self.head_kind == "flat":
            h = h.flatten(1)
        else:  # translation-invariant: per channel its mean, max and attention-weighted (y, x) position
            a = torch.softmax(h, dim=2)
            pos = torch.einsum("bks,ds->bkd", a, self.coords_out.to(h.device)).flatten(1)
            h = torch.cat([h.mean(2), h.amax(2), pos], 1)
        return self.head(torch.cat([h, c], 1))


def save_model(model: LearnedReward, path: Path, card: dict) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    text = json.dumps({"config": model.config, **card}, indent=2)
    common.atomic_write_text(path.with_suffix(".json"), text)


def load_model(path=None, *, option: str = "--reward-paths geneval_learned") -> tuple[LearnedReward, dict]:
    """``(model, card)`` from a ``.safetensors`` file with its ``.json`` card beside it, or a directory
    holding ``reward_model.safetensors`` (default: the shipped one); errors name ``option``."""
    from safetensors.torch import load_file

    p = Path(path) if path is not None else SHIPPED
    if p.is_dir():
        p = p / "reward_model.safetensors"
    card_path = p.with_suffix(".json")
    if not p.is_file() or not card_path.is_file():
        raise FileNotFoundError(
            f"{option}: expected a learned reward model (a .safetensors file with its .json card beside it, "
            f"or a directory holding reward_model.safetensors, as python -m train.reward_model writes), "
            f"got {str(path if path is not None else p)!r}"
        )
    try:
        card = json.loads(card_path.read_text())
        if card.get("output") != OUTPUT:
            raise ValueError(f"its card says it outputs {card.get('output')!r}, expected {OUTPUT!r}")
        model = LearnedReward(**card["config"])
        model.load_state_dict(load_file(str(p)))
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise ValueError(f"{option}: {p} is not a reward model of train.reward_model ({e})") from None
    return model.eval().requires_grad_(False), card


class GenEvalLearned:
    """The ``geneval_learned`` reward: :data:`OUTPUT`, ``sigmoid`` of the model's strict logit, float32
    ``[B]`` in (0, 1) on ``images``' device.  Differentiable: with grad enabled the graph runs from
    ``images`` to the result (the weights themselves are frozen).  The model is copied to each device it
    is called on, once."""

    name = "geneval_learned"
    differentiable = True

    def __init__(self, path=None, *, option: str = "--reward-paths geneval_learned"):
        self.model, self.card = load_model(path, option=option)
        self._copies: dict[str, LearnedReward] = {"cpu": self.model}

    def logits(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a tensor shaped [B, 3, 32, 32], got {got}")
        size = self.model.config["size"]
        if images.shape[-2:] != (size, size):
            raise ValueError(f"images: expected {size}x{size} images (the embedded default's), "
                             f"got {tuple(images.shape[-2:])}")
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"prompts: expected {images.shape[0]} prompts (one per image), got {len(prompts)}"
            )
        key = str(images.device)
        if key not in self._copies:
            self._copies[key] = LearnedReward(**self.model.config).to(images.device)
            self._copies[key].load_state_dict(self.model.state_dict())
            self._copies[key].eval().requires_grad_(False)
        return self._copies[key](images, prompt_features(prompts).to(images.device))[:, 0]

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return torch.sigmoid(self.logits(images, prompts))


# ------------------------------------------------------------------------------------------------------------
# Prompts: reward-train and held-out pools
# ------------------------------------------------------------------------------------------------------------
_SMALL = ("single_object", "two_object", "counting", "colors")


def heldout_pool() -> dict[str, list]:
    """Prompts never used in training: the test split's position and colour-attribute prompts (unseen
    bags), and every third prompt (index 2, 5, ...) of each small task in the benchmark's fixed order."""
    from train.data.geneval_mini import all_prompts, split_prompts

    test = split_prompts("test")
    return {t: (ps[2::3] if t in _SMALL else test[t]) for t, ps in all_prompts().items()}


def reward_train_pool() -> dict[str, list]:
    """The training split's prompts less :func:`heldout_pool`'s."""
    from train.data.geneval_mini import split_prompts

    held = {p.text for ps in heldout_pool().values() for p in ps}
    return {t: [p for p in ps if p.text not in held] for t, ps in split_prompts("train").items()}


def draw(pool: dict[str, list], n: int, rng: np.random.Generator) -> list:
    """``n`` prompts: a task uniformly, then a prompt of it uniformly (as the benchmark's sampler)."""
    tasks = list(pool)
    picks = rng.integers(0, len(tasks), size=n)
    return [pool[tasks[t]][rng.integers(0, len(pool[tasks[t]]))] for t in picks]


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------
def parse_samplers(samplers, option: str = "--samplers") -> list[tuple[str, float]]:
    """``("euler:1", "cps:4.5")`` -> ``[("euler", 1.0), ("cps", 4.5)]`` (solver, CFG scale)."""
    out = []
    for s in samplers:
        solver, sep, g = str(s).partition(":")
        try:
            scale = float(g) if sep else 1.0
        except ValueError:
            scale = float("nan")
        if solver not in ("euler", "dpm2", "cps", "flow-sde") or not (scale >= 1.0 and math.isfinite(scale)):
            raise ValueError(
                f"{option}: expected SOLVER:CFG entries with SOLVER euler, dpm2, cps or flow-sde and "
                f"CFG >= 1, "
                f"got {s!r}"
            )
        out.append((solver, scale))
    if not out:
        raise ValueError(f"{option}: expected at least one SOLVER:CFG entry, got none")
    return out


@torch.no_grad()
def engine_samples(policy, prompts: list, seeds: list, samplers, *, num_steps: int = 10, batch: int = 64):
    """One engine sample per prompt (row ``i`` on sampler ``i % len(samplers)``, Philox seed ``seeds[i]``),
    decoded: ``[N, 3, 32, 32]`` in [-1, 1]."""
    out = torch.empty(len(prompts), *policy.latent_shape)
    for k, (solver, g) in enumerate(samplers):
        rows = list(range(k, len(prompts), len(samplers)))
        for lo in range(0, len(rows), batch):
            r = rows[lo : lo + batch]
            x = policy.sample([prompts[i] for i in r], [seeds[i] for i in r], solver=solver,
                              num_steps=num_steps, guidance_scale=g, noise_level=0.7)
            out[r] = policy.decode(x).float().cpu()
    return out


def label(images: torch.Tensor, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
    from .rewards.geneval_mini import GenEvalMini

    s = GenEvalMini().score(images, prompts)
    return s["strict"], s["partial"]


def collect(policy, pool: dict[str, list], *, engine: int, renders: int, noisy: int, samplers, seed: int,
            tag: str) -> dict:
    """Images of ``pool``'s prompts with the verifier's labels: ``engine`` engine samples, ``renders``
    renders of their own prompt and as many of another prompt (half of the same task: the hard negatives),
    ``noisy`` engine samples again with Gaussian noise (std uniform in [0.05, 0.4]).  ``policy`` may be None
    when ``engine == noisy == 0``."""
    from train.data.geneval_mini import render_batch

    rng = np.random.default_rng(common.derive_seed(seed, "reward_model", tag))
    images, prompts, src = [], [], []
    if engine:
        ps = draw(pool, engine, rng)
        seeds = [common.derive_seed(seed, "reward_model", tag, "engine", i) for i in range(engine)]
        x = engine_samples(policy, ps, seeds, samplers)
        images.append(x)
        prompts += ps
        src += [0] * engine
        if noisy:
            idx = rng.choice(engine, size=noisy, replace=noisy > engine)
            std = torch.from_numpy(rng.uniform(0.05, 0.4, size=(noisy, 1, 1, 1)).astype(np.float32))
            g = torch.Generator().manual_seed(common.derive_seed(seed, "reward_model", tag, "noise"))
            images.append((x[idx] + std * torch.randn(x[idx].shape, generator=g)).clamp(-1, 1))
            prompts += [ps[i] for i in idx]
            src += [3] * noisy
    if renders:
        ps = draw(pool, renders, rng)
        images.append(render_batch(ps, rng))
        prompts += ps
        src += [1] * renders
        other = draw(pool, renders, rng)
        same_task = [pool[p.task][rng.integers(0, len(pool[p.task]))] for p in ps]
        shown = [a if i % 2 else b for i, (a, b) in enumerate(zip(other, same_task, strict=True))]
        images.append(render_batch(shown, rng))
        prompts += ps
        src += [2] * renders
    images = torch.cat(images)
    strict, partial = label(images, prompts)
    return {"images": images, "prompts": prompts, "feats": prompt_features(prompts), "strict": strict,
            "partial": partial, "source": torch.tensor(src)}


# ------------------------------------------------------------------------------------------------------------
# Training and metrics
# ------------------------------------------------------------------------------------------------------------
def _fit_loss(out: torch.Tensor, strict: torch.Tensor, partial: torch.Tensor, partial_weight: float):
    """The fit's loss: ``BCE(l, y) + partial_weight BCE(m, q)`` (math.md §8.5)."""
    loss = F.binary_cross_entropy_with_logits(out[:, 0], strict)
    return loss + partial_weight * F.binary_cross_entropy_with_logits(out[:, 1], partial)


def _unit(g: torch.Tensor) -> torch.Tensor:
    """Each image's gradient ``g [B, ...]`` scaled to L2 norm 1 (the direction of an L2 ascent step)."""
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.ndim - 1)))


def pgd_l2(loss_fn, images: torch.Tensor, *, eps: float, steps: int) -> torch.Tensor:
    """The training batch's worst case (Madry et al., arXiv 1706.06083, in the L2 norm): from ``images``,
    ``steps`` ascent steps of size ``2.5 eps / steps`` on ``loss_fn`` along each image's normalised gradient,
    each projected back to the L2 ball of radius ``eps`` around its image and to [-1, 1].  The parameters'
    gradients are left untouched (``autograd.grad`` on the input only)."""
    x0 = images.detach()
    x = x0.clone()
    alpha = 2.5 * eps / steps
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_fn(x), x)
        d = x.detach() + alpha * _unit(g) - x0
        dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x = (x0 + d * torch.clamp(eps / dn.clamp_min(1e-12), max=1.0)).clamp(-1, 1)
    return x.detach()


def train_model(data: dict, *, epochs: int, lr: float, batch: int, seed: int, width: int = 32,
                hidden: int = 96, palette_tau: float | None = 0.05, head: str = "pool",
                use_task: bool = False,
                partial_weight: float = 0.5, init: LearnedReward | None = None, robust_eps: float = 0.0,
                robust_steps: int = 3, say=print) -> LearnedReward:
    """Fit :class:`LearnedReward` to ``data`` (from :func:`collect`): binary cross-entropy of the strict
    logit on the strict label plus ``partial_weight`` times that of the partial logit on the partial score;
    AdamW with a one-cycle schedule (``lr`` its peak; ``lr == 0`` trains nothing: the untrained control).
    ``init``: continue from (a copy of) this model instead of a fresh one (the adversarial rounds).
    ``robust_eps > 0``: adversarial training (math.md §8.5): each batch is replaced by its worst case within
    an L2 ball of that radius per image (:func:`pgd_l2`, ``robust_steps`` steps on this loss, labels kept)."""
    torch.manual_seed(common.derive_seed(seed, "reward_model", "init") % (2**31))
    model = LearnedReward(width=width, hidden=hidden, size=data["images"].shape[-1], palette_tau=palette_tau,
                          head=head, use_task=use_task)
    if init is not None:
        model = LearnedReward(**init.config)
        model.load_state_dict(init.state_dict())
    model.requires_grad_(True)
    return fit(model, data, epochs=epochs, lr=lr, batch=batch, seed=seed, partial_weight=partial_weight,
               robust_eps=robust_eps, robust_steps=robust_steps, say=say)


def fit(model: nn.Module, data: dict, *, epochs: int, lr: float, batch: int, seed: int,
        partial_weight: float = 0.5, robust_eps: float = 0.0, robust_steps: int = 3, params=None,
        say=print) -> nn.Module:
    """:func:`train_model`'s optimisation of any ``model(images, feats) -> logits [B, 2]`` (``params``: what
    it updates, default all its parameters): the loss :func:`_fit_loss`, AdamW, a one-cycle schedule, a
    shuffled order from ``seed``; the model comes back in eval mode without gradients."""
    n = len(data["images"])
    steps = epochs * math.ceil(n / batch)
    if lr == 0 or steps == 0:
        return model.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters() if params is None else params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(common.derive_seed(seed, "reward_model", "order"))
    x, f, ys, yp = data["images"], data["feats"], data["strict"], data["partial"]
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(n, generator=gen)
        tot = 0.0
        for lo in range(0, n, batch):
            i = perm[lo : lo + batch]
            xb = x[i]
            if robust_eps > 0:
                xb = pgd_l2(lambda im, i=i: _fit_loss(model(im, f[i]), ys[i], yp[i], partial_weight), xb,
                            eps=robust_eps, steps=robust_steps)
            loss = _fit_loss(model(xb, f[i]), ys[i], yp[i], partial_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(i)
        say(f"epoch {ep + 1}/{epochs} | train loss {tot / n:.4f}", flush=True)
    return model.eval().requires_grad_(False)


def _auc(p: torch.Tensor, y: torch.Tensor) -> float:
    """ROC AUC (ties count half); NaN with one class only."""
    pos, neg = p[y > 0.5], p[y <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    d = pos[:, None] - neg[None, :]
    return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a.float(), b.float()]))[0, 1])


@torch.no_grad()
def predict(model: LearnedReward, images: torch.Tensor, feats: torch.Tensor, batch: int = 512):
    """``sigmoid`` of the strict logit, ``[N]``."""
    return torch.cat([torch.sigmoid(model(images[lo : lo + batch], feats[lo : lo + batch])[:, 0])
                      for lo in range(0, len(images), batch)])


def evaluate(model: LearnedReward, data: dict, mask: torch.Tensor | None = None) -> dict:
    """Held-out numbers on ``data`` (rows where ``mask``): ``acc`` of ``p > 0.5`` against the strict label,
    ``majority`` (the accuracy of always answering the commoner label), ``auc``, ``corr_strict`` and
    ``corr_partial`` (Pearson of ``p``), ``n`` and ``pass_rate``."""
    sel = torch.ones(len(data["images"]), dtype=torch.bool) if mask is None else mask
    p = predict(model, data["images"][sel], data["feats"][sel])
    ys, yp = data["strict"][sel], data["partial"][sel]
    rate = float(ys.mean())
    r = lambda v: round(v, 4)
    acc = float(((p > 0.5).float() == ys).float().mean())
    return {"n": int(sel.sum()), "pass_rate": r(rate), "acc": r(acc),
            "majority": r(max(rate, 1 - rate)), "auc": r(_auc(p, ys)), "corr_strict": r(_corr(p, ys)),
            "corr_partial": r(_corr(p, yp))}


def heldout_metrics(model: LearnedReward, data: dict) -> dict:
    """:func:`evaluate` on the engine samples (the headline), per task on them, and per other source."""
    src = data["source"]
    out = {"engine": evaluate(model, data, src == 0)}
    tasks = [p.task for p in data["prompts"]]
    out["engine_per_task"] = {
        t: evaluate(model, data, (src == 0) & torch.tensor([x == t for x in tasks]))
        for t in dict.fromkeys(tasks)
    }
    for k, name in enumerate(SOURCES[1:], start=1):
        if bool((src == k).any()):
            out[name] = evaluate(model, data, src == k)
    return out


def attack(model: LearnedReward, images: torch.Tensor, feats: torch.Tensor, *, eps, steps: int = 10,
           batch: int = 256) -> torch.Tensor:
    """Adversarial images for ``model`` (math.md §8.5): ``steps`` signed-gradient ascent steps of size
    ``2.5 eps / steps`` on its strict logit, kept within ``eps`` (a float or a per-image ``[N]`` tensor) of
    ``images`` in the max norm and within [-1, 1].  The worst case of what a policy optimising the learned
    reward can do to its pixels."""
    out = []
    eps = torch.as_tensor(eps, dtype=torch.float32).expand(len(images))
    for lo in range(0, len(images), batch):
        x0, f = images[lo : lo + batch], feats[lo : lo + batch]
        e = eps[lo : lo + batch].view(-1, 1, 1, 1)
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(model(x, f)[:, 0].sum(), x)
            x = (x.detach() + 2.5 * e / steps * g.sign())
            x = torch.maximum(torch.minimum(x, x0 + e), x0 - e).clamp(-1, 1)
        out.append(x.detach())
    return torch.cat(out)


def attack_metrics(model: LearnedReward, data: dict, *, n: int = 128, eps: float = 0.25, steps: int = 10):
    """On the first ``n`` held-out engine samples the verifier fails: the mean predicted pass probability
    before and after :func:`attack`, the verifier's pass rate after it, and ``fooled``: the share the model
    then passes (``p > 0.5``) while the verifier still fails them."""
    idx = torch.nonzero((data["source"] == 0) & (data["strict"] == 0)).flatten()[:n]
    x, f = data["images"][idx], data["feats"][idx]
    adv = attack(model, x, f, eps=eps, steps=steps)
    strict, _ = label(adv, [data["prompts"][i] for i in idx.tolist()])
    p0, p1 = predict(model, x, f), predict(model, adv, f)
    r = lambda v: round(float(v), 4)
    return {"n": len(idx), "eps": eps, "steps": steps, "p_before": r(p0.mean()), "p_after": r(p1.mean()),
            "verifier_pass_after": r(strict.mean()), "fooled": r(((p1 > 0.5) & (strict == 0)).float().mean())}


def ascent_metrics(model: LearnedReward, data: dict, *, n: int = 256, radii=(4.0, 10.0, 20.0),
                   steps: int = 20) -> list[dict]:
    """Does the reward's gradient point to what the verifier passes?  On the first ``n`` held-out engine
    samples, per radius ``r``: ``steps`` ascent steps of L2 length ``r / steps`` along each image's
    normalised gradient of the strict logit (clamped to [-1, 1]), then the mean predicted pass probability
    and the verifier's strict pass rate and partial score, before and after (math.md §8.5).  A reward that the
    gradient methods (§5, §7) can climb honestly raises the verifier's numbers with its own."""
    idx = torch.nonzero(data["source"] == 0).flatten()[:n]
    x0, f = data["images"][idx], data["feats"][idx]
    prompts = [data["prompts"][i] for i in idx.tolist()]
    r4 = lambda v: round(float(v), 4)

    def scores(x, moved):
        strict, partial = label(x, prompts)
        return {"l2": r4(moved), "p": r4(predict(model, x, f).mean()), "strict": r4(strict.mean()),
                "partial": r4(partial.mean())}

    out = [scores(x0, 0.0)]
    for radius in radii:
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(model(x, f)[:, 0].sum(), x)
            x = (x.detach() + radius / steps * _unit(g)).clamp(-1, 1)
        out.append(scores(x, (x - x0).flatten(1).norm(dim=1).mean()))
    return out


def adversarial_examples(model: LearnedReward, data: dict, n: int, *, eps: float, seed: int, tag: str):
    """``n`` training rows again after :func:`attack` (each at a budget uniform in ``[0, eps]``), relabelled
    by the verifier: the adversarial round's data."""
    g = torch.Generator().manual_seed(common.derive_seed(seed, "reward_model", "adversarial", tag))
    idx = torch.randint(len(data["images"]), (n,), generator=g)
    e = torch.rand(n, generator=g) * eps
    adv = attack(model, data["images"][idx], data["feats"][idx], eps=e)
    prompts = [data["prompts"][i] for i in idx.tolist()]
    strict, partial = label(adv, prompts)
    return {"images": adv, "prompts": prompts, "feats": data["feats"][idx], "strict": strict,
            "partial": partial, "source": torch.full((n,), SOURCES.index("adversarial"))}


def concat(a: dict, b: dict) -> dict:
    return {k: (a[k] + b[k]) if isinstance(a[k], list) else torch.cat([a[k], b[k]]) for k in a}


CHECK = {"per_task": 8, "samplers": ("euler:1", "euler:4.5"), "seed": 20261203}


def check_subset(policy, model: LearnedReward) -> dict:
    """The card's small fixed check, which the tests recompute: ``CHECK['per_task']`` held-out prompts per
    task (the first ones of :func:`heldout_pool`, cycled), one engine sample each (alternating samplers,
    fixed seeds), :func:`evaluate`'s numbers."""
    pool = heldout_pool()
    ps = [pool[t][i % len(pool[t])] for t in pool for i in range(CHECK["per_task"])]
    seeds = [CHECK["seed"] + i for i in range(len(ps))]
    x = engine_samples(policy, ps, seeds, parse_samplers(CHECK["samplers"]))
    strict, partial = label(x, ps)
    data = {"images": x, "feats": prompt_features(ps), "strict": strict, "partial": partial}
    return {**CHECK, "samplers": list(CHECK["samplers"]), **evaluate(model, data)}


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------
def _h(default, text):
    return field(default=default, metadata={"help": text})


@dataclass
class RewardModelConfig:
    preset: str = _h("tiny", "named setup (see the preset list above)")
    out: str | None = _h(None, "output directory (default: runs/reward_model-<timestamp>); models/embedded "
                               "with --overwrite replaces the shipped model")
    overwrite: bool = _h(False, "replace a reward_model.safetensors already in --out")
    engine: int = _h(3072, "training images sampled by the engine (reward-train prompts)")
    renders: int = _h(1536, "training renders of their own prompt, and as many of another prompt")
    noisy: int = _h(768, "training engine samples again with Gaussian noise")
    heldout_engine: int = _h(768, "held-out images sampled by the engine (held-out prompts)")
    heldout_renders: int = _h(256, "held-out renders (own prompt, and as many of another)")
    seen_engine: int = _h(384, "engine samples of training prompts at fresh seeds, scored beside the "
                               "held-out ones (what the training loops see; 0: none)")
    samplers: tuple[str, ...] = _h(("euler:1", "euler:2.5", "euler:4.5", "cps:1"),
                                   "engine samplers, SOLVER:CFG each (10 steps; cps at noise level 0.7)")
    epochs: int = _h(14, "passes over the training images")
    lr: float = _h(2e-3, "AdamW peak learning rate (one-cycle)")
    batch: int = _h(128, "images per optimiser step")
    width: int = _h(32, "conv channels of the first layer (the others twice that)")
    hidden: int = _h(96, "hidden units of the head")
    partial_weight: float = _h(0.5, "weight of the partial-score head's loss")
    head: str = _h("pool", "pool (per channel mean, max, attention-weighted position) or flat (8x8 map)")
    use_task: bool = _h(False, "condition on the task type too (the objects alone say what is checked)")
    palette_tau: float = _h(0.05, "temperature of the soft palette input channels (0: none)")
    adversarial: int = _h(0, "adversarial training: images attacked per round (0: none)")
    adversarial_rounds: int = _h(2, "adversarial rounds (attack the model, relabel, fine-tune)")
    adversarial_epochs: int = _h(3, "fine-tuning epochs per adversarial round (over all data so far)")
    adversarial_eps: float = _h(0.25, "max-norm budget of the attacks (images in [-1, 1])")
    robust_eps: float = _h(0.0, "robust fine-tune last: L2 radius per image of each batch's worst case, "
                                "images in [-1, 1] (0: none)")
    robust_steps: int = _h(3, "robust fine-tune: ascent steps per batch")
    robust_epochs: int = _h(3, "robust fine-tune: epochs at a third of the learning rate")
    base: str | None = _h(None, "embedded checkpoint directory whose samples make the data (default: the "
                                "shipped models/embedded; e.g. models/embedded/stage3)")
    cache: str | None = _h(None, "directory keeping the collected images and labels between runs (keyed "
                                 "by the data options, the seed and the base model)")
    seed: int = _h(0, "seed of the prompt draws, samples, noise and initialisation")
    threads: int = _h(1, "torch CPU threads (0: torch's default)")


def preset_tiny() -> RewardModelConfig:
    """The embedded default: the shipped model's recipe (a few minutes on one CPU thread)."""
    return RewardModelConfig()


def preset_smoke() -> RewardModelConfig:
    """A seconds-long run to check the pipeline (not a useful model)."""
    return RewardModelConfig(engine=64, renders=32, noisy=16, heldout_engine=48, heldout_renders=16, epochs=1)


PRESETS = {"tiny": preset_tiny, "smoke": preset_smoke}


def validate(cfg: RewardModelConfig) -> None:
    for name in ("engine", "heldout_engine", "epochs", "batch", "width", "hidden"):
        v = getattr(cfg, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v}")
    for name in ("renders", "noisy", "heldout_renders", "seen_engine", "threads"):
        v = getattr(cfg, name)
        if v < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 0, got {v}")
    if cfg.width % 4:
        raise ValueError(f"--width: expected a multiple of 4 (group norm of 4 groups), got {cfg.width}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr: expected a finite value > 0, got {cfg.lr}")
    for name in ("adversarial_rounds", "adversarial_epochs"):
        if getattr(cfg, name) < 1:
            v = getattr(cfg, name)
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v}")
    if cfg.adversarial < 0:
        raise ValueError(f"--adversarial: expected an integer >= 0, got {cfg.adversarial}")
    if not (0 < cfg.adversarial_eps <= 2):
        raise ValueError(f"--adversarial-eps: expected a value in (0, 2], got {cfg.adversarial_eps}")
    if not (0 <= cfg.robust_eps <= 64):
        raise ValueError(f"--robust-eps: expected a value in [0, 64], got {cfg.robust_eps}")
    for name in ("robust_steps", "robust_epochs"):
        if getattr(cfg, name) < 1:
            v = getattr(cfg, name)
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v}")
    if cfg.head not in ("pool", "flat"):
        raise ValueError(f"--head: expected pool or flat, got {cfg.head!r}")
    if not (cfg.palette_tau >= 0 and math.isfinite(cfg.palette_tau)):
        raise ValueError(f"--palette-tau: expected a finite value >= 0, got {cfg.palette_tau}")
    if not (cfg.partial_weight >= 0 and math.isfinite(cfg.partial_weight)):
        raise ValueError(f"--partial-weight: expected a finite value >= 0, got {cfg.partial_weight}")
    parse_samplers(cfg.samplers)
    if cfg.base is not None and not (Path(cfg.base) / "default.safetensors").is_file():
        raise ValueError(f"--base: expected an embedded checkpoint directory with default.safetensors, "
                         f"got {cfg.base!r}")


def _cache_path(cache: str | None, key: dict) -> Path | None:
    if not cache:
        return None
    import hashlib

    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache) / f"reward_model_data-{h}.pt"


def _save_data(path: Path, *parts: dict) -> None:
    strip = lambda d: {**d, "prompts": [p.text for p in d["prompts"]]} if "prompts" in d else d
    path.parent.mkdir(parents=True, exist_ok=True)
    common.atomic_save([strip(d) for d in parts], path)


def _load_data(path: Path) -> list[dict]:
    from train.data.geneval_mini import parse_prompt

    parts = torch.load(path, weights_only=True)
    return [{**d, "prompts": [parse_prompt(t) for t in d["prompts"]]} if "prompts" in d else d for d in parts]


def run(cfg: RewardModelConfig, argv: list[str], say=print) -> Path:
    from .spo_scorer import build_embedded

    t0 = time.perf_counter()
    out_dir = Path(cfg.out or common.default_run_dir("reward_model"))
    out = out_dir / "reward_model.safetensors"
    samplers = parse_samplers(cfg.samplers)
    from models.embedded import DEFAULT_DIR

    base_sha = common.file_sha256(Path(cfg.base or DEFAULT_DIR) / "default.safetensors")
    default_sha = common.file_sha256(Path(DEFAULT_DIR) / "default.safetensors")
    policy = build_embedded(cfg.seed, cfg.base)
    default_policy = policy if base_sha == default_sha else build_embedded(cfg.seed)
    key = {k: getattr(cfg, k) for k in ("engine", "renders", "noisy", "heldout_engine", "heldout_renders",
                                        "samplers", "seed")}
    cached = _cache_path(cfg.cache, {**key, "base": base_sha})
    from_cache = cached is not None and cached.is_file()
    if from_cache:
        train, held, *meta = _load_data(cached)
        t_collect = meta[0].get("collect_seconds") if meta else None
        say(f"data: from the cache {cached}", flush=True)
    else:
        train = collect(policy, reward_train_pool(), engine=cfg.engine, renders=cfg.renders, noisy=cfg.noisy,
                        samplers=samplers, seed=cfg.seed, tag="train")
        held = collect(policy, heldout_pool(), engine=cfg.heldout_engine, renders=cfg.heldout_renders,
                       noisy=0, samplers=samplers, seed=cfg.seed, tag="heldout")
        t_collect = round(time.perf_counter() - t0, 1)
        if cached is not None:
            _save_data(cached, train, held, {"collect_seconds": t_collect})
    t_data = time.perf_counter() - t0
    counts = lambda d: {SOURCES[k]: int((d["source"] == k).sum()) for k in range(len(SOURCES))}
    say(f"data: {len(train['images'])} train / {len(held['images'])} held-out images, strict pass rate "
        f"{float(train['strict'].mean()):.3f} / {float(held['strict'].mean()):.3f} ({t_data:.0f}s)",
        flush=True)
    model = train_model(train, epochs=cfg.epochs, lr=cfg.lr, batch=cfg.batch, seed=cfg.seed, width=cfg.width,
                        hidden=cfg.hidden, palette_tau=cfg.palette_tau or None, head=cfg.head,
                        use_task=cfg.use_task, partial_weight=cfg.partial_weight, say=say)
    rounds = []
    for r in range(cfg.adversarial_rounds if cfg.adversarial else 0):
        before = attack_metrics(model, held, eps=cfg.adversarial_eps)
        train = concat(train, adversarial_examples(model, train, cfg.adversarial, eps=cfg.adversarial_eps,
                                                   seed=cfg.seed, tag=str(r)))
        say(f"adversarial round {r + 1}: {cfg.adversarial} attacked training images, verifier pass rate "
            f"{float(train['strict'][-cfg.adversarial:].mean()):.3f}; held-out fooled before "
            f"{before['fooled']}",
            flush=True)
        model = train_model(train, epochs=cfg.adversarial_epochs, lr=cfg.lr / 3, batch=cfg.batch,
                            seed=cfg.seed + r + 1, init=model, partial_weight=cfg.partial_weight, say=say)
        rounds.append({"fooled_before": before["fooled"], "p_after_before": before["p_after"]})
    if cfg.robust_eps:  # from scratch the robust loss stayed at the constant predictor's: fine-tune instead
        say(f"robust fine-tune: L2 radius {cfg.robust_eps:g}, {cfg.robust_steps} ascent steps per batch",
            flush=True)
        model = train_model(train, epochs=cfg.robust_epochs, lr=cfg.lr / 3, batch=cfg.batch,
                            seed=cfg.seed + len(rounds) + 1, init=model, partial_weight=cfg.partial_weight,
                            robust_eps=cfg.robust_eps, robust_steps=cfg.robust_steps, say=say)
    t_train = time.perf_counter() - t0 - t_data
    metrics = heldout_metrics(model, held)
    metrics["attack"] = attack_metrics(model, held, eps=cfg.adversarial_eps)
    metrics["ascent"] = ascent_metrics(model, held)
    if cfg.seen_engine:
        seen = collect(policy, reward_train_pool(), engine=cfg.seen_engine, renders=0, noisy=0,
                       samplers=samplers, seed=cfg.seed, tag="seen")
        metrics["seen_prompts_fresh_seeds"] = evaluate(model, seen)
    if default_policy is not policy:  # the samples the training loops will score: the shipped default's
        held_default = collect(default_policy, heldout_pool(), engine=cfg.heldout_engine, renders=0, noisy=0,
                               samplers=samplers, seed=cfg.seed, tag="heldout")
        metrics["engine_shipped_default"] = evaluate(model, held_default)
        e = metrics["engine_shipped_default"]
        say(f"held-out samples of the shipped default: accuracy {e['acc']:.3f} "
            f"(majority {e['majority']:.3f}), AUC {e['auc']:.3f}", flush=True)
    metrics["adversarial_rounds"] = rounds
    e = metrics["engine"]
    say(f"held-out engine samples: accuracy {e['acc']:.3f} (majority {e['majority']:.3f}), "
        f"AUC {e['auc']:.3f}, "
        f"correlation {e['corr_strict']:.3f} strict / {e['corr_partial']:.3f} partial", flush=True)
    cmd = "python -m train.reward_model " + " ".join(shlex.quote(a) for a in argv)
    card = {
        "output": OUTPUT,
        "reward": "geneval_learned: sigmoid of the strict logit, in (0, 1)",
        "command": cmd,
        "args": to_dict(cfg),
        "data": {"train": counts(train), "heldout": counts(held),
                 "train_pass_rate": round(float(train["strict"].mean()), 4),
                 "heldout_prompts": sum(len(v) for v in heldout_pool().values()),
                 "train_prompts": sum(len(v) for v in reward_train_pool().values())},
        "heldout": metrics,
        "check": {**check_subset(default_policy, model), "base_model_sha256": default_sha},
        "base_model": cfg.base or "models/embedded",
        "base_model_sha256": base_sha,
        "seconds": {"data": round(t_data, 1), "data_from_cache": from_cache,
                    "data_collection": t_collect, "train": round(t_train, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    save_model(model, out, card)
    say(f"reward model: {out} ({out.stat().st_size // 1024} KB), card {out.with_suffix('.json')}", flush=True)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_cli(RewardModelConfig, argv, prog="train.reward_model",
                        description=__doc__.split("\n\n")[0], presets=PRESETS)
        validate(cfg)
        for option, path in (("--out", cfg.out), ("--cache", cfg.cache)):
            if path and Path(path).exists() and not Path(path).is_dir():
                raise ValueError(f"{option}: expected a directory (new or existing), got the file {path!r}")
        if cfg.out and (Path(cfg.out) / "reward_model.safetensors").exists() and not cfg.overwrite:
            raise FileExistsError(
                f"--out: expected a directory without a reward model, got {cfg.out}, which holds "
                f"reward_model.safetensors (pass --overwrite to replace it)"
            )
    except (ConfigError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        run(cfg, argv)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
