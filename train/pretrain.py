"""Pretrain the embedded default model on GenEval-mini renders with flow matching (math.md §0).

    python -m train.pretrain --steps 3000 --out models/embedded

Per step: a batch of train prompts (``train.data.sample_prompts``) and their renders ``x0``; 10% of the
prompts are replaced by ``""`` (so classifier-free guidance has an unconditional branch);
``t = shift * u / (1 + (shift - 1) * u)`` with ``u ~ U(0, 1)`` (the sampler's shifted schedule, shift 3),
``x_t = (1 - t) x0 + t noise``,
loss ``mean (v(x_t, 1000 t, c) - (noise - x0))^2``;
AdamW with a linear warm-up then a constant rate, so a run stopped at step k equals a run with ``--steps k``
(``--cooldown N`` decays it to 0 over the last N steps).  ``--time-sampling logit-normal`` draws ``u`` from
``sigmoid(N(0, 1))`` instead.  ``--ema D`` keeps an average of the weights; evaluations, snapshots and the
saved model use it.  ``--width`` / ``--layers`` change the transformer's size; ``--init-from DIR``
continues from a checkpoint with its architecture, or with ``--layers L`` grown to ``L`` blocks by
:func:`grow_depth` (copies of its blocks that start as the identity).  ``--freeze-text-encoder`` trains the
transformer only and keeps the prompt encoder at its initialisation (random, or ``--init-from``'s): trained
jointly, the encoder merges words the transformer has not yet learned to use ("left" and "right" end at
cosine 0.998; see the README), a frozen one keeps them apart (which alone did not make the transformer use
them).
``--text-pretrain-steps N`` first trains the prompt encoder alone on a text-only objective (each word's
object: shape, colour, count and the side a position prompt puts it on; :func:`pretrain_text_encoder`), then
freezes it, as SD3 trains on frozen pretrained text encoders: with it the transformer learns to place
objects by the relation words (``relation_response``), which it never did with an encoder trained only
through the denoising loss.  ``--caption-noise Q`` captions a share ``Q`` of the renders with another
prompt of the same task type (:func:`mismatch_captions`), the label noise of web data: CFG-free samples get
much worse than guided ones, as with SD3.5-M.  Everything is seeded; on a CPU with the same thread count a
run is reproducible bit for bit.

``evaluate`` samples the held-out test prompts with a plain Euler ODE on SD3's diffusers schedule
(CFG-free or with a guidance scale) and scores them with the GenEval-mini verifier; ``restart_scores`` finds
the noise levels at which the model decides its images; ``relation_response`` measures whether it places
objects by the relation words.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from engine.schedules import sd3_sigmas
from models.embedded import DEFAULT_DIR, TRANSFORMER_CONFIG, EmbeddedConfig, EmbeddedDefault, PromptEncoder
from models.lora import EMA
from train.data import (
    RELATIONS,
    STRUCTURE_FIELDS,
    Prompt,
    all_prompts,
    parse_prompt,
    render_batch,
    sample_prompts,
    split_prompts,
    structure_targets,
    test_prompts,
)
from train.rewards import GenEvalMini

__all__ = [
    "sigma_schedule",
    "sample",
    "sample_times",
    "evaluate",
    "restart_scores",
    "relation_offsets",
    "relation_response",
    "flow_matching_loss",
    "pretrain_text_encoder",
    "grow_depth",
    "pretrain",
    "main",
]


def sigma_schedule(steps: int, shift: float = 3.0) -> torch.Tensor:
    """math.md §0: the sampler's schedule, the engine's :func:`engine.schedules.sd3_sigmas` (SD3's diffusers
    scheduler, the embedded default's shipped config); ``[N + 1]``.  The shipped checkpoint's recorded
    evaluations (``pretrain.json``) were taken on the hand-made ``shift(1 - i/N)`` schedule used until
    2026-12."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    return sd3_sigmas(steps, shift)


@torch.no_grad()
def sample(
    model: EmbeddedDefault,
    prompts: list[str],
    generator: torch.Generator,
    steps: int = 10,
    shift: float = 3.0,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Euler ODE samples ``[B, 3, 32, 32]`` in [-1, 1]; ``cfg_scale`` 1 is CFG-free,
    otherwise ``v = v_uncond + cfg_scale * (v_cond - v_uncond)``."""
    b, dev = len(prompts), model.device
    x = torch.randn(b, 3, model.sample_size, model.sample_size, generator=generator).to(dev, model.dtype)
    cond = model.encode(list(prompts))
    if cfg_scale != 1.0:
        cond = type(cond).cat([cond, model.encode([""] * b)])
    sigmas = sigma_schedule(steps, shift).tolist()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        timestep = torch.full((b,), 1000.0 * sigma, device=dev)
        if cfg_scale == 1.0:
            v = model.denoiser(x, timestep, cond)
        else:
            both = model.denoiser(torch.cat([x, x]), torch.cat([timestep, timestep]), cond)
            v_cond, v_uncond = both.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        x = x + (sigma_next - sigma) * v
    return x.clamp(-1, 1)


@torch.no_grad()
def evaluate(
    model: EmbeddedDefault,
    cfg_scale: float = 1.0,
    n_per_task: int = 32,
    steps: int = 10,
    shift: float = 3.0,
    seed: int = 1234,
    batch_size: int = 64,
    verifier: GenEvalMini | None = None,
) -> dict[str, float]:
    """Held-out GenEval-mini: strict score (mean over task types) and per-task strict scores, plus the
    mean partial score as ``"partial"``."""
    verifier = verifier or GenEvalMini()
    prompts = test_prompts(n_per_task)
    gen = torch.Generator().manual_seed(seed)
    images = torch.cat(
        [
            sample(model, [p.text for p in prompts[i : i + batch_size]], gen, steps, shift, cfg_scale).cpu()
            for i in range(0, len(prompts), batch_size)
        ]
    )
    scores = verifier.score(images, prompts)
    return {**verifier.summarize(scores["strict"], prompts), "partial": float(scores["partial"].mean())}


@torch.no_grad()
def restart_scores(
    model: EmbeddedDefault,
    starts: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9),
    n_per_task: int = 32,
    steps: int = 20,
    shift: float = 3.0,
    seed: int = 1234,
) -> dict[float, float]:
    """Where the model decides its images: held-out renders noised to ``t = start`` (``x_t = (1 - t) x0 +
    t noise``), brought back to ``t = 0`` with the CFG-free Euler ODE over the part of the ``steps``-step
    schedule below ``start``, and scored like :func:`evaluate`.  A start from which the score is still ~1 is
    one the model denoises correctly; where it falls is where the model's own decisions begin.
    -> ``{start: strict score}``."""
    for t in starts:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"starts: expected values in (0, 1], got {t}")
    verifier = GenEvalMini()
    prompts = test_prompts(n_per_task)
    x0 = render_batch(prompts, seed).to(model.device, model.dtype)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    cond = model.encode([p.text for p in prompts])
    schedule = sigma_schedule(steps, shift).tolist()
    out = {}
    for start in starts:
        sigmas = [start] + [s for s in schedule if s < start]
        x = (1 - start) * x0 + start * noise
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            timestep = torch.full((len(x),), 1000.0 * sigma, device=x.device)
            x = x + (sigma_next - sigma) * model.denoiser(x, timestep, cond)
        strict = verifier.score(x.clamp(-1, 1).cpu(), prompts)["strict"]
        out[start] = verifier.summarize(strict, prompts)["score"]
    return out


def relation_offsets(
    images: torch.Tensor, prompts: list[Prompt | str], verifier: GenEvalMini | None = None
) -> dict[str, dict[str, float]]:
    """Where the first object of each position prompt lies relative to the second, per relation: the mean
    ``dx``/``dy`` (px, x to the right, y down) of ``objects[0]``'s centre minus ``objects[1]``'s, over the
    images of ``images [B, 3, H, W]`` in which the verifier finds exactly one of each (their number is ``n``).
    Rendered ground truth gives about -16 px in x for "left of", +16 for "right of", and the same in y for
    "above" and "below"."""
    if len(prompts) != len(images):
        raise ValueError(f"prompts: expected {len(images)} prompts (one per image), got {len(prompts)}")
    verifier = verifier or GenEvalMini()
    found: dict[str, list[tuple[float, float]]] = {r: [] for r in RELATIONS}
    for objects, p in zip(verifier.detect(images), prompts, strict=True):
        p = parse_prompt(p) if isinstance(p, str) else p
        if p.relation is None:
            raise ValueError(f"prompts: expected position prompts, got {p.text!r}")
        a, b = (verifier.matching(objects, spec) for spec in p.objects)
        if len(a) == 1 and len(b) == 1:
            found[p.relation].append((a[0].cx - b[0].cx, a[0].cy - b[0].cy))
    out = {}
    for rel, d in found.items():
        t = torch.tensor(d, dtype=torch.float64).view(-1, 2)
        mean = t.mean(0).tolist() if len(t) else [float("nan")] * 2
        out[rel] = {"dx": mean[0], "dy": mean[1], "n": len(t)}
    return out


@torch.no_grad()
def relation_response(
    model: EmbeddedDefault,
    n_pairs: int = 8,
    samples: int = 16,
    steps: int = 10,
    shift: float = 3.0,
    seed: int = 1234,
) -> dict:
    """Whether the model follows the relation words.  ``n_pairs`` object pairs of the position task (a
    seeded choice over both splits), each asked as "A left of B", "A right of B", "A above B" and "A below
    B", ``samples`` CFG-free Euler samples per prompt from the same noise for all four relations, then
    :func:`relation_offsets`.  Adds ``x_separation`` = dx(right of) - dx(left of) and ``y_separation`` =
    dy(below) - dy(above): about 32 px on rendered ground truth, about 0 for a model that draws the same
    layout whatever the relation (the shipped base model: see the README)."""
    if n_pairs < 1 or samples < 1:
        raise ValueError(f"n_pairs, samples: expected >= 1, got {n_pairs}, {samples}")
    pool = [p for p in all_prompts()["position"] if p.relation == RELATIONS[0]]
    pick = np.random.default_rng(seed).choice(len(pool), size=min(n_pairs, len(pool)), replace=False)
    pairs = [pool[i].objects for i in sorted(pick)]
    prompts, images = [], []
    for rel in RELATIONS:
        batch = [Prompt("position", objs, rel) for objs in pairs for _ in range(samples)]
        gen = torch.Generator().manual_seed(seed)  # the same noise for every relation
        images.append(sample(model, [p.text for p in batch], gen, steps, shift))
        prompts += batch
    out: dict = relation_offsets(torch.cat(images).cpu(), prompts)
    out["x_separation"] = out["right of"]["dx"] - out["left of"]["dx"]
    out["y_separation"] = out["below"]["dy"] - out["above"]["dy"]
    return out


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
    if layers < old:
        raise ValueError(f"layers: expected >= the model's {old} blocks, got {layers}")
    if old < 2 and layers > old:
        raise ValueError(f"layers: growing needs a model of at least 2 blocks, this one has {old}")
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


def pretrain(args: argparse.Namespace) -> EmbeddedDefault:
    torch.manual_seed(args.seed)
    if args.init_from:
        start_from = EmbeddedDefault.from_pretrained(args.init_from)
        if args.layers and args.layers != start_from.config.transformer["num_layers"]:
            try:
                start_from = grow_depth(start_from, args.layers)
            except ValueError as e:
                raise SystemExit(f"--{e} (--init-from {args.init_from})") from None
        model = EmbeddedDefault(start_from.config)
        model.load_state_dict(start_from.state_dict())
        model.requires_grad_(True)
    else:
        model = EmbeddedDefault(model_config(args.width, args.layers))
    if args.text_pretrain_steps:
        start = time.time()
        text = pretrain_text_encoder(model.text_encoder, args.text_pretrain_steps, args.text_pretrain_lr,
                                     seed=args.seed)
        text["minutes"] = round((time.time() - start) / 60, 2)
        args.text_pretrain_result = {k: round(v, 5) for k, v in text.items()}
        print(json.dumps({"text_pretrain": args.text_pretrain_result}), flush=True)
    if args.freeze_text_encoder or args.text_pretrain_steps:
        model.text_encoder.requires_grad_(False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the evaluation EMA of the NFT loop: d = min(decay, (1 + s) / (10 + s)), foreach updates; a frozen
    # prompt encoder needs no average
    ema = EMA(trainable, max_decay=args.ema) if args.ema else None
    averaged = ema.average_parameters if ema else contextlib.nullcontext
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))

    def lr_factor(s: int) -> float:  # warm-up, constant, then a linear cool-down to 0 over `cooldown` steps
        return min(1.0, (s + 1) / args.warmup, (args.steps - s) / args.cooldown if args.cooldown else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    data_rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    log_path = out / "pretrain_log.jsonl" if args.log_file else None
    if log_path:
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
    start, ema_loss, step = time.time(), None, 0

    def log(rec):
        print(json.dumps(rec), flush=True)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def run_eval(step):
        model.eval()
        model.text_encoder.clear_cache()
        rec = {"step": step, "minutes": round((time.time() - start) / 60, 2)}
        with averaged():
            for scale in args.eval_cfg:
                r = evaluate(model, cfg_scale=scale, n_per_task=args.eval_per_task)
                rec[f"cfg{scale:g}"] = {k: round(v, 4) for k, v in r.items()}
        model.text_encoder.clear_cache()
        model.train()
        log(rec)

    while step < args.steps:
        if args.max_minutes and (time.time() - start) / 60 > args.max_minutes:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            break
        batch = sample_prompts(args.batch_size, data_rng)
        x0 = render_batch(batch, data_rng)
        if args.caption_noise:
            batch = mismatch_captions(batch, args.caption_noise, data_rng)
        prompts = [p.text for p in batch]
        drop = data_rng.random(args.batch_size) < args.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop, strict=True)]
        loss = flow_matching_loss(model, x0, prompts, gen, args.time_sampling, args.time_shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        opt.step()
        sched.step()
        if ema:
            ema.update()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % args.log_every == 0 or step == args.steps:
            log(
                {
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "loss_ema": round(ema_loss, 5),
                    "minutes": round((time.time() - start) / 60, 2),
                }
            )
        if args.save_every and step % args.save_every == 0:
            with averaged():
                _save(model, out / "snapshots" / f"step{step:06d}", args, step, start)
        if args.eval_every and step % args.eval_every == 0:
            run_eval(step)
    model.eval()
    if ema:  # the shipped weights are the average
        ema.copy_to()
    _save(model, out, args, step, start)
    return model


def _save(model: EmbeddedDefault, directory: Path, args: argparse.Namespace, step: int, start: float):
    model.save(directory)
    command = "python -m train.pretrain " + " ".join(shlex.quote(a) for a in args.argv)
    # the flags that fix the trajectory; without --cooldown a run stopped at `step` equals this one
    reproduce = (
        f"python -m train.pretrain --steps {step} --batch-size {args.batch_size} --lr {args.lr:g} "
        f"--warmup {args.warmup} --weight-decay {args.weight_decay:g} --grad-clip {args.grad_clip:g} "
        f"--prompt-dropout {args.prompt_dropout:g} --time-sampling {args.time_sampling} "
        f"--time-shift {args.time_shift:g} --seed {args.seed} --threads {args.threads}"
        + (f" --cooldown {args.cooldown}" if args.cooldown else "")
        + (f" --init-from {shlex.quote(str(args.init_from))}" if args.init_from else "")
        + (f" --width {args.width}" if args.width else "")
        + (f" --layers {args.layers}" if args.layers else "")
        + (f" --ema {args.ema:g}" if args.ema else "")
        + (f" --caption-noise {args.caption_noise:g}" if args.caption_noise else "")
        + (" --freeze-text-encoder" if args.freeze_text_encoder else "")
        + (f" --text-pretrain-steps {args.text_pretrain_steps} --text-pretrain-lr {args.text_pretrain_lr:g}"
           if args.text_pretrain_steps else "")
    )
    minutes = round((time.time() - start) / 60, 2)
    record = {
        "command": command,
        "reproduce": reproduce,
        "steps": step,
        "minutes": minutes,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": {k: v for k, v in vars(args).items() if k not in ("argv", "text_pretrain_result")},
    }
    if getattr(args, "text_pretrain_result", None):
        record["text_pretrain"] = args.text_pretrain_result
    tmp = directory / "pretrain.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, directory / "pretrain.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate after warm-up")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument(
        "--cooldown",
        type=int,
        default=0,
        help="decay the rate linearly to 0 over the last N steps (0: constant to the end)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from the weights in this directory (a previous run's --out); fresh optimizer",
    )
    p.add_argument(
        "--width", type=int, default=None, help="transformer width, a multiple of 32 (default: 64)"
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="transformer blocks (default: 4); with --init-from, grow its model to this depth (grow_depth)",
    )
    p.add_argument(
        "--freeze-text-encoder",
        action="store_true",
        help="train the transformer only; the prompt encoder keeps its initial (random, --init-from) weights",
    )
    p.add_argument(
        "--text-pretrain-steps",
        type=int,
        default=0,
        help="first pretrain the prompt encoder on the text-only structure objective for N steps "
        "(batch 256), then freeze it (0: off)",
    )
    p.add_argument("--text-pretrain-lr", type=float, default=3e-3, help="AdamW rate of --text-pretrain-steps")
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="weight-EMA decay; evaluations and saves use the average (0: off)",
    )
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument(
        "--time-sampling",
        choices=("uniform", "logit-normal"),
        default="uniform",
        help="distribution of u before the shift",
    )
    p.add_argument("--time-shift", type=float, default=3.0, help="t = shift*u/(1+(shift-1)*u); 1: no shift")
    p.add_argument("--prompt-dropout", type=float, default=0.1, help="share of prompts replaced by ''")
    p.add_argument(
        "--caption-noise",
        type=float,
        default=0.0,
        help="share of renders captioned with another prompt of the same task type, as in web data",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_DIR), help="directory for default.safetensors/default.json")
    p.add_argument(
        "--max-minutes", type=float, default=0.0, help="wall-clock cap; stops early and saves (0: none)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--log-file", action="store_true", help="also write <out>/pretrain_log.jsonl")
    p.add_argument("--save-every", type=int, default=0, help="snapshots under <out>/snapshots (0: none)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out GenEval-mini every N steps (0: never)")
    p.add_argument("--eval-cfg", type=float, nargs="+", default=[1.0, 4.0], help="CFG scales to evaluate")
    p.add_argument("--eval-per-task", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> EmbeddedDefault:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch_size", "warmup", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.prompt_dropout < 1.0:
        raise SystemExit(f"--prompt-dropout: expected a value in [0, 1), got {args.prompt_dropout}")
    if not 0.0 <= args.caption_noise < 1.0:
        raise SystemExit(f"--caption-noise: expected a share in [0, 1), got {args.caption_noise}")
    if not 0.0 <= args.ema < 1.0:
        raise SystemExit(f"--ema: expected a decay in [0, 1), got {args.ema}")
    if args.init_from and args.width:
        raise SystemExit("--width: the architecture comes from --init-from; give one or the other")
    try:
        model_config(args.width, args.layers)
    except ValueError as e:
        raise SystemExit(f"--{e}") from None
    for name in ("lr", "text_pretrain_lr"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    if args.text_pretrain_steps < 0:
        raise SystemExit(f"--text-pretrain-steps: expected >= 0 (0: off), got {args.text_pretrain_steps}")
    if not args.max_minutes >= 0:
        raise SystemExit(f"--max-minutes: expected >= 0 (0: no cap), got {args.max_minutes}")
    args.argv = argv
    torch.set_num_threads(args.threads)
    return pretrain(args)


if __name__ == "__main__":
    main()
