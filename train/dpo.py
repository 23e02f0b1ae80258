"""Preference post-training on the shared loop: Diffusion-DPO, Diffusion-KTO and MaPO (math.md §6).
``python -m train.dpo --loss dpo|kto|mapo --help``.

Data (one of):
  * ``--data PATH``: a preference JSONL (pairs; for KTO pairs become labels, or a labels JSONL) or a
    Pick-a-Pic parquet directory (train.data.preference); images are encoded once through the run's latent
    cache;
  * nothing, on the embedded default: pairs made by the engine itself before training (K images per prompt
    from the frozen initial model, GenEval-mini's verifier, best vs worst, ties dropped), cached in the run
    directory (``pairs.pt``; a resume reads them back), so the bare command runs offline on a CPU;
  * ``--online``: pairs from fresh rollouts of the current policy each iteration; the reference of DPO and
    KTO is then the ``old`` adapter, set to the trained one every ``--train.ref-update-step`` optimizer steps
    (0, the default: never, flow_grpo's 1e7; 40 its OnlineDPO), as yifan123/flow_grpo@ac4c86e8
    scripts/train_sd3_dpo.py ``copy_learner_to_ref``.  flow_grpo samples with its reference adapter; with
    ``--train.ref-update-step 1`` the two coincide.

Per iteration (math.md §6): ``--train.grad-accum`` micro-batches of ``--train.batch-size`` pairs (KTO:
labelled images) per process, one optimizer step.  Each micro-batch draws ``--train.timestep-draws``
(noise, t) pairs, each with its own backward (flow_grpo: 39); winner and loser share noise and t (KTO: each
image its own).
Flow models: ``u = sigmoid(N(0, 1))``, ``i = floor(1000 u)``, ``sigma`` = the model's scheduler's training
sigma ``i`` (``shift(1 - i/1000)`` for SD3's), timestep ``1000 sigma``, target ``noise - x0``; epsilon models
(SD1.5): ``t ~ U{0..999}``, DDPM ``add_noise``, target ``noise``.  The reference of DPO and KTO is the frozen
initial model (LoRA adapters disabled; ``--online``: the ``old`` adapter); MaPO runs no reference forward.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kernels
from engine.profiling import nvtx_range

from . import common
from .config import ConfigError, to_dict
from .evaluation import EvalConfig
from .loop import RunConfig, Trainer, check_at_least_one, validate_run
from .loop import main as loop_main
from .policy import ModelConfig, resolve_solver
from .preference_losses import BETA_CONVENTION, kto_loss, paired_loss

LOSSES = ("dpo", "kto", "mapo")
# beta when --train.beta is not given: the references' values (math.md §6); the embedded default's tiny
# preset sets its own.
DEFAULT_BETA = {
    ("dpo", "epsilon"): 5000.0,
    ("dpo", "flow"): 100.0,
    ("kto", "epsilon"): 1000.0,
    ("kto", "flow"): 1000.0,
    ("mapo", "epsilon"): 0.1,
    ("mapo", "flow"): 0.1,
}


@dataclass
class PrefSampleConfig:
    """How pairs are made by the engine (no --data, or --online)."""

    solver: str = field(
        default="auto",
        metadata={
            "help": "pair rollouts: auto (dpm2 for flow models, ddim for UNets), dpm2, euler, flow-sde, "
            "cps, ddim"
        },
    )
    num_steps: int = field(default=10, metadata={"help": "sampler steps per rollout"})
    shift: float | None = field(
        default=None, metadata={"help": "sigma-schedule shift (none: the model's scheduler config)"}
    )
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level (flow-sde / cps)"})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta of ddim pair rollouts"})
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale at rollout (1 = CFG-free)"})
    prompts_per_iter: int = field(default=16, metadata={"help": "--online: prompts per iteration"})
    images_per_prompt: int = field(default=4, metadata={"help": "K: images per prompt; best vs worst"})
    rollout_batch: int = field(default=64, metadata={"help": "images per rollout micro-batch"})
    num_prompts: int = field(
        default=256,
        metadata={"help": "engine-made pairs (no --data): training prompts drawn (K images each)"},
    )
    heldout_prompts: int = field(
        default=64,
        metadata={
            "help": "engine-made held-out pairs from that many held-out prompts; with --data the last "
            "this-many records are held out (0: none)"
        },
    )


@dataclass
class PrefTrainConfig:
    beta: float | None = field(
        default=None,
        metadata={
            "help": f"DPO/KTO/MaPO beta (none: the reference's: DPO eps 5000, flow 100; KTO 1000; MaPO "
            f"0.1). DPO convention: {BETA_CONVENTION}; KTO: u = beta (g - z0), no 0.5; MaPO: the "
            f"weight of its ratio term"
        },
    )
    mapo_snr: float = field(default=0.5, metadata={"help": "MaPO's s in f(e) = s e / (exp(s e) - 1)"})
    kto_lambda_d: float = field(default=1.0, metadata={"help": "KTO weight of desirable images"})
    kto_lambda_u: float = field(default=1.0, metadata={"help": "KTO weight of undesirable images"})
    kto_desirable_ratio: float | None = field(
        default=None,
        metadata={"help": "KTO: probability a drawn image is desirable (none: as the data; reference 0.8)"},
    )
    ref_update_step: int | None = field(
        default=None,
        metadata={
            "help": "--online DPO/KTO: copy the trained adapter to the reference (old) adapter every "
            "this many optimizer steps (none or 0: never, flow_grpo's 1e7; 40: its OnlineDPO)"
        },
    )
    timestep_draws: int = field(
        default=1,
        metadata={"help": "(noise, t) draws per micro-batch, each its own backward (flow_grpo: 39)"},
    )
    empty_caption_prob: float = field(
        default=0.0,
        metadata={"help": "probability a training caption is replaced by '' (Diffusion-DPO: 0.2)"},
    )
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    batch_size: int = field(default=8, metadata={"help": "pairs (KTO: images) per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (= iteration)"})


@dataclass
class DPOConfig(RunConfig):
    loss: str = field(default="dpo", metadata={"help": "dpo (Diffusion-DPO), kto (Diffusion-KTO) or mapo"})
    data: str | None = field(
        default=None,
        metadata={
            "help": "preference JSONL (pairs or KTO labels) or Pick-a-Pic parquet directory (none on the "
            "embedded default: pairs made by the engine, cached in the run directory)"
        },
    )
    online: bool = field(default=False, metadata={"help": "pairs from fresh rollouts every iteration"})
    sample: PrefSampleConfig = field(default_factory=PrefSampleConfig)
    train: PrefTrainConfig = field(default_factory=PrefTrainConfig)


def preset_tiny() -> DPOConfig:
    """The embedded default on a CPU: 256 training prompts x 4 images from the frozen model (dpm2 10 steps)
    give ~190 engine-made pairs (GenEval-mini's verifier, best vs worst, ties dropped) and 32 held-out prompts
    ~28 held-out pairs; 100 iterations of 16 pairs (one optimizer step each; ~8 epochs), lr 1e-3, LoRA rank
    32, one torch thread; evaluation every 25 iterations; a 7-minute cap on training after the pairs are made.
    The bare command takes 3-10 minutes on two cores (0.3 s per iteration idle, 1-3.5 s under load 5-11;
    the pairs 1-3.5 minutes).

    Measured (2026-12-03, two cores shared with other jobs), held-out GenEval-mini score (192 prompts,
    CFG-free, eval EMA) from 0.359: DPO (beta 100, the flow reference's) 0.464 at 40 iterations, 0.521 at
    80, 0.557 at 100 (bare command); KTO (beta 1000) 0.406 at 40; MaPO (beta 0.1) 0.380 at 40, 0.411 at
    50, 0.370 at 100 and 0.365 at 400 (it fluctuates 0.36-0.46 and overfits the ~190 pairs in longer runs).
    beta is the reference's for each loss (--train.beta)."""
    cfg = DPOConfig()
    cfg.threads = 1
    cfg.max_minutes = 7.0
    cfg.max_iters = 100
    cfg.models.lora_rank, cfg.models.lora_alpha = 32, 32.0
    cfg.sample.num_prompts, cfg.sample.heldout_prompts = 256, 32
    cfg.train.lr, cfg.train.batch_size = 1e-3, 16
    cfg.eval.every = 25
    cfg.log.checkpoint_every = 25
    return cfg


def preset_sd35m() -> DPOConfig:
    """Flow Diffusion-DPO, yifan123/flow_grpo@ac4c86e8 config/dpo.py ``pickscore_sd3`` / ``geneval_sd3`` with
    scripts/train_sd3_dpo.py (pass the local SD3.5-M directory with --model): pairs from 24 SDE samples per
    prompt (noise level 0.7, 40 steps, CFG 4.5) of the reference, best vs worst; beta 100; 39 (noise, t) draws
    per batch of 24 pairs, one optimizer step; LoRA r32/a64, lr 3e-4, bf16; reference never updated (its
    ref_update_step 1e7; 40 for OnlineDPO); evaluation 40 steps, CFG 4.5."""
    cfg = DPOConfig(preset="sd3.5-m", reward="clip_score", max_iters=1000, online=True)
    cfg.models = ModelConfig(dtype="bfloat16", lora_rank=32, lora_alpha=64.0)
    cfg.sample = PrefSampleConfig(
        solver="flow-sde",
        num_steps=40,
        noise_level=0.7,
        guidance_scale=4.5,
        prompts_per_iter=24,
        images_per_prompt=24,
        rollout_batch=8,
    )
    cfg.train = PrefTrainConfig(beta=None, lr=3e-4, batch_size=24, timestep_draws=39, ref_update_step=0)
    cfg.eval = EvalConfig(every=40, solver="euler", num_steps=40, cfg_scale=4.5)
    return cfg


def preset_sd15() -> DPOConfig:
    """Diffusion-DPO on SD1.5, SalesforceAIResearch/DiffusionDPO@5233e759 train.py with its README's launch
    (pass an SD1.5-style directory with --model and Pick-a-Pic with --data): beta 5000 (KTO: 1000), AdamW
    weight decay 1e-2, lr 2.048e-5 (1e-8 x 2048, scale_lr), 2048 pairs per optimizer step (8 x 256
    accumulated), 20% empty captions, 512 px, fp16 forwards.  Deliberate differences: LoRA (rank 64) rather
    than the full UNet, and no 500-step warmup (the loop has no LR schedule)."""
    cfg = DPOConfig(preset="sd1.5", reward="clip_score", max_iters=2000)
    cfg.models = ModelConfig(dtype="float16", lora_rank=64, lora_alpha=64.0, resolution=512)
    cfg.sample = PrefSampleConfig(solver="ddim", num_steps=50, guidance_scale=7.5)
    cfg.train = PrefTrainConfig(
        lr=2.048e-5, weight_decay=1e-2, batch_size=8, grad_accum=256, empty_caption_prob=0.2
    )
    cfg.eval = EvalConfig(every=100, num_steps=50, cfg_scale=7.5)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd3.5-m": preset_sd35m, "sd1.5": preset_sd15}


# ------------------------------------------------------------------------------------------------------------
def validate(cfg: DPOConfig) -> None:
    """Every check that can fail fast runs before any work starts."""
    sc, tc = cfg.sample, cfg.train
    if cfg.loss not in LOSSES:
        raise ConfigError(f"--loss: expected dpo, kto or mapo, got {cfg.loss!r}")
    if sc.solver not in ("auto", "dpm2", "euler", "flow-sde", "cps", "ddim"):
        raise ConfigError(
            f"--sample.solver: expected auto, dpm2, euler, flow-sde, cps or ddim, got {sc.solver!r}"
        )
    check_at_least_one(
        [
            ("--sample.num-steps", sc.num_steps),
            ("--sample.prompts-per-iter", sc.prompts_per_iter),
            ("--sample.rollout-batch", sc.rollout_batch),
            ("--sample.num-prompts", sc.num_prompts),
            ("--train.batch-size", tc.batch_size),
            ("--train.grad-accum", tc.grad_accum),
            ("--train.timestep-draws", tc.timestep_draws),
        ]
    )
    if sc.images_per_prompt < 2:
        raise ConfigError(
            f"--sample.images-per-prompt: expected an integer >= 2 (a pair is the best and the worst of a "
            f"prompt's images), got {sc.images_per_prompt}"
        )
    if sc.heldout_prompts < 0:
        raise ConfigError(f"--sample.heldout-prompts: expected an integer >= 0, got {sc.heldout_prompts}")
    if tc.beta is not None and not tc.beta > 0:
        raise ConfigError(f"--train.beta: expected a value > 0 (or none: the reference's), got {tc.beta}")
    if not tc.mapo_snr > 0:
        raise ConfigError(f"--train.mapo-snr: expected a value > 0, got {tc.mapo_snr}")
    for name, val in (("--train.kto-lambda-d", tc.kto_lambda_d), ("--train.kto-lambda-u", tc.kto_lambda_u)):
        if not val > 0:
            raise ConfigError(f"{name}: expected a value > 0, got {val}")
    if tc.kto_desirable_ratio is not None and not 0 < tc.kto_desirable_ratio < 1:
        raise ConfigError(
            f"--train.kto-desirable-ratio: expected a value in (0, 1) (or none: as the data), got "
            f"{tc.kto_desirable_ratio}"
        )
    if not 0 <= tc.empty_caption_prob < 1:
        raise ConfigError(
            f"--train.empty-caption-prob: expected a value in [0, 1), got {tc.empty_caption_prob}"
        )
    if cfg.loss != "kto":
        changed = [
            n
            for n, v, d in (
                ("--train.kto-desirable-ratio", tc.kto_desirable_ratio, None),
                ("--train.kto-lambda-d", tc.kto_lambda_d, 1.0),
                ("--train.kto-lambda-u", tc.kto_lambda_u, 1.0),
            )
            if v != d
        ]
        if changed:
            raise ConfigError(
                f"{changed[0]}: a Diffusion-KTO option, expected --loss kto, got --loss {cfg.loss}"
            )
    if cfg.loss == "mapo":
        if tc.ref_update_step == PRESETS[cfg.preset]().train.ref_update_step:
            tc.ref_update_step = None  # the preset's reference schedule (sd3.5-m): MaPO has no reference
        if tc.ref_update_step is not None:
            raise ConfigError(
                f"--train.ref-update-step: MaPO has no reference model, expected none, "
                f"got {tc.ref_update_step}"
            )
    elif cfg.loss != "mapo" and tc.mapo_snr != 0.5:
        raise ConfigError(f"--train.mapo-snr: a MaPO option, expected --loss mapo, got --loss {cfg.loss}")
    if tc.ref_update_step is not None:
        if tc.ref_update_step < 0:
            raise ConfigError(
                f"--train.ref-update-step: expected an integer >= 0 (0: never), got {tc.ref_update_step}"
            )
        if not cfg.online:
            raise ConfigError(
                f"--train.ref-update-step: updates the reference of --online runs (offline the reference is "
                f"the frozen initial model), got {tc.ref_update_step} without --online"
            )
    # the model, prompts and reward first
    validate_run(cfg, unet_ok=True, prompts_from_data=cfg.data is not None)
    embedded = cfg.preset == "tiny" and not cfg.model
    if cfg.data is not None:
        if cfg.online:
            raise ConfigError(
                f"--online: pairs come from rollouts; expected no --data with it, got {cfg.data!r}"
            )
        p = Path(cfg.data)
        if not p.exists():
            raise FileNotFoundError(
                f"--data: expected a preference JSONL or a Pick-a-Pic parquet directory, got {cfg.data!r} "
                f"(no such file or directory)"
            )
        if p.is_dir() and not any(p.glob("*.parquet")):
            raise ConfigError(f"--data: expected *.parquet files in the directory {cfg.data!r}, found none")
        if p.is_file():
            from .data.preference import LabelRecord, read_preference_jsonl

            records = read_preference_jsonl(p, check_images=False)
            if records and isinstance(records[0], LabelRecord) and cfg.loss != "kto":
                raise ConfigError(
                    f"--data: --loss {cfg.loss} expects preference pairs, got {cfg.data!r}, a file of KTO "
                    f"labels (train on it with --loss kto)"
                )
            if embedded:
                check_embedded_prompts(cfg.data, [r.prompt for r in records])
    elif not embedded and not cfg.online:
        raise ConfigError(
            "--data: a --model run trains on a preference JSONL or a Pick-a-Pic parquet directory, or on "
            "--online rollouts; got neither (engine-made pairs need the embedded default's verifier)"
        )


def check_embedded_prompts(data: str, prompts: list[str]) -> None:
    """The embedded default's text encoder knows a closed vocabulary of at most ``max_length - 1`` words per
    prompt (models/embedded/vocab.py): refuse a ``--data`` file with any other prompt before any work, naming
    its first offending records (line numbers count from 1, one record per line)."""
    import json

    from models.embedded.model import DEFAULT_DIR
    from models.embedded.vocab import WORD_TO_ID, WORDS

    max_words = json.loads((Path(DEFAULT_DIR) / "default.json").read_text())["max_length"] - 1
    bad = []
    for n, prompt in enumerate(prompts, start=1):
        words = str(prompt).lower().split()
        unknown = [w for w in words if w not in WORD_TO_ID]
        if unknown or len(words) > max_words:
            why = f"unknown {unknown}" if unknown else f"{len(words)} words"
            bad.append(f"record {n} {prompt!r}: {why}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ConfigError(
            f"--data: the embedded default expects prompts of at most {max_words} words from its vocabulary "
            f"{list(WORDS[2:])}, got {len(bad)} other(s) in {data!r}: {'; '.join(bad[:3])}{more}"
        )


# --- noise and time (math.md §6) ----------------------------------------------------------------------------
def flow_train_sigmas(scheduler_config: dict | None, shift: float | None = None) -> torch.Tensor:
    """The model's ``FlowMatchEulerDiscreteScheduler`` training sigmas ``[T]`` (built from its config, no
    ``set_timesteps``: ``sigmas[i] = shift((T - i) / T)``), as flow_grpo's ``noise_scheduler.sigmas``;
    ``shift`` overrides a static shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(scheduler_config) if scheduler_config is not None else {"shift": 3.0}
    config.pop("_class_name", None)
    if shift is not None:
        config["shift"] = float(shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    return sched.sigmas[: sched.config.num_train_timesteps].float().clone()


def sample_flow_sigma(table: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """flow_grpo's law: ``u = sigmoid(normal)``, ``i = floor(T u)`` (``.long()``), ``sigma = table[i]``."""
    idx = (torch.sigmoid(normal) * len(table)).long().clamp_(max=len(table) - 1)
    return table[idx.to(table.device)]


def ddpm_alphas_cumprod(scheduler_config: dict | None) -> torch.Tensor:
    """An epsilon model's DDPM ``alphas_cumprod [T]`` from its scheduler config (DDPMScheduler.add_noise)."""
    from diffusers import DDPMScheduler

    from engine.schedules import SD15_SCHEDULER_CONFIG

    config = dict(scheduler_config) if scheduler_config is not None else dict(SD15_SCHEDULER_CONFIG)
    config.pop("_class_name", None)
    return DDPMScheduler.from_config(config).alphas_cumprod.float().clone()


# ------------------------------------------------------------------------------------------------------------
@dataclass
class PairSet:
    """Preference pairs in memory: prompt texts and clean latents (CPU, fp32)."""

    texts: list
    x_w: torch.Tensor
    x_l: torch.Tensor

    def __len__(self) -> int:
        return len(self.texts)

    def state(self) -> dict:
        return {"texts": list(self.texts), "x_w": self.x_w, "x_l": self.x_l}


@dataclass
class LabelSet:
    """Diffusion-KTO's unpaired labelled images."""

    texts: list
    x: torch.Tensor
    desirable: torch.Tensor

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_pairs(cls, pairs: PairSet) -> LabelSet:
        """Winner desirable, loser undesirable (train.data.preference.pairs_to_labels on tensors)."""
        n = len(pairs)
        return cls(
            list(pairs.texts) * 2,
            torch.cat([pairs.x_w, pairs.x_l]),
            torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]),
        )


def implicit_accuracy(err_w, err_l, ref_w, ref_l) -> float:
    """math.md §6.1: the fraction of pairs with ``delta = (err_w - ref_w) - (err_l - ref_l) < 0`` (the
    trained model prefers the winner more than the reference does), a tie counting one half."""
    delta = (err_w - ref_w) - (err_l - ref_l)
    return float((delta < 0).float().mean() + 0.5 * (delta == 0).float().mean())


class DPOTrainer(Trainer):
    algo = "dpo"

    def __init__(self, cfg, run_dir, policy, reward, evaluator, dist=None):
        super().__init__(cfg, run_dir, policy, reward, evaluator, dist)
        self.prediction = getattr(policy.denoiser, "prediction_type", "flow")
        self.solver = resolve_solver(
            cfg.sample.solver, self.prediction, flow_auto="dpm2", flow_fits="dpm2, euler, flow-sde or cps"
        )
        tc = cfg.train
        self.beta = tc.beta if tc.beta is not None else DEFAULT_BETA[(cfg.loss, self.prediction)]
        self.ref_update_step = tc.ref_update_step or 0
        self.ref_updates = 0
        if self.prediction == "epsilon":
            self.alphas_cumprod = ddpm_alphas_cumprod(policy.scheduler_config)
            self.num_train_timesteps = len(self.alphas_cumprod)
        else:
            self.sigma_table = flow_train_sigmas(policy.scheduler_config, cfg.sample.shift)
            self.num_train_timesteps = len(self.sigma_table)
        self.train_set = None  # PairSet or LabelSet (offline)
        self.heldout = None  # PairSet
        self.ref_forwards = 0  # reference forwards run by training (MaPO: always 0)

    def describe(self) -> str:
        conv = {"dpo": "-logsigmoid(-0.5 beta delta)", "kto": "u = beta (g - z0)", "mapo": "ratio weight"}
        src = "online" if self.cfg.online else (self.cfg.data or "engine-made pairs")
        return f"{self.cfg.loss} beta {self.beta:g} ({conv[self.cfg.loss]}) | data {src}"

    def extra_state(self) -> dict:
        return {"ref_updates": self.ref_updates}

    def load_extra_state(self, state: dict) -> None:
        self.ref_updates = int(state.get("ref_updates", 0))

    # --- data -----------------------------------------------------------------------------------------------
    def run(self, metrics) -> None:
        if not self.cfg.online and self.train_set is None:
            self.prepare_data()
        super().run(metrics)

    def prepare_data(self) -> None:
        """The offline data: ``--data`` (through train.data.preference and the run's latent cache), or pairs
        made by the engine and cached in ``<run>/pairs.pt``."""
        if self.cfg.data is not None:
            try:
                train, held = self.read_data()
            except ValueError as e:  # the data do not fit this model (e.g. prompt words, image sizes)
                raise common.TrainingStopped(f"--data {self.cfg.data}: {e}") from None
        else:
            train, held = self.engine_pairs()
        if self.cfg.loss == "kto" and isinstance(train, PairSet):
            train = LabelSet.from_pairs(train)
        self.train_set, self.heldout = train, held
        if not len(train):
            raise common.TrainingStopped("no training data: every engine-made pair was a tie")
        self.say(
            f"data: {len(train)} training {'labels' if isinstance(train, LabelSet) else 'pairs'}"
            f"{f', {len(held)} held-out pairs' if held is not None else ''}",
            flush=True,
        )

    def read_data(self):
        from .data import preference as pref

        path = Path(self.cfg.data)
        if path.is_dir():
            records = pref.load_pickapic(path, self.run_dir / "pickapic_images")
        else:
            records = pref.read_preference_jsonl(path)
        if not records:
            raise ConfigError(f"--data: expected at least one record in {self.cfg.data!r}, found none")
        cache = pref.LatentCache(self.run_dir / "latent_cache", self.policy.vae_fingerprint)
        labels = isinstance(records[0], pref.LabelRecord)
        if labels and self.cfg.loss != "kto":
            raise ConfigError(
                f"--data: {self.cfg.data!r} holds KTO labels; --loss {self.cfg.loss} expects pairs"
            )
        nh = (
            self.cfg.sample.heldout_prompts
            if not labels and len(records) > self.cfg.sample.heldout_prompts
            else 0
        )
        train_r, held_r = (
            (records[: len(records) - nh], records[len(records) - nh :]) if nh else (records, [])
        )

        def lat(paths):
            return pref.preference_latents(self.policy, list(paths), cache).float().cpu()

        if labels:
            x = lat(r.image for r in train_r)
            return LabelSet(
                [r.prompt for r in train_r], x, torch.tensor([r.desirable for r in train_r], dtype=torch.bool)
            ), None
        train = PairSet(
            [r.prompt for r in train_r], lat(r.winner for r in train_r), lat(r.loser for r in train_r)
        )
        held = None
        if held_r:
            held = PairSet(
                [r.prompt for r in held_r], lat(r.winner for r in held_r), lat(r.loser for r in held_r)
            )
        return train, held

    def engine_pairs(self):
        """Pairs the engine makes from its own rollouts with the frozen initial model (adapters disabled):
        ``--sample.num-prompts`` training prompts and ``--sample.heldout-prompts`` held-out ones, K images
        each, best vs worst by the reward, ties dropped; cached in ``<run>/pairs.pt`` (a resume and a rank
        read them back)."""
        sc = self.cfg.sample
        path = self.run_dir / "pairs.pt"
        key = repr(
            {
                "seed": self.cfg.seed,
                "sample": to_dict(sc),
                "reward": self.cfg.reward,
                "tasks": list(self.cfg.tasks),
            }
        )
        if path.exists():
            state = torch.load(path, weights_only=True)
            if state.get("key") == key:
                held = PairSet(**state["heldout"]) if state.get("heldout") else None
                return PairSet(**state["train"]), held
        prompts = self.policy.sample_train_prompts(sc.num_prompts, common.derive_seed(self.cfg.seed, "pairs"))
        held = None
        with self.policy.adapters_disabled():
            train, stats = self.make_pairs(prompts, tag="pairs")
            if sc.heldout_prompts:
                held, _ = self.make_pairs(self.policy.test_prompts[: sc.heldout_prompts], tag="heldout")
        self.say(
            f"engine-made pairs: {len(train)} of {len(prompts)} prompts (reward mean "
            f"{stats['reward_mean']:.3f}; ties dropped)",
            flush=True,
        )
        if self.dist.is_main:
            state = {
                "key": key,
                "train": train.state(),
                "heldout": held.state() if held is not None else None,
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            common.atomic_save(state, path)
        return train, held

    @torch.no_grad()
    def make_pairs(self, prompts: list, *, tag: str, it: int = 0):
        """K rollouts per prompt with the active adapter (this rank's share of the global batch), rewards,
        best vs worst per prompt (argmax / argmin), ties dropped
        -> ``(PairSet of every rank's pairs, stats)``.
        Seeds are keyed by (seed, tag, it, global image index): the same pairs whatever the world size."""
        sc, dist = self.cfg.sample, self.dist
        k = sc.images_per_prompt
        n = len(prompts) * k
        world, rank = dist.world, dist.rank
        pad = (-len(prompts)) % world
        prompts_p = list(prompts) + list(prompts[:pad]) if pad else list(prompts)
        per = len(prompts_p) // world
        mine = list(range(rank * per, (rank + 1) * per))
        local_prompts = [prompts_p[i] for i in mine for _ in range(k)]
        seeds = [common.derive_seed(self.cfg.seed, tag, it, i * k + j) for i in mine for j in range(k)]
        x0s, futures = [], []
        for lo in range(0, len(local_prompts), sc.rollout_batch):
            mb = local_prompts[lo : lo + sc.rollout_batch]
            x0 = self.policy.sample(
                mb,
                seeds[lo : lo + sc.rollout_batch],
                solver=self.solver,
                num_steps=sc.num_steps,
                shift=sc.shift,
                noise_level=sc.noise_level,
                guidance_scale=sc.guidance_scale,
                eta=sc.eta,
            )
            x0s.append(x0.float())
            futures.append(self.pool.submit(self.reward, self.policy.decode(x0).cpu(), mb))
        rewards, _ = self.await_rewards(futures)
        x0 = torch.cat(x0s)
        if world > 1:
            x0 = dist.all_gather(x0.contiguous()).flatten(0, 1)
            rewards = dist.all_gather(rewards.to(x0.device)).flatten(0, 1).cpu()
        x0 = x0.cpu()[:n]
        r = rewards.cpu()[:n].view(len(prompts), k)
        xs = x0.view(len(prompts), k, *x0.shape[1:])
        best, worst = r.argmax(1), r.argmin(1)
        keep = (r.max(1).values > r.min(1).values).nonzero().flatten().tolist()
        texts = [self.policy.prompt_text(prompts[i]) for i in keep]
        x_w = torch.stack([xs[i, best[i]] for i in keep]) if keep else xs[:0, 0]
        x_l = torch.stack([xs[i, worst[i]] for i in keep]) if keep else xs[:0, 0]
        return PairSet(texts, x_w, x_l), {"reward_mean": float(r.mean()), "pairs": len(keep)}

    # --- one iteration --------------------------------------------------------------------------------------
    def train_iteration(self, it: int) -> tuple[dict, str]:
        cfg = self.cfg
        extra = {}
        data = self.train_set
        ref_ctx = self.policy.adapters_disabled
        if cfg.online:
            if (
                cfg.loss != "mapo"
                and self.ref_update_step
                and self.opt_step // self.ref_update_step > self.ref_updates
            ):
                self.policy.ema_old(0.0)  # old <- default
                self.ref_updates = self.opt_step // self.ref_update_step
            prompts = self.policy.sample_train_prompts(
                cfg.sample.prompts_per_iter, common.derive_seed(cfg.seed, it, "prompts")
            )
            with nvtx_range("rollout"), self.policy.adapter("default"):
                data, stats = self.make_pairs(prompts, tag="online", it=it)
            extra = {"train/reward_mean": stats["reward_mean"], "train/pairs": stats["pairs"]}
            if cfg.loss == "kto":
                data = LabelSet.from_pairs(data)
            ref_ctx = lambda: self.policy.adapter("old")  # noqa: E731
            if not len(data):
                return {**extra, "train/loss": 0.0}, "no pairs (all ties)"
        with self.train_phase():
            stats = self.train_on(it, data, ref_ctx)
        vals = {**extra, **{f"train/{k}": v for k, v in stats.items()}, "train/beta": self.beta}
        summary = f"loss {stats['loss']:.4f} | implicit acc {stats['implicit_acc']:.3f}"
        if "margin" in stats:
            summary += f" | margin {stats['margin']:.3f}"
        return vals, summary

    def draw_batch(self, it: int, n_data: int, total: int) -> torch.Tensor:
        """``total`` data indices for iteration ``it``: consecutive slices of per-epoch permutations keyed
        by (seed, epoch), so a resumed run draws the same; KTO with ``--train.kto-desirable-ratio`` draws
        each slot desirable with that probability, then an image of that label."""
        tc = self.cfg.train
        if (
            self.cfg.loss == "kto"
            and tc.kto_desirable_ratio is not None
            and isinstance(self.train_set, LabelSet)
        ):
            g = common.iteration_generator(self.cfg.seed, it, "kto-draw")
            des = self.train_set.desirable
            pos, neg = des.nonzero().flatten(), (~des).nonzero().flatten()
            if len(pos) and len(neg):
                want = torch.rand(total, generator=g) < tc.kto_desirable_ratio
                ip = pos[torch.randint(len(pos), (total,), generator=g)]
                ineg = neg[torch.randint(len(neg), (total,), generator=g)]
                return torch.where(want, ip, ineg)
        start = (it - 1) * total
        out = []
        while len(out) < total:
            epoch, off = divmod(start + len(out), n_data)
            perm = torch.randperm(n_data, generator=common.iteration_generator(self.cfg.seed, epoch, "epoch"))
            out.extend(perm[off : off + total - len(out)].tolist())
        return torch.tensor(out)

    def captions(self, it: int, texts: list, gidx: list) -> list:
        p = self.cfg.train.empty_caption_prob
        if not p:
            return list(texts)
        g = [common.iteration_generator(self.cfg.seed, it, f"caption/{i}") for i in gidx]
        return ["" if float(torch.rand(1, generator=gi)) < p else t for t, gi in zip(texts, g, strict=True)]

    def noise_and_time(self, it: int, gidx: list, shape, draw: int, dev):
        """Per global slot ``i``: noise ``[b, ...]`` and the time (flow: sigma; eps: DDPM step), keyed by
        (seed, it, i, draw): the same numbers whatever the batch split or world size."""
        noises, times = [], []
        for i in gidx:
            g = common.iteration_generator(self.cfg.seed, it, f"noise/{i}/{draw}")
            noises.append(torch.randn(shape, generator=g))
            if self.prediction == "epsilon":
                times.append(torch.randint(0, self.num_train_timesteps, (1,), generator=g))
            else:
                times.append(torch.randn(1, generator=g))
        noise = torch.stack(noises).to(dev)
        t = torch.cat(times)
        if self.prediction == "epsilon":
            return noise, t.to(dev)
        return noise, sample_flow_sigma(self.sigma_table, t).to(dev)

    def noisy(self, x0, noise, t):
        """-> ``(x_t, model timestep, target)``: flow ``x_t = (1 - s) x0 + s noise``, timestep ``1000 s``,
        target ``noise - x0``; eps DDPM ``add_noise``, timestep ``t``, target ``noise``."""
        if self.prediction == "epsilon":
            ab = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
            return ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t.float(), noise
        return kernels.interpolate(x0, noise, t), 1000.0 * t, noise - x0

    def train_on(self, it: int, data, ref_ctx) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches of ``batch_size`` items per process; every
        (micro-batch, draw) has its own backward, weighted ``1 / (grad_accum draws)``."""
        tc, dist, pol = self.cfg.train, self.dist, self.policy
        dev = pol.device
        b, world = tc.batch_size, dist.world
        total = b * world * tc.grad_accum
        idx = self.draw_batch(it, len(data), total)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        self.opt.zero_grad(set_to_none=True)
        for m in range(tc.grad_accum):
            gslots = list(range(m * b * world + dist.rank * b, m * b * world + (dist.rank + 1) * b))
            rows = idx[gslots]
            texts = self.captions(it, [data.texts[i] for i in rows.tolist()], gslots)
            for d in range(tc.timestep_draws):
                last = m == tc.grad_accum - 1 and d == tc.timestep_draws - 1
                weight = 1.0 / (tc.grad_accum * tc.timestep_draws)
                if isinstance(data, LabelSet):
                    loss, stats = self.kto_step(it, data, rows, texts, gslots, d, ref_ctx, last)
                else:
                    loss, stats = self.paired_step(it, data, rows, texts, gslots, d, ref_ctx, last, weight)
                if isinstance(data, LabelSet):
                    with dist.grad_sync(last):
                        (loss * weight).backward()
                for k, v in {"loss": loss.detach(), **stats}.items():
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32).to(dev)
                count += 1
        self.optimizer_step()
        return {k: float(v) / count for k, v in sums.items()}

    def paired_step(self, it, data: PairSet, rows, texts, gslots, d, ref_ctx, last, weight):
        pol, dev = self.policy, self.policy.device
        x_w, x_l = data.x_w[rows].to(dev), data.x_l[rows].to(dev)
        noise, t = self.noise_and_time(it, gslots, x_w.shape[1:], d, dev)
        if self.prediction == "epsilon":
            xt_w, ts, tgt_w = self.noisy(x_w, noise, t)
            xt_l, _, tgt_l = self.noisy(x_l, noise, t)
        else:
            xt_w, xt_l = kernels.paired_interpolate(x_w, x_l, noise, t)
            ts, tgt_w, tgt_l = 1000.0 * t, noise - x_w, noise - x_l
        x_in = torch.cat([xt_w, xt_l]).to(pol.dtype)
        ts2 = torch.cat([ts, ts])
        cond = pol.encode(list(texts) * 2)
        ref_w = ref_l = None
        if self.cfg.loss == "dpo":
            with torch.no_grad(), ref_ctx():
                ref = pol.denoiser(x_in, ts2, cond)
            self.ref_forwards += 1
            ref_w, ref_l = ref.chunk(2)
        with self.dist.grad_sync(last), pol.adapter("default"):
            pred = pol.train_denoiser(x_in, ts2, cond)
            pred_w, pred_l = pred.chunk(2)
            loss, _, _, stats = paired_loss(
                pred_w,
                pred_l,
                tgt_w,
                tgt_l,
                ref_w=ref_w,
                ref_l=ref_l,
                form=self.cfg.loss,
                beta=self.beta,
                snr=self.cfg.train.mapo_snr,
                num_train_timesteps=self.num_train_timesteps,
            )
            (loss * weight).backward()
        return loss, stats

    def kto_step(self, it, data: LabelSet, rows, texts, gslots, d, ref_ctx, last):
        pol, dev = self.policy, self.policy.device
        x0 = data.x[rows].to(dev)
        noise, t = self.noise_and_time(it, gslots, x0.shape[1:], d, dev)
        xt, ts, target = self.noisy(x0, noise, t)
        xt = xt.to(pol.dtype)
        cond = pol.encode(list(texts))
        with torch.no_grad(), ref_ctx():
            ref = pol.denoiser(xt, ts, cond)
        self.ref_forwards += 1
        from .preference_losses import per_sample_error

        ref_err = per_sample_error(ref, target)
        with self.dist.grad_sync(last), pol.adapter("default"):
            pred = pol.train_denoiser(xt, ts, cond)
            err = per_sample_error(pred, target)
        tc = self.cfg.train
        global_mean = (lambda x: self.dist.all_gather(x).mean(0)) if self.dist.enabled else None
        return kto_loss(
            err,
            ref_err,
            data.desirable[rows].to(dev),
            beta=self.beta,
            lambda_d=tc.kto_lambda_d,
            lambda_u=tc.kto_lambda_u,
            global_mean=global_mean,
        )

    # --- held-out preference accuracy -----------------------------------------------------------------------
    @torch.no_grad()
    def heldout_errors(self, draws: int = 4, *, reference: bool = False):
        """Per held-out pair, the errors of the trained adapter (with ``reference`` also of the reference:
        adapters disabled) averaged over ``draws`` fixed (noise, t) draws -> ``(err_w, err_l)`` or
        ``(err_w, err_l, ref_w, ref_l)``, each ``[P]`` on the CPU."""
        data, pol = self.heldout, self.policy
        dev = pol.device
        out = torch.zeros(4 if reference else 2, len(data))
        b = self.cfg.train.batch_size
        from .preference_losses import per_sample_error

        for lo in range(0, len(data), b):
            gslots = list(range(lo, min(lo + b, len(data))))
            x_w, x_l = data.x_w[gslots].to(dev), data.x_l[gslots].to(dev)
            cond = pol.encode([data.texts[i] for i in gslots] * 2)
            for d in range(draws):
                noise, t = self.noise_and_time(-1, gslots, x_w.shape[1:], d, dev)
                xt_w, ts, tgt_w = self.noisy(x_w, noise, t)
                xt_l, _, tgt_l = self.noisy(x_l, noise, t)
                x_in, ts2 = torch.cat([xt_w, xt_l]).to(pol.dtype), torch.cat([ts, ts])
                ctxs = [lambda: pol.adapter("default")] + ([pol.adapters_disabled] if reference else [])
                for k, ctx in enumerate(ctxs):
                    with ctx():
                        pw, pl = pol.denoiser(x_in, ts2, cond).chunk(2)
                    out[2 * k, gslots] += per_sample_error(pw, tgt_w).cpu() / draws
                    out[2 * k + 1, gslots] += per_sample_error(pl, tgt_l).cpu() / draws
        return tuple(out)

    def heldout_accuracy(self, draws: int = 4) -> dict:
        """On the held-out pairs, with the trained adapter: ``pref_acc`` = the fraction of pairs whose
        winner the model fits better than the loser (``err_w < err_l``, errors averaged over ``draws`` fixed
        (noise, t) draws) and ``pref_margin`` = the mean of ``err_l - err_w``: ref-free, so comparable across
        DPO, KTO and MaPO.  DPO and KTO also log the implicit reward accuracy on them (``implicit_acc``:
        ``delta = (err_w - ref_w) - (err_l - ref_l) < 0``, a tie counting one half, so that the initial
        model scores 0.5); MaPO, which holds no reference, does not."""
        ref = self.cfg.loss != "mapo"
        errs = self.heldout_errors(draws, reference=ref)
        ew, el = errs[0], errs[1]
        res = {"pref_acc": float((ew < el).float().mean()), "pref_margin": float((el - ew).mean())}
        if ref:
            res["implicit_acc"] = implicit_accuracy(*errs)
        return res

    def evaluate(self, it, clock, metrics, base=False, note=None) -> dict:
        vals = super().evaluate(it, clock, metrics, base=base, note=note)
        if self.heldout is not None and len(self.heldout):
            res = self.heldout_accuracy()
            metrics.log(it, clock(), {f"eval/{k}": v for k, v in res.items()})
            self.say(
                f"eval {it:4d} | held-out pairs {len(self.heldout)}: preference accuracy "
                f"{res['pref_acc']:.3f} | margin {res['pref_margin']:.2e}",
                flush=True,
            )
        return vals


def main(argv=None) -> int:
    return loop_main(
        argv, config_cls=DPOConfig, presets=PRESETS, trainer_cls=DPOTrainer, validate=validate, doc=__doc__
    )


if __name__ == "__main__":
    sys.exit(main())
