"""Pretrain the embedded default model on GenEval-mini renders with flow matching (math.md §0, §A).

    python -m train.pretrain --train.steps 3000 --out models/embedded        (--help lists every option)

Per step: a batch of train prompts (``train.data.sample_prompts``) and their renders ``x0``; a share
``--train.prompt-dropout`` (10%) of the prompts is replaced by ``""`` (so classifier-free guidance has an
unconditional branch); ``t = shift * u / (1 + (shift - 1) * u)`` with ``u ~ U(0, 1)`` (``--train.time-shift``,
3 like the sampler's schedule; ``--train.time-sampling logit-normal`` draws ``u`` from ``sigmoid(N(0, 1))``),
``x_t = (1 - t) x0 + t noise``, loss ``mean (v(x_t, 1000 t, c) - (noise - x0))^2``; AdamW with a linear
warm-up then a constant rate, so a run stopped at step k equals a run with ``--train.steps k``
(``--train.cooldown N`` decays it to 0 over the last N steps).  ``--train.ema D`` keeps an average of the
weights; evaluations, snapshots and the saved model use it.

``--models.width`` / ``--models.layers`` change the transformer's size; ``--models.init-from DIR`` continues
from a checkpoint with its architecture, or with ``--models.layers L`` grown to ``L`` blocks by
:func:`grow_depth` (copies of its blocks that start as the identity).  ``--text.freeze`` trains the
transformer only and keeps the prompt encoder at its initialisation (random, or ``--models.init-from``'s):
trained jointly, the encoder merges words the transformer has not yet learned to use ("left" and "right" end
at cosine 0.998; docs/embedded-model.md), a frozen one keeps them apart.  ``--text.pretrain-steps N`` first
trains the prompt encoder alone on a text-only objective (each word's object: shape, colour, count and the
side a position prompt puts it on; :func:`pretrain_text_encoder`), then freezes it, as SD3 trains on frozen
pretrained text encoders.  ``--train.caption-noise Q`` captions a share ``Q`` of the renders with another
prompt of the same task type (:func:`mismatch_captions`), the label noise of web data.  Everything is
seeded; on a CPU with the same thread count a run is reproducible bit for bit.

Held-out evaluation (``--eval.every N``) is the training loops': :class:`train.evaluation.Evaluator` samples
through the engine (``train.policy.Policy.sample``: ``engine.rollout`` on the model's diffusers schedule,
``models/embedded/scheduler_config.json``, per-image Philox seeds) with the weight EMA, once per
``--eval.cfg-scales`` value, on ``--eval.per-task`` test prompts of each task type.  The research probes
that used to live here (``restart_scores``, ``relation_response``) are in ``bench/embedded_probes.py``.

The options were renamed for the project's dataclass CLI on 2026-12-03 (``--steps`` -> ``--train.steps``
...); an old name is refused with its new one (:data:`RENAMED`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import models
from models.embedded import DEFAULT_DIR, TRANSFORMER_CONFIG, EmbeddedConfig, EmbeddedDefault, PromptEncoder
from models.lora import EMA
from train import common
from train.config import ConfigError, leaf_values, parse_cli, to_dict
from train.data import (
    STRUCTURE_FIELDS,
    Prompt,
    render_batch,
    sample_prompts,
    split_prompts,
    structure_targets,
    test_prompts,
)
from train.evaluation import EvalConfig, Evaluator, validate_eval
from train.policy import Policy

__all__ = [
    "TrainConfig",
    "ModelsConfig",
    "TextConfig",
    "PretrainEvalConfig",
    "PretrainLogConfig",
    "PretrainConfig",
    "PRESETS",
    "RENAMED",
    "validate",
    "parse_args",
    "sample_times",
    "flow_matching_loss",
    "pretrain_text_encoder",
    "mismatch_captions",
    "model_config",
    "grow_depth",
    "ModelPolicy",
    "evaluate",
    "build_model",
    "pretrain",
    "resume_state",
    "CHECKPOINT",
    "reproduce_command",
    "main",
]


# ------------------------------------------------------------------------------------------------- config
def _h(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    steps: int = _h(3000, "optimizer steps (a run stopped at step k without a cool-down equals k steps)")
    batch_size: int = _h(64, "renders per step")
    lr: float = _h(1e-3, "AdamW learning rate after warm-up")
    warmup: int = _h(100, "linear warm-up steps")
    cooldown: int = _h(0, "decay the rate linearly to 0 over the last N steps (0: constant to the end)")
    weight_decay: float = _h(0.01, "AdamW weight decay")
    grad_clip: float = _h(1.0, "gradient-norm clip")
    time_sampling: Literal["uniform", "logit-normal"] = _h("uniform", "distribution of u before the shift")
    time_shift: float = _h(3.0, "t = shift*u/(1+(shift-1)*u); 1: no shift")
    prompt_dropout: float = _h(0.1, "share of prompts replaced by ''")
    caption_noise: float = _h(
        0.0, "share of renders captioned with another prompt of the same task type, as in web data"
    )
    ema: float = _h(0.0, "weight-EMA decay; evaluations and saves use the average (0: off)")


@dataclass
class ModelsConfig:
    width: int | None = _h(None, "transformer width, a multiple of 32 (none: the default's 64)")
    layers: int | None = _h(
        None, "transformer blocks (none: 4); with --models.init-from, grow its model to this depth"
    )
    init_from: str | None = _h(
        None, "start from the weights in this directory (a previous run's --out); fresh optimizer"
    )


@dataclass
class TextConfig:
    freeze: bool = _h(
        False, "train the transformer only; the prompt encoder keeps its initial (random, init-from) weights"
    )
    pretrain_steps: int = _h(
        0, "first pretrain the prompt encoder on the text-only structure objective for N steps (batch 256), "
        "then freeze it (0: off)"
    )
    pretrain_lr: float = _h(3e-3, "AdamW rate of --text.pretrain-steps")


@dataclass
class PretrainEvalConfig:
    every: int = _h(0, "held-out GenEval-mini every N steps (0: never)")
    cfg_scales: tuple[float, ...] = _h((1.0, 4.0), "CFG scales to evaluate, comma separated (1: CFG-free)")
    per_task: int = _h(32, "held-out prompts per task type (train.data.test_prompts)")
    solver: str = _h("euler", "deterministic ODE solver through the engine: euler or dpm2")
    num_steps: int = _h(10, "sampler steps")
    seed: int = _h(1234, "seed of the per-image noise (fixed, so runs and steps compare)")
    batch: int = _h(64, "images per sampling micro-batch")


@dataclass
class PretrainLogConfig:
    every: int = _h(50, "steps between loss lines")
    file: bool = _h(False, "also write <out>/pretrain_log.jsonl")
    save_every: int = _h(0, "snapshots under <out>/snapshots every N steps (0: none)")
    checkpoint_every: int = _h(
        500, "write <out>/checkpoint.pt (all that --resume needs) every N steps and when stopped "
        "(0: only when stopped)"
    )


@dataclass
class PretrainConfig:
    preset: str = _h("default", "named setup (see the preset list above)")
    out: str = _h(str(DEFAULT_DIR), "directory for default.safetensors / default.json / pretrain.json")
    seed: int = _h(0, "seed of the initialisation, the data and the training times")
    threads: int = _h(2, "torch.set_num_threads")
    max_minutes: float | None = _h(
        None, "wall-clock cap of this process; stops early, checkpoints and saves (none or 0: no cap)"
    )
    resume: bool = _h(
        False, "continue the run in --out from its checkpoint.pt (same training options; --threads, "
        "--max-minutes, --log.* and --eval.* may change)"
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    text: TextConfig = field(default_factory=TextConfig)
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)
    log: PretrainLogConfig = field(default_factory=PretrainLogConfig)


PRESETS = {"default": PretrainConfig}

# the argparse options before 2026-12-03 -> their names now (same meaning; the stage records in
# models/embedded/pretrain.json were made with the old names)
RENAMED = {
    "--steps": "--train.steps",
    "--batch-size": "--train.batch-size",
    "--lr": "--train.lr",
    "--warmup": "--train.warmup",
    "--cooldown": "--train.cooldown",
    "--weight-decay": "--train.weight-decay",
    "--grad-clip": "--train.grad-clip",
    "--time-sampling": "--train.time-sampling",
    "--time-shift": "--train.time-shift",
    "--prompt-dropout": "--train.prompt-dropout",
    "--caption-noise": "--train.caption-noise",
    "--ema": "--train.ema",
    "--init-from": "--models.init-from",
    "--width": "--models.width",
    "--layers": "--models.layers",
    "--freeze-text-encoder": "--text.freeze",
    "--text-pretrain-steps": "--text.pretrain-steps",
    "--text-pretrain-lr": "--text.pretrain-lr",
    "--log-every": "--log.every",
    "--log-file": "--log.file",
    "--save-every": "--log.save-every",
    "--eval-every": "--eval.every",
    "--eval-cfg": "--eval.cfg-scales (comma separated: 1,4)",
    "--eval-per-task": "--eval.per-task",
}


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: PretrainConfig) -> None:
    """Every check before any work; a bad value raises :class:`ConfigError` naming the option, what was
    expected and what was given."""
    for name, val in leaf_values(cfg).items():
        for v in val if isinstance(val, tuple) else (val,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{_opt(name)}: expected a finite number, got {v}")
    tc, mc, xc, ec, lc = cfg.train, cfg.models, cfg.text, cfg.eval, cfg.log
    at_least_one = [("train.steps", tc.steps), ("train.batch_size", tc.batch_size),
                    ("train.warmup", tc.warmup), ("threads", cfg.threads), ("log.every", lc.every),
                    ("eval.per_task", ec.per_task), ("eval.batch", ec.batch)]
    for name, val in at_least_one:
        if val < 1:
            raise ConfigError(f"{_opt(name)}: expected an integer >= 1, got {val}")
    at_least_zero = [("train.cooldown", tc.cooldown, "0: constant to the end"),
                     ("text.pretrain_steps", xc.pretrain_steps, "0: off"),
                     ("log.save_every", lc.save_every, "0: none"), ("eval.every", ec.every, "0: never"),
                     ("log.checkpoint_every", lc.checkpoint_every, "0: only when stopped")]
    for name, val, zero in at_least_zero:
        if val < 0:
            raise ConfigError(f"{_opt(name)}: expected an integer >= 0 ({zero}), got {val}")
    positive = [("train.lr", tc.lr), ("text.pretrain_lr", xc.pretrain_lr), ("train.grad_clip", tc.grad_clip),
                ("train.time_shift", tc.time_shift)]
    for name, val in positive:
        if not val > 0:
            raise ConfigError(f"{_opt(name)}: expected a positive number, got {val}")
    if tc.weight_decay < 0:
        raise ConfigError(f"--train.weight-decay: expected a value >= 0, got {tc.weight_decay}")
    for name, val, what in (("train.prompt_dropout", tc.prompt_dropout, "a share"),
                            ("train.caption_noise", tc.caption_noise, "a share"),
                            ("train.ema", tc.ema, "a decay")):
        if not 0.0 <= val < 1.0:
            raise ConfigError(f"{_opt(name)}: expected {what} in [0, 1), got {val}")
    if cfg.max_minutes is not None and not cfg.max_minutes >= 0:
        raise ConfigError(f"--max-minutes: expected >= 0 (none or 0: no cap), got {cfg.max_minutes}")
    if not ec.cfg_scales or any(s < 0 for s in ec.cfg_scales):
        shown = ",".join(f"{s:g}" for s in ec.cfg_scales) or "nothing"
        raise ConfigError(f"--eval.cfg-scales: expected one or more scales >= 0 (1: CFG-free), got {shown}")
    try:
        validate_eval(EvalConfig(solver=ec.solver, num_steps=ec.num_steps))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"--out: expected a directory (it is created if missing), got the file {cfg.out!r}")
    _validate_architecture(mc)


def _validate_architecture(mc: ModelsConfig) -> None:
    if mc.init_from is None:
        try:
            model_config(mc.width, mc.layers)
        except ValueError as e:
            raise ConfigError(f"--models.{e}") from None
        return
    if mc.width is not None:
        raise ConfigError(
            "--models.width: the architecture comes from --models.init-from; give one or the other"
        )
    config = Path(mc.init_from) / "default.json"
    if not (config.is_file() and (Path(mc.init_from) / "default.safetensors").is_file()):
        raise ConfigError(
            f"--models.init-from: expected a directory with default.safetensors and default.json (a previous "
            f"run's --out), got {mc.init_from!r}"
        )
    if mc.layers is not None:
        blocks = json.loads(config.read_text())["transformer"]["num_layers"]
        try:
            check_growth(blocks, mc.layers)
        except ValueError as e:
            raise ConfigError(f"--models.{e} (--models.init-from {mc.init_from})") from None


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    """``argv`` (default ``sys.argv[1:]``) -> a validated :class:`PretrainConfig`; raises
    :class:`ConfigError` (an old option name is refused with its new name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for tok in argv:
        old = tok.split("=", 1)[0]
        if old in RENAMED:
            raise ConfigError(
                f"{old}: expected {RENAMED[old]} (renamed for the dataclass CLI on 2026-12-03, same "
                f"meaning), got the old name"
            )
    cfg = parse_cli(PretrainConfig, argv, prog="train.pretrain", description=__doc__.split("\n")[0],
                    presets=PRESETS)
    validate(cfg)
    return cfg


# -------------------------------------------------------------------------------------------- objective
def sample_times(
    n: int,
    generator: torch.Generator,
    how: str = "uniform",
    shift: float = 3.0,
) -> torch.Tensor:
    """Training times ``[n]``: ``u ~ U(0, 1)`` (``"uniform"``) or ``sigmoid(N(0, 1))`` (``"logit-normal"``),
    then shifted like the sampler's schedule, ``t = shift * u / (1 + (shift - 1) * u)``, so training sees the
    high-noise steps that decide the layout as often as sampling uses them."""
    if how == "uniform":
        u = torch.rand(n, generator=generator)
    elif how == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        raise ValueError(f"how: expected 'uniform' or 'logit-normal', got {how!r}")
    return shift * u / (1.0 + (shift - 1.0) * u)


def flow_matching_loss(
    model: EmbeddedDefault,
    x0: torch.Tensor,
    prompts: list[str],
    generator: torch.Generator,
    time_sampling: str = "uniform",
    time_shift: float = 3.0,
) -> torch.Tensor:
    """``mean (v(x_t, 1000 t, c) - (noise - x0))^2`` with ``t`` from :func:`sample_times`."""
    b = x0.shape[0]
    t = sample_times(b, generator, time_sampling, time_shift).to(x0)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    tb = t.view(b, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    embeds, pooled = model.text_encoder(model.text_encoder.tokenize(prompts))
    v = model.transformer(
        hidden_states=x_t,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        timestep=1000.0 * t,
        return_dict=False,
    )[0]
    return (v - (noise - x0)).square().mean()


def pretrain_text_encoder(
    encoder: PromptEncoder, steps: int, lr: float = 3e-3, batch_size: int = 256, seed: int = 0
) -> dict[str, float]:
    """Text-only pretraining of the prompt encoder, before it is frozen for flow matching (as SD3 trains its
    transformer on frozen, separately pretrained text encoders).

    Linear heads on the token states predict, for every word of an object's noun phrase, that object's
    shape, colour, count and role (the side of the image a position prompt puts it on), from
    :func:`train.data.structure_targets`; the loss is the sum of the four cross-entropies, on the train
    split's prompts (all task types), AdamW at ``lr``.  The heads are dropped afterwards.  Returns the final
    loss and the per-field token accuracy on the test split's prompts (held-out bags included).
    """
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    dim = encoder.tok_emb.weight.shape[1]
    heads = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in STRUCTURE_FIELDS.values())

    def tokens(split):
        prompts = [p for ps in split_prompts(split).values() for p in ps]
        ids = encoder.tokenize([p.text for p in prompts])
        return ids, structure_targets(prompts, ids.shape[1]).to(ids.device)

    heads.to(encoder.tok_emb.weight.device)
    params = [*encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ids, targets = tokens("train")
    gen = torch.Generator().manual_seed(seed)
    was_training = encoder.training
    encoder.train()
    for _ in range(steps):
        pick = torch.randint(0, len(ids), (batch_size,), generator=gen).to(ids.device)
        states, _ = encoder(ids[pick])
        picked = targets[pick]
        loss = sum(
            torch.nn.functional.cross_entropy(head(states).flatten(0, 1), picked[..., j].flatten())
            for j, head in enumerate(heads)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    encoder.train(was_training)
    ids, targets = tokens("test")
    with torch.no_grad():
        states, _ = encoder(ids)
        out = {"loss": float(loss)}
        for j, (name, head) in enumerate(zip(STRUCTURE_FIELDS, heads, strict=True)):
            keep = targets[..., j] >= 0
            hit = head(states).argmax(-1)[keep] == targets[..., j][keep]
            out[f"test_accuracy/{name}"] = float(hit.float().mean())
    encoder.clear_cache()  # its cached encodings are stale
    return out


def mismatch_captions(batch: list[Prompt], share: float, rng: np.random.Generator) -> list[Prompt]:
    """``batch`` with each caption, with probability ``share``, replaced by a different training prompt of
    the same task type (the render stays): the label noise of web captions.  A different prompt is not
    always a different composition: "a square and a circle" for "a circle and a square", or "B right of A"
    for "A left of B", still fits the render.  Otherwise the conditional model learns a mixture of the right
    composition and others of its type, so its CFG-free samples miss the prompt more often than its drawing
    alone explains; guidance and reward fine-tuning sharpen the mixture towards the prompt."""
    pools = split_prompts("train")
    hit = rng.random(len(batch)) < share
    out = list(batch)
    for i in np.flatnonzero(hit).tolist():
        pool = [q for q in pools[batch[i].task] if q.text != batch[i].text]
        out[i] = pool[rng.integers(0, len(pool))]
    return out


def model_config(width: int | None = None, layers: int | None = None, head_dim: int = 32) -> EmbeddedConfig:
    """The embedded architecture with the transformer's ``width`` (``width / head_dim`` heads) and ``layers``
    changed; ``None`` keeps the shipped default's value.  The prompt encoder is unchanged."""
    tc = dict(TRANSFORMER_CONFIG)
    if width is not None:
        if width < head_dim or width % head_dim:
            raise ValueError(f"width: expected a positive multiple of {head_dim}, got {width}")
        tc.update(
            num_attention_heads=width // head_dim, attention_head_dim=head_dim, caption_projection_dim=width
        )
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers: expected >= 1, got {layers}")
        tc["num_layers"] = layers
    return EmbeddedConfig(transformer=tc)


def check_growth(blocks: int, layers: int) -> None:
    """:func:`grow_depth`'s condition: a model of ``blocks`` blocks grows to ``layers`` >= ``blocks`` (from
    at least 2 blocks: the last one stays last)."""
    if layers < blocks:
        raise ValueError(f"layers: expected >= the model's {blocks} blocks, got {layers}")
    if blocks < 2 and layers > blocks:
        raise ValueError(f"layers: growing needs a model of at least 2 blocks, this one has {blocks}")


def grow_depth(model: EmbeddedDefault, layers: int) -> EmbeddedDefault:
    """A deeper copy of ``model`` that computes exactly the same function.

    With ``L`` the model's depth: the last block (the one that drops the text stream) stays last; the other
    ``L - 1`` blocks fill the first ``layers - 1`` places in order, each repeated ``(layers - 1) // (L - 1)``
    times and the later ones once more to use up the remainder (4 -> 8 blocks: 0 0 1 1 2 2 2 3).  A repeat
    is a copy of its block with the two residual gates of both streams (the ``gate_msa`` and ``gate_mlp``
    rows of the adaLN-Zero modulation, DiT's zero init) set to zero, so it starts as the identity and
    training opens it."""
    tc = dict(model.config.transformer)
    old = tc["num_layers"]
    check_growth(old, layers)
    body, extra = divmod(layers - 1, max(old - 1, 1))
    order = [i for i in range(old - 1) for _ in range(body + (i >= old - 1 - extra))] + [old - 1]
    config = EmbeddedConfig(**{**asdict(model.config), "transformer": {**tc, "num_layers": layers}})
    grown = EmbeddedDefault(config)
    dim = tc["num_attention_heads"] * tc["attention_head_dim"]
    src = model.state_dict()
    state = {k: v.clone() for k, v in src.items() if not k.startswith("transformer.transformer_blocks.")}
    modulations = ("norm1.linear.", "norm1_context.linear.")  # adaLN-Zero: 6 chunks of `dim` rows
    for new, i in enumerate(order):
        prefix = f"transformer.transformer_blocks.{i}."
        repeat = new > 0 and order[new - 1] == i
        for key, value in src.items():
            if not key.startswith(prefix):
                continue
            name, value = key[len(prefix):], value.clone()
            if repeat and name.startswith(modulations):
                for gate in (2, 5):  # shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp
                    value[gate * dim:(gate + 1) * dim] = 0
            state[f"transformer.transformer_blocks.{new}.{name}"] = value
    grown.load_state_dict(state)
    return grown.train(model.training).requires_grad_(any(p.requires_grad for p in model.parameters()))


# ------------------------------------------------------------------------------- evaluation (the engine's)
class ModelPolicy(Policy):
    """The model being pretrained as the :class:`train.policy.Policy` the training loops sample and evaluate:
    its full weights (no LoRA adapters: ``adapter`` / ``adapters_disabled`` change nothing), ``weights`` (e.g.
    the weight EMA's ``average_parameters``) as its eval weights, the embedded default's diffusers scheduler
    (``models/embedded/scheduler_config.json``), ``test_prompts`` as the held-out list."""

    def __init__(
        self, model: EmbeddedDefault, test_prompts: list | None = None, weights=contextlib.nullcontext
    ):
        super().__init__(
            transformer=model.transformer,
            denoiser=models.as_denoiser(model.transformer),
            encoder=model.text_encoder,
            decode=lambda x0: x0.float().clamp(-1, 1),
            latent_shape=(model.latent_channels, model.sample_size, model.sample_size),
            device=model.device,
            dtype=model.dtype,
            train_prompts=[],
            test_prompts=list(test_prompts or []),
            prompt_text=lambda p: p.text if hasattr(p, "text") else str(p),
            scheduler_config=models.load_scheduler_config(DEFAULT_DIR),
        )
        self._weights = weights

    def refresh_parameters(self) -> None:  # no adapters to collect
        pass

    def adapter(self, name: str):
        return contextlib.nullcontext()

    def adapters_disabled(self):
        return contextlib.nullcontext()

    def eval_weights(self):
        return self._weights()


@torch.no_grad()
def evaluate(
    model: EmbeddedDefault,
    ec: PretrainEvalConfig | None = None,
    *,
    step: int = 0,
    out: str | os.PathLike | None = None,
    weights=contextlib.nullcontext,
) -> dict[str, dict[str, float]]:
    """Held-out GenEval-mini of ``model`` (its ``weights``) at each of ``ec.cfg_scales``, by the training
    loops' :class:`train.evaluation.Evaluator` on ``ec.per_task`` test prompts per task type ->
    ``{"cfg<scale>": {"score", <task>..., "score_partial"}}``.  Each scale's sample grid goes to
    ``<out>/eval_cfg<scale>/samples/iter_<step>.png``, with its record beside it (``.json``; ``out`` None:
    nowhere)."""
    ec = ec or PretrainEvalConfig()
    policy = ModelPolicy(model, test_prompts(ec.per_task), weights)
    results = {}
    model.text_encoder.clear_cache()  # encodings cached under other weights are stale
    with tempfile.TemporaryDirectory() if out is None else contextlib.nullcontext(out) as root:
        for scale in ec.cfg_scales:
            protocol = EvalConfig(solver=ec.solver, num_steps=ec.num_steps, cfg_scale=scale, batch=ec.batch)
            run_dir = Path(root) / f"eval_cfg{scale:g}"
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            evaluator = Evaluator(protocol, seed=ec.seed, reward=None)
            results[f"cfg{scale:g}"] = evaluator.run(policy, step, run_dir)
    model.text_encoder.clear_cache()
    return results


# ---------------------------------------------------------------------------------------------- setup
def build_model(cfg: PretrainConfig, *, pretrain_text: bool = True) -> tuple[EmbeddedDefault, dict | None]:
    """The model to train, seeded by ``--seed``: fresh (``--models.width`` / ``--models.layers``), or
    ``--models.init-from``'s weights (grown to ``--models.layers``); the prompt encoder pretrained on text
    (``--text.pretrain-steps``, whose result is returned; skipped with ``pretrain_text=False``, for a resume
    that loads the trained weights) and frozen (``--text.freeze``)."""
    torch.manual_seed(cfg.seed)
    mc = cfg.models
    if mc.init_from:
        start_from = EmbeddedDefault.from_pretrained(mc.init_from)
        if mc.layers and mc.layers != start_from.config.transformer["num_layers"]:
            start_from = grow_depth(start_from, mc.layers)
        model = EmbeddedDefault(start_from.config)
        model.load_state_dict(start_from.state_dict())
        model.requires_grad_(True)
    else:
        model = EmbeddedDefault(model_config(mc.width, mc.layers))
    text_result = None
    if cfg.text.pretrain_steps and pretrain_text:
        start = time.time()
        text = pretrain_text_encoder(model.text_encoder, cfg.text.pretrain_steps, cfg.text.pretrain_lr,
                                     seed=cfg.seed)
        text["minutes"] = round((time.time() - start) / 60, 2)
        text_result = {k: round(v, 5) for k, v in text.items()}
        print(json.dumps({"text_pretrain": text_result}), flush=True)
    if cfg.text.freeze or cfg.text.pretrain_steps:
        model.text_encoder.requires_grad_(False)
    return model, text_result


def training_batch(tc: TrainConfig, data_rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """One step's renders ``x0`` and their captions (``--train.caption-noise``, ``--train.prompt-dropout``),
    all drawn from ``data_rng``."""
    batch = sample_prompts(tc.batch_size, data_rng)
    x0 = render_batch(batch, data_rng)
    if tc.caption_noise:
        batch = mismatch_captions(batch, tc.caption_noise, data_rng)
    drop = data_rng.random(tc.batch_size) < tc.prompt_dropout
    return x0, ["" if d else p.text for p, d in zip(batch, drop, strict=True)]


# --------------------------------------------------------------------------------------------- resume
CHECKPOINT = "checkpoint.pt"
# what a resumed run may change: none of it touches the trajectory (the thread count: the rounding only)
_RESUME_FREE = ("out", "threads", "max_minutes", "resume")


def _trajectory_options(cfg: PretrainConfig) -> dict:
    return {
        name: value
        for name, value in leaf_values(cfg).items()
        if name not in _RESUME_FREE and not name.startswith(("log.", "eval."))
    }


def resume_state(cfg: PretrainConfig) -> dict | None:
    """With ``--resume``: the state in ``<out>/checkpoint.pt``, once its training options are checked against
    ``cfg``'s; else ``None`` (a fresh run is refused where that checkpoint exists: it would overwrite it).
    Raises :class:`ConfigError` naming the option (before any work)."""
    path = Path(cfg.out) / CHECKPOINT
    if not cfg.resume:
        if path.exists():
            raise ConfigError(
                f"--out: expected a directory without an unfinished run, got {cfg.out!r} with {CHECKPOINT}: "
                f"continue that run with --resume, or delete {str(path)!r} to start over"
            )
        return None
    if not path.is_file():
        raise ConfigError(
            f"--resume: expected a checkpoint at {str(path)!r} (written every --log.checkpoint-every steps "
            f"and when a run is stopped; a finished run removes it), got none"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same refusal
        raise ConfigError(f"--resume: expected a readable checkpoint at {str(path)!r}, got {e}") from None
    saved = state.get("options", {})
    for name, value in _trajectory_options(cfg).items():
        if saved.get(name) != value:
            raise ConfigError(
                f"{_opt(name)}: expected {saved.get(name)!r}, the value of the run being resumed ({path}), "
                f"got {value!r}"
            )
    return state


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ----------------------------------------------------------------------------------------------- loop
def pretrain(
    cfg: PretrainConfig, argv: list[str] | None = None, state: dict | None = None
) -> EmbeddedDefault:
    """Run ``cfg`` (validated) and save the model (the weight EMA's average, if any) to ``--out`` with its
    ``pretrain.json``; ``argv`` is recorded as its command.

    ``<out>/checkpoint.pt`` holds everything the run depends on (weights, AdamW, rate schedule, EMA, the data
    and noise generators, the step): written atomically every ``--log.checkpoint-every`` steps, when
    ``--max-minutes`` stops the run and on the first SIGINT / SIGTERM / SIGUSR1 (after the step in progress;
    then :class:`train.common.Interrupted` is raised).  ``--resume`` continues from it (``state``, as
    :func:`resume_state` returns it) bit for bit on the same machine and thread count.  A finished run removes
    it.  Non-finite weights are never checkpointed or saved: the run stops with an error instead."""
    if state is None:
        state = resume_state(cfg)
    model, text_result = build_model(cfg, pretrain_text=state is None)
    tc, out = cfg.train, Path(cfg.out)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the evaluation EMA of the NFT loop: d = min(decay, (1 + s) / (10 + s)); a frozen encoder needs none
    ema = EMA(trainable, max_decay=tc.ema) if tc.ema else None
    averaged = ema.average_parameters if ema else contextlib.nullcontext
    opt = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.99))

    def lr_factor(s: int) -> float:  # warm-up, constant, then a linear cool-down to 0 over `cooldown` steps
        return min(1.0, (s + 1) / tc.warmup, (tc.steps - s) / tc.cooldown if tc.cooldown else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    data_rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, ema_loss, elapsed, resumed = 0, None, 0.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema:
            ema.load_state_dict(state["ema"])
        data_rng.bit_generator.state = state["data_rng"]
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, ema_loss, elapsed = state["step"], state["loss_ema"], state["minutes"] * 60
        text_result, resumed = state["text_pretrain"], [*state["resumed"], state["step"]]
        print(f"resumed {str(out)!r} at step {step} of {tc.steps} ({CHECKPOINT})", flush=True)
    log_path = out / "pretrain_log.jsonl" if cfg.log.file else None
    if log_path:
        out.mkdir(parents=True, exist_ok=True)
        kept = ""
        if state is not None and log_path.exists():  # rows up to the checkpoint's step (a kill leaves more)
            rows = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
            kept = "".join(ln + "\n" for ln in rows if _row_step(ln) <= step)
        common.atomic_write_text(log_path, kept)
    begun = time.time()
    start = begun - elapsed

    def log(rec):
        print(json.dumps(rec), flush=True)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def require_finite(what: str) -> None:
        if not _all_finite([*model.state_dict().values(), *(ema.shadow if ema else [])]):
            raise RuntimeError(f"step {step}: non-finite weights; {what}")

    def save(directory: Path) -> None:
        require_finite(f"nothing saved to {str(directory)!r}")
        _save(model, directory, cfg, argv, step, start, text_result, resumed)

    def checkpoint() -> Path:
        require_finite(f"not checkpointed (the last checkpoint in {str(out)!r}, if any, is kept)")
        out.mkdir(parents=True, exist_ok=True)
        path = out / CHECKPOINT
        common.atomic_save(
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "ema": ema.state_dict() if ema else None,
                "data_rng": data_rng.bit_generator.state,
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "loss_ema": ema_loss,
                "minutes": (time.time() - start) / 60,
                "text_pretrain": text_result,
                "resumed": resumed,
                "options": _trajectory_options(cfg),
            },
            path,
        )
        return path

    with common.GracefulInterrupt(verbose=False) as stop:
        while step < tc.steps:
            if cfg.max_minutes and (time.time() - begun) / 60 > cfg.max_minutes:
                path = checkpoint()
                print(
                    f"stopping at step {step}: --max-minutes {cfg.max_minutes:g} reached; checkpoint "
                    f"{str(path)!r} (continue with the same command and --resume)",
                    flush=True,
                )
                break
            x0, prompts = training_batch(tc, data_rng)
            loss = flow_matching_loss(model, x0, prompts, gen, tc.time_sampling, tc.time_shift)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
            opt.step()
            sched.step()
            if ema:
                ema.update()
            step += 1
            ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
            minutes = round((time.time() - start) / 60, 2)
            if step % cfg.log.every == 0 or step == tc.steps:
                log({"step": step, "loss": round(loss.item(), 5), "loss_ema": round(ema_loss, 5),
                     "minutes": minutes})
            if cfg.log.save_every and step % cfg.log.save_every == 0:
                with averaged():
                    save(out / "snapshots" / f"step{step:06d}")
            if cfg.eval.every and step % cfg.eval.every == 0:
                model.eval()
                scores = evaluate(model, cfg.eval, step=step, out=out, weights=averaged)
                model.train()
                log({"step": step, "minutes": minutes,
                     **{k: {m: round(v, 4) for m, v in r.items()} for k, r in scores.items()}})
            if stop.requested:
                path = checkpoint()
                print(
                    f"{stop.signame}: checkpoint of step {step} written to {str(path)!r}; continue with the "
                    f"same command and --resume",
                    file=sys.stderr,
                    flush=True,
                )
                raise common.Interrupted(f"{stop.signame} at step {step}")
            if cfg.log.checkpoint_every and step % cfg.log.checkpoint_every == 0 and step < tc.steps:
                checkpoint()
    model.eval()
    if ema:  # the shipped weights are the average
        ema.copy_to()
    save(out)
    if step == tc.steps:  # finished: the saved model is the result
        (out / CHECKPOINT).unlink(missing_ok=True)
    return model


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line: dropped


# -------------------------------------------------------------------------------------------- records
# the options that fix the trajectory, always written into ``reproduce``; then those written when set
_REPRODUCE = ("train.steps", "train.batch_size", "train.lr", "train.warmup", "train.weight_decay",
              "train.grad_clip", "train.prompt_dropout", "train.time_sampling", "train.time_shift", "seed",
              "threads")
_REPRODUCE_IF_SET = ("train.cooldown", "models.init_from", "models.width", "models.layers", "train.ema",
                     "train.caption_noise", "text.freeze", "text.pretrain_steps")


def reproduce_command(cfg: PretrainConfig, steps: int | None = None) -> str:
    """The command that retraces ``cfg``'s trajectory (``steps`` in place of ``--train.steps``: without a
    cool-down a run stopped at step k equals a run of k steps)."""
    values = leaf_values(cfg)
    if steps is not None:
        values["train.steps"] = steps
    names = [*_REPRODUCE, *(n for n in _REPRODUCE_IF_SET if values[n])]
    if values["text.pretrain_steps"]:
        names.append("text.pretrain_lr")
    parts = ["python -m train.pretrain"]
    for name in names:
        value = values[name]
        if value is True:
            parts.append(_opt(name))
        else:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"{_opt(name)} {shlex.quote(shown)}")
    return " ".join(parts)


def _save(
    model, directory: Path, cfg: PretrainConfig, argv, step: int, start: float, text_result, resumed=()
) -> None:
    model.save(directory)
    record = {
        "command": " ".join(["python -m train.pretrain", *(shlex.quote(a) for a in argv or [])]),
        "reproduce": reproduce_command(cfg, step),
        "steps": step,
        "minutes": round((time.time() - start) / 60, 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": to_dict(cfg),
    }
    if text_result:
        record["text_pretrain"] = text_result
    if resumed:
        record["resumed_at_steps"] = list(resumed)  # ``command`` is the last process's
    tmp = directory / "pretrain.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, directory / "pretrain.json")


def main(argv: list[str] | None = None) -> int:
    """``python -m train.pretrain``: 0 when done; 2 (with ``error: ...``) for bad input, before any work; 3
    when stopped by a signal after writing its checkpoint (``--resume`` continues it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv)
        state = resume_state(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        pretrain(cfg, argv, state)
    except common.Interrupted:
        return common.INTERRUPTED_EXIT
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
