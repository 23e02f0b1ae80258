"""Export a run's LoRA adapter in diffusers' format: ``python -m train.export RUN_DIR [--iteration N] [--ema]
[--out DIR]``.

Every run already writes, at each checkpoint and at its end, ``<run>/lora/`` (the trained ``default``
adapter) and ``<run>/lora_ema/`` (its evaluation EMA, the weights the held-out score is measured with), each
holding ``pytorch_lora_weights.safetensors`` with the pipeline class's own key convention and rank/alpha
metadata: ``pipe = StableDiffusion3Pipeline.from_pretrained(MODEL); pipe.load_lora_weights("<run>/lora_ema")``
(``FluxPipeline`` for FLUX, ``StableDiffusionPipeline`` for a DDPO UNet run; the embedded default is an
``SD3Transformer2DModel``, so ``StableDiffusion3Pipeline.lora_state_dict`` reads its file too).  This command
exports an earlier checkpoint still in ``<run>/checkpoints/`` (the newest two are kept): checkpoints hold the
adapters as tensor lists in the policy's parameter order, so the policy is rebuilt from the run's
``config.json`` to name them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["export_adapters", "export_checkpoint", "load_policy", "main", "LORA_DIR", "LORA_EMA_DIR"]

LORA_DIR, LORA_EMA_DIR = "lora", "lora_ema"


def _write_atomic(model, state: dict, out: Path) -> Path:
    """Write the LoRA file into a temporary folder beside ``out``, then move it into place: a crash leaves the
    previous file whole."""
    from models.lora import LORA_WEIGHT_NAME, write_lora

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_lora(model, state, tmp)
        os.replace(tmp / LORA_WEIGHT_NAME, out / LORA_WEIGHT_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / LORA_WEIGHT_NAME


def export_adapters(policy, lora_dir: Path | None, ema_dir: Path | None, *, write: bool = True) -> None:
    """Write the policy's trained adapter to ``lora_dir`` and its evaluation EMA to ``ema_dir`` (either may be
    None).  Under FSDP2 every rank calls this (the shards are gathered) and only the one with ``write``
    writes."""
    model = policy.transformer
    if lora_dir is not None:
        state = lora_state(policy)
        if write:
            _write_atomic(model, state, Path(lora_dir))
    if ema_dir is not None:
        with policy.eval_weights():
            state = lora_state(policy)
        if write:
            _write_atomic(model, state, Path(ema_dir))


def lora_state(policy) -> dict[str, torch.Tensor]:
    from models.lora import lora_state_dict

    return lora_state_dict(policy.transformer, "default")


def _checkpoint_path(run_dir: Path, iteration: int | None) -> Path:
    from . import common

    ckdir = run_dir / "checkpoints"
    if iteration is None:
        path = common.latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"RUN_DIR: expected checkpoints under {ckdir}, found none")
    else:
        path = ckdir / f"iter_{iteration:06d}.pt"
        if not path.exists() and not path.with_suffix(".dcp").exists():
            have = common.checkpointed_iterations(run_dir)
            raise FileNotFoundError(
                f"--iteration: expected one of the checkpointed iterations {have}, got {iteration}"
            )
        if not path.exists():
            path = path.with_suffix(".dcp")
    if path.is_dir():
        raise ValueError(
            f"RUN_DIR: {path} is a sharded (FSDP) checkpoint; export it from a run on the same world size "
            f"(the run itself writes {LORA_DIR}/ and {LORA_EMA_DIR}/ at every checkpoint)"
        )
    return path


def load_policy(run_dir, *, iteration: int | None = None, device: str = "cpu"):
    """The run's policy rebuilt from its ``config.json`` with the adapters of checkpoint ``iteration``
    (default: the latest) -> ``(policy, checkpointed iteration)``."""
    from .config import from_dict
    from .policy import ModelConfig, build_policy

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"RUN_DIR: expected a run directory holding config.json, got {str(run_dir)!r}"
        )
    path = _checkpoint_path(run_dir, iteration)
    cfg = json.loads(cfg_file.read_text())
    state = torch.load(path, map_location="cpu", weights_only=False)
    policy = build_policy(
        from_dict(ModelConfig, cfg["models"]),
        preset=cfg["preset"],
        model_path=cfg.get("model"),
        device=torch.device(device),
        seed=cfg.get("seed", 0),
        prompts=cfg.get("prompts"),
        eval_prompts=cfg.get("eval_prompts"),
        tasks=tuple(cfg.get("tasks") or ()),
    )
    policy.load_adapter_state(state["policy"])
    return policy, int(state["iteration"])


def export_checkpoint(run_dir, *, iteration: int | None = None, ema: bool = False, out=None,
                      device: str = "cpu") -> Path:
    """Export checkpoint ``iteration`` (default: the latest) of ``run_dir``: the trained adapter, or with
    ``ema`` its evaluation EMA, to ``out`` (default ``<run>/lora[_ema]_iter_NNNNNN``) -> the written file."""
    run_dir = Path(run_dir)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out: expected a directory (new or existing), got the file {str(out)!r}")
    policy, it = load_policy(run_dir, iteration=iteration, device=device)
    if out is None:
        out = run_dir / f"{LORA_EMA_DIR if ema else LORA_DIR}_iter_{it:06d}"
    out = Path(out)
    export_adapters(policy, None if ema else out, out if ema else None)
    from models.lora import LORA_WEIGHT_NAME

    return out / LORA_WEIGHT_NAME


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.export", description=__doc__.split("\n\n")[0].replace("``", "")
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (train.nft / grpo / ddpo)")
    parser.add_argument(
        "--iteration", type=int, default=None, help="checkpointed iteration (default: the latest)"
    )
    parser.add_argument("--ema", action="store_true", help="export the evaluation EMA of the adapter")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/lora[_ema]_iter_N)")
    args = parser.parse_args(argv)
    try:
        file = export_checkpoint(args.run_dir, iteration=args.iteration, ema=args.ema, out=args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {file}; load it with pipe.load_lora_weights({str(file.parent)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
