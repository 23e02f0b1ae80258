"""SPO (arXiv 2406.04314, step-by-step preference optimisation), as math.md §6 defines it.
``python -m train.spo --help``.

Per iteration (RockeyCoss/SPO@27a86428 spo_training_and_inference/train_scripts/train_spo.py and
spo/custom_diffusers/multi_sample_pipeline.py):
  1. chains with the current ``default`` adapter (SD1.5: DDIM 20 steps, eta 1, CFG 5); steps ``i <
     --train.divert-start`` are sampled once and not trained;
  2. at every step ``i >= divert_start`` the sampler draws ``k`` candidates ``x_{t-1}`` from the shared
     ``x_t``; the step-aware scorer scores each candidate's ``x0_hat`` (the policy's one-step clean
     prediction from the candidate, one extra forward pass; the clean sample itself after the last step),
     conditioned on the candidate's noise level; ``w = argmax``, ``l = argmin``; the tuple ``(x_t, x_w,
     x_l)`` is kept when ``softmax(s_w, s_l)`` gives ``p_w - p_l > --train.threshold``; the chain
     continues from a uniformly random candidate (not the winner);
  3. the kept tuples, shuffled, in optimizer steps of ``batch_size x grad_accum``: D3PO's loss (math.md §6)
     on the single transition, ``-log sigmoid(beta (q_w - q_l))`` with ``q = log clamp(exp(logp -
     logp_ref), 1 - eps, 1 + eps)``, reference = the frozen pretrained model (adapters disabled);
  4. eval EMA, evaluation, sample grid, checkpoint (train.loop).

The scorer (``--scorer``): ``reward`` (the tiny preset's) ranks candidates by the run's reward on their
``x0_hat``, not step-aware; a path names a small ``(x0_hat, t, prompt)`` model of the reward's eventual score
(train.spo_scorer); ``none`` on the embedded default takes the shipped one for the GenEval-mini rewards (it
was fitted to the verifier's partial score) and, for any other ``--reward``, fits one to that reward in the
run directory first.  The reference's time-conditioned PickScore for SD1.5 is not
implemented (its CLIP with adaLN-modulated layers is a separate architecture); a ``--model`` run takes a
train.spo_scorer scorer whose shapes fit its latents and prompt embeddings.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import nvtx_range

from . import common
from .config import ConfigError
from .d3po import (
    D3POSampleConfig,
    D3POTrainer,
    d3po_loss,
    initial_noise,
    sample_step,
    step_noise,
    validate_sampler,
)
from .evaluation import EvalConfig
from .loop import RunConfig
from .loop import main as loop_main
from .policy import ModelConfig
from .policy_gradient import score_transitions
from .spo_scorer import predict_x0

__all__ = ["SPOConfig", "SPOTrainer", "spo_select", "main"]


# the shipped scorer (models/embedded/spo_scorer.*) was fitted to the GenEval-mini verifier's partial score
SHIPPED_REWARDS = ("geneval_mini", "geneval_mini_partial")
# --scorer reward: the run's reward on each candidate's decoded x0_hat, not step-aware (the engine's option:
# no time-conditioned model to train; apt for rewards that read x0_hat well, e.g. JPEG compressibility)
REWARD_SCORER = "reward"


def spo_select(scores: torch.Tensor, threshold: float):
    """math.md §6 candidate selection (RockeyCoss/SPO@27a86428 spo/preference_models/compare_funcs.py
    ``preference_score_compare``): ``scores [k, b]`` -> ``(win [b], lose [b], valid [b])``: the argmax and
    argmin candidate, kept when ``softmax(s_w, s_l)`` gives ``p_w - p_l > threshold``."""
    s, idx = torch.sort(scores, dim=0, descending=True)
    p = torch.stack([s[0], s[-1]]).softmax(dim=0)
    return idx[0], idx[-1], p[0] - p[1] > threshold


@dataclass
class SPOSampleConfig(D3POSampleConfig):
    images_per_prompt: int = field(default=1, metadata={"help": "chains per prompt"})
    rollout_batch: int = field(default=16, metadata={"help": "chains per rollout micro-batch"})
    num_candidates: int = field(default=4, metadata={"help": "k: candidates x_{t-1} drawn at each step"})


@dataclass
class SPOTrainConfig:
    """Defaults: RockeyCoss/SPO@27a86428 configs/basic_config.py and spo_sd-v1-5_4k-prompts_num-sam-4 (beta
    10, eps 0.1, threshold 0.3, divert start 4, lr 6e-5, AdamW wd 1e-4, grad clip 1.0, 10 tuples per step)."""

    beta: float = field(default=10.0, metadata={"help": "beta of -log sigmoid(beta (q_w - q_l))"})
    eps: float = field(default=0.1, metadata={"help": "ratio clamp: q = log clamp(ratio, 1 - eps, 1 + eps)"})
    threshold: float = field(default=0.3, metadata={"help": "keep a tuple when p_w - p_l > threshold"})
    divert_start: int = field(default=4, metadata={"help": "steps before this one are not branched/trained"})
    timestep_fraction: float = field(default=1.0, metadata={"help": "unused by SPO (every kept step trains)"})
    lr: float = field(default=6e-5, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    batch_size: int = field(default=10, metadata={"help": "training micro-batch (tuples)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    autocast: str = field(
        default="none", metadata={"help": "mixed precision of every forward: none, bfloat16, float16"}
    )


@dataclass
class SPOConfig(RunConfig):
    scorer: str | None = field(
        default=None,
        metadata={
            "help": "step-aware scorer (train.spo_scorer output), or 'reward': --reward on each candidate's "
            "x0_hat (logits = reward values); none on the embedded default: the shipped one for a "
            "GenEval-mini reward (models/embedded/spo_scorer.safetensors), else one trained into the run "
            "directory"
        },
    )
    sample: SPOSampleConfig = field(default_factory=SPOSampleConfig)
    train: SPOTrainConfig = field(default_factory=SPOTrainConfig)


def preset_tiny() -> SPOConfig:
    """The embedded default on a CPU: 32 chains per iteration, 10 ``cps`` SDE steps (Gaussian log-prob),
    branching from step 2 with k 4; candidates ranked by the GenEval-mini verifier's partial score on their
    one-step ``x0_hat`` (``--scorer reward``, reward ``geneval_mini_partial``; threshold 0: any strict win
    is kept, ties dropped); beta 10, eps 0.1, 16 tuples per optimizer step, lr 1e-3 (the reference's 6e-5 is
    too small for a CPU budget); 20 ODE steps for evaluation; one torch thread.  The shipped step-aware
    scorer (``--scorer models/embedded/spo_scorer.safetensors --reward geneval_mini --train.threshold 0.3``,
    pairwise accuracy ~0.6) makes the policy drift and collapse in a 13-minute run; ranked by the verifier,
    the held-out score rises (docs/results.md)."""
    cfg = SPOConfig()
    cfg.threads = 1
    cfg.scorer, cfg.reward = REWARD_SCORER, "geneval_mini_partial"
    sc, tc = cfg.sample, cfg.train
    sc.solver, sc.cps_log_prob, sc.num_steps = "cps", "gaussian", 10
    sc.prompts_per_iter, sc.images_per_prompt, sc.num_candidates = 32, 1, 4
    tc.divert_start, tc.lr, tc.batch_size, tc.grad_accum, tc.threshold = 2, 1e-3, 16, 1, 0.0
    cfg.eval.num_steps = 20
    return cfg


def preset_sd15() -> SPOConfig:
    """SPO's SD1.5 recipe (RockeyCoss/SPO@27a86428 configs/spo_sd-v1-5_4k-prompts_num-sam-4_10ep_bs10.py; pass
    an SD1.5-style directory with --model, its prompts with --prompts and a scorer with --scorer): DDIM 20
    steps, eta 1, CFG 5, 10 chains per iteration, k 4, divert start 4, threshold 0.3, beta 10, eps 0.1, 10
    tuples per optimizer step, lr 6e-5, LoRA r 4 (alpha 4), 512 px."""
    cfg = SPOConfig(preset="sd1.5", reward="jpeg_compressibility", max_iters=4000)
    cfg.models = ModelConfig(dtype="float16", lora_rank=4, lora_alpha=4.0, resolution=512)
    cfg.sample = SPOSampleConfig(
        solver="ddim",
        num_steps=20,
        eta=1.0,
        guidance_scale=5.0,
        prompts_per_iter=10,
        images_per_prompt=1,
        rollout_batch=10,
        forward_chunk=8,
        num_candidates=4,
    )
    cfg.train = SPOTrainConfig()
    cfg.eval = EvalConfig(every=100, num_steps=20, base_cfg_scale=5.0)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd1.5": preset_sd15}


def validate(cfg: SPOConfig) -> None:
    sc, tc = cfg.sample, cfg.train
    if sc.num_candidates < 2:
        raise ConfigError(f"--sample.num-candidates: expected an integer >= 2, got {sc.num_candidates}")
    if not 0 <= tc.divert_start < sc.num_steps:
        raise ConfigError(
            f"--train.divert-start: expected an integer in [0, --sample.num-steps ({sc.num_steps})), "
            f"got {tc.divert_start}"
        )
    if not 0 <= tc.threshold < 1:
        raise ConfigError(f"--train.threshold: expected a value in [0, 1), got {tc.threshold}")
    if cfg.scorer is not None and cfg.scorer != REWARD_SCORER:
        p = Path(cfg.scorer)
        if p.is_dir() and (p / "config.json").is_file() and not (p / "scorer.safetensors").is_file():
            raise ConfigError(
                f"--scorer: expected a train.spo_scorer scorer, got {cfg.scorer} (a model directory: the "
                f"reference's time-conditioned PickScore is not supported by this engine)"
            )
        if not (p.is_file() or (p / "scorer.safetensors").is_file()):
            raise ConfigError(
                f"--scorer: expected a train.spo_scorer scorer (.safetensors with its .json, or a directory "
                f"holding scorer.safetensors), got {cfg.scorer}"
            )
    embedded = cfg.preset == "tiny" and not cfg.model
    if not embedded and cfg.scorer is None:
        raise ConfigError(
            "--scorer: expected a step-aware scorer for a --model run (python -m train.spo_scorer makes "
            "one for the embedded default; the reference's time-conditioned PickScore is not supported) "
            "or 'reward' (the run's --reward on each candidate's x0_hat), got none"
        )
    validate_sampler(cfg)


@dataclass
class Tuples:
    """This rank's kept tuples of one iteration: ``x [T, ...]`` (the shared ``x_t``), ``win`` / ``lose [T,
    ...]`` (the candidates), ``steps [T]`` (schedule step of the transition), ``prompts`` (one per tuple)."""

    prompts: list
    x: torch.Tensor
    win: torch.Tensor
    lose: torch.Tensor
    steps: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)


class SPOTrainer(D3POTrainer):
    algo = "spo"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scorer = self._load_or_train_scorer()

    def _load_or_train_scorer(self):
        from .spo_scorer import SHIPPED, load_scorer, save_scorer, train_scorer

        cfg = self.cfg
        path = cfg.scorer
        if path == REWARD_SCORER:
            self.scorer_path = "the run's reward on x0_hat"
            return None
        if path is None and SHIPPED.is_file() and cfg.reward in SHIPPED_REWARDS:
            path = SHIPPED
        if path is None:
            own = Path(self.run_dir) / "scorer" / "scorer.safetensors"
            if own.is_file():  # a resumed run: the scorer it trained
                path = own
            else:
                why = (
                    "none shipped"
                    if not SHIPPED.is_file()
                    else f"the shipped one scores GenEval-mini, not {cfg.reward}"
                )
                self.say(
                    f"no --scorer and {why}: training one on --reward (python -m train.spo_scorer)",
                    flush=True,
                )
                model, metrics = train_scorer(
                    self.policy,
                    self.sched,
                    self.reward,
                    num_prompts=64,
                    images_per_prompt=4,
                    heldout_prompts=16,
                    epochs=4,
                    lr=3e-3,
                    seed=cfg.seed,
                    width=24,
                    pool=2,
                    say=self.say,
                )
                if self.dist.is_main:
                    save_scorer(model, own, {"command": "train.spo (no --scorer)", "heldout": metrics})
                return model.to(self.policy.device)
        model = load_scorer(path)
        shape = (model.config["channels"], model.config["size"], model.config["size"])
        if tuple(self.policy.latent_shape) != shape:
            raise ConfigError(
                f"--scorer: expected a scorer for latents {tuple(self.policy.latent_shape)}, got one "
                f"for {shape} ({path})"
            )
        emb = self.policy.encode([""]).prompt_embeds
        want = (model.config["prompt_len"], model.config["prompt_dim"])
        if tuple(emb.shape[1:]) != want:
            raise ConfigError(
                f"--scorer: expected a scorer for prompt embeddings {tuple(emb.shape[1:])}, got one "
                f"for {want} ({path})"
            )
        self.scorer_path = str(path)
        return model.to(self.policy.device)

    def describe(self) -> str:
        return f"{super().describe()} | scorer {getattr(self, 'scorer_path', 'trained in the run directory')}"

    @torch.no_grad()
    def score(self, prompts, x, step: int, cond=None, uncond=None) -> torch.Tensor:
        """The scorer's logits of states ``x`` entering step ``step`` (``N``: clean samples): it reads their
        ``x0_hat`` (math.md §6; ``cond``/``uncond``: the prompts' encodings, encoded here when omitted)."""
        t = torch.full((len(x),), self.sched.x0_time(step), device=x.device)
        if cond is None:
            cond = self.policy.encode(prompts)
            uncond = self.policy.encode([""] * len(x)) if self.sched.guidance_scale != 1.0 else None
        x0 = predict_x0(self.policy, self.sched, x, step, cond, uncond)
        if self.scorer is None:  # --scorer reward: the reward's values are the logits
            r, _ = self.reward(self.policy.decode(x0).cpu(), [self.policy.prompt_text(p) for p in prompts])
            return r.float().to(x.device)
        return self.scorer(x0, t, cond.prompt_embeds).float()

    def rollout_tuples(self, it: int):
        sc, tc, policy, sched = self.cfg.sample, self.cfg.train, self.policy, self.sched
        plan = self.iteration_plan(it)
        prompts, seeds = plan.local_prompts(), plan.local_seeds()
        k, dev = sc.num_candidates, policy.device
        kept = {"prompts": [], "x": [], "win": [], "lose": [], "steps": []}
        scores_log, valid_n, total_n, finals = [], 0, 0, []
        with nvtx_range("rollout"), policy.adapter("default"), torch.no_grad():
            for lo in self.progress(range(0, len(prompts), sc.rollout_batch), "rollout"):
                mb, sd = prompts[lo : lo + sc.rollout_batch], seeds[lo : lo + sc.rollout_batch]
                b = len(mb)
                sd_t = torch.tensor([int(s) for s in sd], dtype=torch.int64, device=dev)
                cond_k = policy.encode(mb * k)
                uncond_k = policy.encode([""] * (b * k)) if sched.guidance_scale != 1.0 else None
                x = initial_noise(policy, sd_t)
                pick = torch.Generator().manual_seed(common.derive_seed(self.cfg.seed, it, "spo-pick", lo))
                cand_seeds = torch.stack(
                    [torch.tensor([common.derive_seed(int(s), "cand", c) for s in sd]) for c in range(k)]
                ).to(dev)  # [k, b]
                for i in range(sched.num_steps):
                    if (
                        i < tc.divert_start or i not in sched.train_steps
                    ):  # a deterministic step: no branching
                        x, _ = sample_step(
                            policy,
                            sched,
                            x,
                            i,
                            cond_k[:b],
                            uncond_k[:b] if uncond_k is not None else None,
                            step_noise(policy, sd_t, i),
                        )
                        continue
                    xk = x.repeat(k, *([1] * (x.ndim - 1)))  # candidate-major [k b, ...]
                    cand, _ = sample_step(
                        policy, sched, xk, i, cond_k, uncond_k, step_noise(policy, cand_seeds.flatten(), i)
                    )
                    cand = cand.view(k, b, *x.shape[1:])
                    s = self.score(mb * k, cand.flatten(0, 1), i + 1, cond_k, uncond_k).view(k, b)
                    scores_log.append(s.flatten().cpu())
                    w, l_, valid = spo_select(s, tc.threshold)
                    ar = torch.arange(b, device=dev)
                    v = valid.nonzero().flatten()
                    kept["prompts"] += [mb[j] for j in v.tolist()]
                    kept["x"].append(x[v].cpu())
                    kept["win"].append(cand[w, ar][v].cpu())
                    kept["lose"].append(cand[l_, ar][v].cpu())
                    kept["steps"].append(torch.full((len(v),), i, dtype=torch.long))
                    valid_n, total_n = valid_n + len(v), total_n + b
                    nxt = torch.randint(0, k, (b,), generator=pick).to(dev)
                    x = cand[nxt, ar]
                finals.append(policy.decode(x))
        # the chains' final samples' rewards: logged only (SPO trains on the scorer's preferences)
        futures = [
            self.pool.submit(self.reward, im.cpu(), [policy.prompt_text(p) for p in mb])
            for im, mb in zip(
                finals,
                [prompts[lo : lo + sc.rollout_batch] for lo in range(0, len(prompts), sc.rollout_batch)],
                strict=True,
            )
        ]
        with nvtx_range("reward"):
            rewards, _ = self.await_rewards(futures)
        tup = Tuples(
            prompts=kept["prompts"],
            x=torch.cat(kept["x"]).to(dev),
            win=torch.cat(kept["win"]).to(dev),
            lose=torch.cat(kept["lose"]).to(dev),
            steps=torch.cat(kept["steps"]).to(dev),
        )
        stats = {"valid": valid_n, "total": total_n, "scores": torch.cat(scores_log)}
        return plan, tup, rewards, stats

    def tuple_loss(self, tup: Tuples, idx: torch.Tensor):
        tc = self.cfg.train
        n = len(idx)
        x = torch.cat([tup.x[idx], tup.x[idx]])
        prev = torch.cat([tup.win[idx], tup.lose[idx]])
        steps = torch.cat([tup.steps[idx], tup.steps[idx]])
        prompts = [tup.prompts[i] for i in idx.tolist()] * 2
        score = score_transitions(self.policy, self.sched, prompts, x, prev, steps, with_ref=True)
        return d3po_loss(
            score.log_prob[:n],
            score.log_prob_ref[:n],
            score.log_prob[n:],
            score.log_prob_ref[n:],
            beta=tc.beta,
            eps=tc.eps,
        )

    def train_iteration(self, it: int) -> tuple[dict, str]:
        cfg, tc, dist = self.cfg, self.cfg.train, self.dist
        plan, tup, rewards, stats = self.rollout_tuples(it)
        dev = self.policy.device
        counts = [int(c) for c in dist.all_gather_object(len(tup))]
        per = tc.batch_size * tc.grad_accum  # tuples per optimizer step per rank
        n_opt = max(math.ceil(c / per) for c in counts)
        g = common.iteration_generator(cfg.seed, it, f"train-{dist.rank}")
        order = torch.randperm(len(tup), generator=g).to(dev)
        loss_sum, count, acc, margin = 0.0, 0, 0.0, 0.0
        with self.train_phase():
            self.opt.zero_grad(set_to_none=True)
            for s in self.progress(range(n_opt), "train"):
                total = sum(max(0, min(per, c - s * per)) for c in counts)
                if total == 0:
                    continue
                mine = order[s * per : (s + 1) * per]
                n_mb = max(math.ceil(max(0, min(per, c - s * per)) / tc.batch_size) for c in counts)
                for mi in range(n_mb):
                    idx = mine[mi * tc.batch_size : (mi + 1) * tc.batch_size]
                    dummy = len(idx) == 0
                    if dummy:  # nothing left on this rank: a weight-0 pass keeps the collectives in step
                        if len(tup) == 0:
                            raise RuntimeError("spo: a rank with no kept tuple cannot pad a distributed step")
                        idx = order[:1]
                    weight = 0.0 if dummy else len(idx) / total * dist.world
                    with dist.grad_sync(mi == n_mb - 1):
                        loss, q_w, q_l = self.tuple_loss(tup, idx)
                        (loss * weight).backward()
                    if dummy:
                        continue
                    loss_sum += float(loss.detach())
                    acc += float((q_w > q_l).float().mean())
                    margin += float((q_w - q_l).detach().mean())
                    count += 1
                self.optimizer_step()
        r = self.to_global(plan, rewards.float())
        branched = [i for i in self.sched.train_steps if i >= tc.divert_start]
        keep = sum(counts) / max(1, len(plan.prompts) * len(branched))
        vals = {
            "train/reward_mean": r.mean(),
            "train/reward_std": r.std(unbiased=False),
            "train/kept_tuples": sum(counts),
            "train/kept_frac": keep,
            "train/scorer_mean": stats["scores"].mean(),
            "train/scorer_std": stats["scores"].std(),
            "train/loss": loss_sum / max(count, 1),
            "train/implicit_acc": acc / max(count, 1),
            "train/q_margin": margin / max(count, 1),
        }
        if count:
            summary = (
                f"reward {float(r.mean()):.3f} | kept {sum(counts)} tuples ({keep:.2f}) | "
                f"loss {vals['train/loss']:.4f} | q margin {vals['train/q_margin']:.2e}"
            )
        else:
            summary = f"reward {float(r.mean()):.3f} | no tuple passed the threshold: no update"
        return vals, summary


def main(argv=None) -> int:
    return loop_main(
        argv, config_cls=SPOConfig, presets=PRESETS, trainer_cls=SPOTrainer, validate=validate, doc=__doc__
    )


if __name__ == "__main__":
    sys.exit(main())
