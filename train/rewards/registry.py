"""Reward registry and multi-reward aggregation (math.md §8).

``build_reward(names, ...)`` returns a :class:`CombinedReward`: call it with ``(images, prompts)`` and it
returns ``(reward [B], components {name: [B]})``.

A reward is a callable ``(images [B, 3, H, W] in [-1, 1], prompts) -> [B]`` with a ``name``.  One whose
``differentiable`` attribute is True keeps the autograd graph from ``images`` to its result whenever grad is
enabled (the reward-backprop loops need that); a :class:`CombinedReward` is differentiable when all its parts
are, and :func:`require_differentiable` refuses any other before work starts.

A reward that raises, returns the wrong shape, or returns a non-finite value stops the run with a message
naming it; it is never replaced by a silent zero.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = [
    "REWARD_NAMES",
    "AGGREGATIONS",
    "build_reward",
    "CombinedReward",
    "RewardError",
    "aggregate",
    "require_differentiable",
]

AGGREGATIONS = ("zmean", "min", "mean_minus_std")


class RewardError(RuntimeError):
    """A reward failed (raised, wrong shape or NaN/inf)."""


def _geneval_mini(mode: str):
    def make(_opts):
        from .geneval_mini import GenEvalMini

        scorer = GenEvalMini()

        def fn(images, prompts):
            return scorer.score(images, prompts)[mode]

        fn.name = "geneval_mini" if mode == "strict" else "geneval_mini_partial"
        return fn

    return make


def _jpeg(sign):
    def make(_opts):
        from .basic import JpegCompressibility

        return JpegCompressibility(sign=sign)

    return make


def _clip_dir(opts):
    """``--reward-paths clip_score=DIR`` or ``--reward-clip-path DIR`` (the same directory if both)."""
    from .basic import check_clip_dir

    via_paths, via_opt = (opts.get("paths") or {}).get("clip_score"), opts.get("clip_path")
    if via_paths and via_opt and via_paths != via_opt:
        raise ValueError(
            f"--reward-clip-path: expected the same directory as --reward-paths clip_score=..., got "
            f"{via_opt!r} and {via_paths!r}"
        )
    return check_clip_dir(via_paths or via_opt)


def _clip(opts):
    from .basic import ClipScore

    return ClipScore(str(_clip_dir(opts)), device=opts.get("device", "cpu"))


def _pickscore(opts):
    from .clip_models import build_pickscore

    return build_pickscore(opts)


def _aesthetic(opts):
    from .clip_models import build_aesthetic

    return build_aesthetic(opts)


def _check_pickscore(opts):
    from .clip_models import pickscore_paths

    pickscore_paths(opts)


def _check_aesthetic(opts):
    from .clip_models import aesthetic_paths

    aesthetic_paths(opts)


# a factory's ``check(opts)`` refuses missing local weights without loading anything: build_reward runs every
# check before it builds any reward, so a bad path is reported before minutes of model loading
_clip.check, _pickscore.check, _aesthetic.check = _clip_dir, _check_pickscore, _check_aesthetic


def _hpsv21(opts):
    from .hps import HPSv21

    return HPSv21((opts.get("paths") or {}).get("hpsv2.1"), device=opts.get("device", "cpu"))


def _imagereward(opts):
    from .imagereward import ImageReward

    return ImageReward((opts.get("paths") or {}).get("imagereward"), device=opts.get("device", "cpu"))


def _check_hpsv21(opts):
    from .hps import resolve_paths

    resolve_paths((opts.get("paths") or {}).get("hpsv2.1"))


def _check_imagereward(opts):
    from .imagereward import resolve_path

    resolve_path((opts.get("paths") or {}).get("imagereward"))


_hpsv21.check, _imagereward.check = _check_hpsv21, _check_imagereward


def _saturation(_opts):
    from .basic import Saturation

    return Saturation()


def _ocr(_opts):
    from .ocr import OcrReward

    return OcrReward()


def _vlm_judge(opts):
    from .vlm import DEFAULT_MODEL, VlmJudge

    url = opts["paths"].get("vlm_judge")
    if url is None:
        raise ValueError(
            "--reward-paths: expected vlm_judge=http://HOST:PORT/v1 (the judge's OpenAI-compatible "
            "endpoint) for --reward vlm_judge, got none"
        )
    return VlmJudge(url, model=opts.get("vlm_model") or DEFAULT_MODEL, **opts.get("http", {}))


def _http(url, opts):
    from .client import HttpReward

    return HttpReward(url, **opts.get("http", {}))


def _geneval_learned(opts):
    from train.reward_model import GenEvalLearned

    return GenEvalLearned(opts.get("paths", {}).get("geneval_learned"))


_FACTORIES: dict[str, Callable] = {
    "geneval_mini": _geneval_mini("strict"),
    "geneval_mini_partial": _geneval_mini("partial"),
    "jpeg_compressibility": _jpeg(1.0),
    "jpeg_incompressibility": _jpeg(-1.0),
    "clip_score": _clip,
    "saturation": _saturation,
    "pickscore": _pickscore,
    "aesthetic": _aesthetic,
    "ocr": _ocr,
    "vlm_judge": _vlm_judge,
    "hpsv2.1": _hpsv21,
    "imagereward": _imagereward,
    "geneval_learned": _geneval_learned,  # train.reward_model: learned from the GenEval-mini verifier
}
# --reward http://HOST:PORT/NAME: a reward server's reward (train.rewards.client)
HTTP_PREFIXES = ("http://", "https://")
REWARD_NAMES = tuple(_FACTORIES)


def aggregate(values: dict[str, torch.Tensor], weights: dict[str, float], how: str, k_std: float = 1.0):
    """math.md §8: z-score each reward over the batch, then a weighted mean (``zmean``), the minimum (``min``)
    or the weighted mean minus ``k_std`` times the spread across rewards (``mean_minus_std``).  One reward:
    returned as is."""
    names = list(values)
    if len(names) == 1:
        return values[names[0]]
    z = []
    for n in names:
        v = values[n]
        z.append((v - v.mean()) / (v.std(unbiased=False) + 1e-6))
    z = torch.stack(z, dim=0)
    w = torch.tensor([weights[n] for n in names], dtype=z.dtype, device=z.device).view(-1, 1)
    mean = (w * z).sum(0) / w.sum()
    if how == "zmean":
        return mean
    if how == "min":
        return z.min(dim=0).values
    if how == "mean_minus_std":
        return mean - k_std * z.std(dim=0, unbiased=False)
    raise ValueError(f"--reward-aggregation: expected one of {', '.join(AGGREGATIONS)}, got {how!r}")


class CombinedReward:
    def __init__(self, fns: dict[str, Callable], weights: dict[str, float], aggregation: str, k_std: float):
        self.fns, self.weights, self.aggregation, self.k_std = fns, weights, aggregation, k_std

    @property
    def differentiable(self) -> bool:
        """True when every part keeps the graph from the images to its value."""
        return all(getattr(fn, "differentiable", False) for fn in self.fns.values())

    def __call__(
        self, images: torch.Tensor, prompts: Sequence
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = images.shape[0]
        comps = {}
        for name, fn in self.fns.items():
            try:
                val = fn(images, prompts)
            except RewardError:  # the HTTP client and the VLM judge name their endpoint themselves
                raise
            except Exception as e:  # surface it with the reward's name; the loop checkpoints and stops
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
            val = torch.as_tensor(val).to(torch.float32).reshape(-1)
            if val.shape[0] != b:
                raise RewardError(f"reward {name!r}: expected {b} values (one per image), got {val.shape[0]}")
            if not torch.isfinite(val).all():
                bad = int((~torch.isfinite(val)).sum())
                raise RewardError(
                    f"reward {name!r} returned {bad} non-finite value(s) (NaN/inf) for {b} images"
                )
            comps[name] = val
        return aggregate(comps, self.weights, self.aggregation, self.k_std), comps

    def close(self) -> None:
        """Release the parts' worker processes (``--reward-workers``), if any."""
        for fn in self.fns.values():
            if hasattr(fn, "close"):
                fn.close()


def parse_reward_paths(paths: Sequence[str] | dict[str, str]) -> dict[str, str]:
    """``("pickscore=/m/ps", ...)`` -> ``{"pickscore": "/m/ps"}``; a malformed entry is refused by name."""
    if isinstance(paths, dict):
        return dict(paths)
    out: dict[str, str] = {}
    for entry in paths:
        name, sep, path = str(entry).partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--reward-paths: expected NAME=PATH entries, got {entry!r}")
        if name.strip() in out:
            raise ValueError(f"--reward-paths: expected each reward once, got {name.strip()!r} twice")
        out[name.strip()] = path.strip()
    return out


def resolve_device(device: str, option: str = "--reward-device") -> str:
    """``option`` (the loops' ``--reward-device``): ``auto`` is CUDA when present, else the CPU; others must
    name a torch device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{option}: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{option}: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}: expected a device this machine has, got {device!r} (no CUDA)")
    return str(dev)


def build_reward(
    names: str | Sequence[str],
    *,
    weights: Sequence[float] = (),
    aggregation: str = "zmean",
    k_std: float = 1.0,
    clip_path: str | None = None,
    paths: Sequence[str] | dict[str, str] = (),
    device: str = "auto",
    workers: int = 0,
    timeout: float = 60.0,
    retries: int = 2,
    max_in_flight: int = 2,
    vlm_model: str | None = None,
) -> CombinedReward:
    """``paths``: local weights of model rewards, ``NAME=PATH`` strings (``--reward-paths``) or a dict; a
    factory reads its own entry from ``opts["paths"]``.  ``device``: where model rewards run (``auto``: CUDA
    when present).  A name ``http://HOST:PORT/NAME`` is a reward server's reward (train.rewards.client;
    ``timeout`` s per attempt, ``retries``, ``max_in_flight`` requests, also for ``vlm_judge``, whose model
    is ``vlm_model``).  ``workers`` > 0 computes the rule-based CPU rewards in that many worker processes
    (train.rewards.workers)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise ValueError("--reward: expected at least one reward name, got none")
    for n in names:
        if n not in _FACTORIES and not n.startswith(HTTP_PREFIXES):
            raise ValueError(
                f"--reward: expected names from {', '.join(REWARD_NAMES)} or http://HOST:PORT/NAME, got {n!r}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"--reward: expected each reward once, got {','.join(names)}")
    if weights and len(weights) != len(names):
        raise ValueError(
            f"--reward-weights: expected {len(names)} weights (one per reward), got {len(weights)}"
        )
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"--reward-aggregation: expected one of {', '.join(AGGREGATIONS)}, got {aggregation!r}"
        )
    w = dict(zip(names, weights, strict=True)) if weights else {n: 1.0 for n in names}
    if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(
            f"--reward-weights: expected non-negative weights with a positive sum, got {tuple(weights)}"
        )
    if workers < 0:
        raise ValueError(f"--reward-workers: expected an integer >= 0, got {workers}")
    from .client import check_http_options

    check_http_options(timeout, retries, max_in_flight)
    opts = {
        "clip_path": clip_path,
        "paths": parse_reward_paths(paths),
        "device": resolve_device(device),
        "http": {"timeout": timeout, "retries": retries, "max_in_flight": max_in_flight},
        "vlm_model": vlm_model,
    }
    for n in names:
        check = getattr(_FACTORIES.get(n), "check", None)
        if check is not None:
            check(opts)
    from .workers import CPU_REWARDS, ProcessPoolReward

    fns = {}
    for n in names:
        if n.startswith(HTTP_PREFIXES):
            fns[n] = _http(n, opts)
        elif workers and n in CPU_REWARDS:
            fns[n] = ProcessPoolReward(n, opts, workers)
        else:
            fns[n] = _FACTORIES[n](opts)
    return CombinedReward(fns, w, aggregation, k_std)


def require_differentiable(reward: CombinedReward, option: str = "--reward") -> None:
    """Refuse, before any work, a reward that cannot be backpropagated (reward-backprop methods need one)."""
    bad = [n for n, fn in reward.fns.items() if not getattr(fn, "differentiable", False)]
    if bad:
        raise ValueError(
            f"{option}: expected differentiable reward(s) for this method, got non-differentiable "
            f"{', '.join(repr(b) for b in bad)}"
        )
