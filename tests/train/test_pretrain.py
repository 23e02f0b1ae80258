"""train.pretrain on the project's dataclass CLI: the training is the pre-refactor training, bit for bit.

Two checks of a few steps of tiny runs (width 32 or the 8-block model grown to 9 blocks, batch 4; that model
was the shipped default at 38ceb80 and is ``models/embedded/stage3`` since the default has 12 blocks):

* in one process, :func:`_old_pretrain` -- a transcription of the loop of ``train/pretrain.py`` at commit
  38ceb80 (the argparse version: ``pretrain()`` with its ``sample_times`` and ``flow_matching_loss``, without
  its evaluation and saving) -- against ``train.pretrain.pretrain`` with the same options under their new
  names: every weight equal bit for bit;
* against ``tests/train/data/pretrain_38ceb80.json`` (FIXTURE), recorded by the old code itself at 38ceb80
  (``train.pretrain.main(argv + ["--out", DIR, "--log-every", "1", "--log-file"])``, one process per run):
  the logged losses and each weight tensor's sum and sum of magnitudes, with tolerances, since another
  process on another CPU may round differently (on the machine that recorded it the sha256 of the new
  code's weights equals the fixture's).  The prompt encoder's attention bias ``qkv.bias`` is compared on its
  query and value thirds only (the fixture's ``qkv_bias_q_v``, recorded by the same 38ceb80 code on a second
  machine): the key bias adds ``q . b_k`` to every score of a query, which the softmax ignores, so its
  gradient is zero up to rounding and Adam turns that rounding into steps of a full learning rate whose signs
  depend on the CPU (on an AVX-512 machine the whole tensor's sum differed from the fixture's by 0.0067).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from models.embedded import DEFAULT_DIR, EmbeddedDefault
from models.lora import EMA
from train.data import render_batch, sample_prompts
from train.pretrain import (
    RENAMED,
    grow_depth,
    mismatch_captions,
    model_config,
    parse_args,
    pretrain,
    pretrain_text_encoder,
)

FIXTURE = Path(__file__).parent / "data" / "pretrain_38ceb80.json"
STAGE3 = DEFAULT_DIR / "stage3"  # the 8-block model that models/embedded held at 38ceb80
RUNS = json.loads(FIXTURE.read_text())["runs"]
# the fixture's old command lines under the new names (test_renamed_options_translate_the_fixture checks it)
NEW_ARGV = {
    "options": ["--train.steps", "4", "--train.batch-size", "4", "--train.lr", "2e-3", "--train.warmup", "2",
                "--train.cooldown", "2", "--train.weight-decay", "0.05", "--train.grad-clip", "0.5",
                "--models.width", "32", "--models.layers", "2", "--train.ema", "0.5",
                "--train.caption-noise", "0.3", "--train.time-sampling", "logit-normal",
                "--train.time-shift", "2", "--train.prompt-dropout", "0.25", "--seed", "5", "--threads", "1"],
    "text_pretrain": ["--train.steps", "3", "--train.batch-size", "4", "--train.warmup", "1", "--seed", "2",
                      "--threads", "1", "--text.pretrain-steps", "3", "--text.pretrain-lr", "5e-3",
                      "--models.layers", "2"],
    "grow_frozen_text": ["--train.steps", "2", "--train.batch-size", "4", "--train.warmup", "1",
                         "--seed", "3", "--threads", "1", "--models.init-from", "models/embedded",
                         "--models.layers", "9", "--text.freeze"],
}


def _old_sample_times(n, generator, how="uniform", shift=3.0):
    """38ceb80 train/pretrain.py ``sample_times``."""
    if how == "uniform":
        u = torch.rand(n, generator=generator)
    elif how == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        raise ValueError(how)
    return shift * u / (1.0 + (shift - 1.0) * u)


def _old_flow_matching_loss(model, x0, prompts, generator, time_sampling="uniform", time_shift=3.0):
    """38ceb80 train/pretrain.py ``flow_matching_loss``."""
    b = x0.shape[0]
    t = _old_sample_times(b, generator, time_sampling, time_shift).to(x0)
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


def _old_pretrain(a: dict) -> tuple[EmbeddedDefault, list[float]]:
    """38ceb80 train/pretrain.py ``pretrain(args)`` (argparse defaults filled in ``a``), up to the saved
    model: set-up, text pretraining, the loop, the EMA copy; -> (model, per-step losses)."""
    torch.manual_seed(a["seed"])
    if a["init_from"]:
        start_from = EmbeddedDefault.from_pretrained(a["init_from"])
        if a["layers"] and a["layers"] != start_from.config.transformer["num_layers"]:
            start_from = grow_depth(start_from, a["layers"])
        model = EmbeddedDefault(start_from.config)
        model.load_state_dict(start_from.state_dict())
        model.requires_grad_(True)
    else:
        model = EmbeddedDefault(model_config(a["width"], a["layers"]))
    if a["text_pretrain_steps"]:
        steps, lr = a["text_pretrain_steps"], a["text_pretrain_lr"]
        pretrain_text_encoder(model.text_encoder, steps, lr, seed=a["seed"])
    if a["freeze_text_encoder"] or a["text_pretrain_steps"]:
        model.text_encoder.requires_grad_(False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = EMA(trainable, max_decay=a["ema"]) if a["ema"] else None
    opt = torch.optim.AdamW(trainable, lr=a["lr"], weight_decay=a["weight_decay"], betas=(0.9, 0.99))

    def lr_factor(s):
        return min(1.0, (s + 1) / a["warmup"], (a["steps"] - s) / a["cooldown"] if a["cooldown"] else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    data_rng = np.random.default_rng(a["seed"])
    gen = torch.Generator().manual_seed(a["seed"])
    losses = []
    for _ in range(a["steps"]):
        batch = sample_prompts(a["batch_size"], data_rng)
        x0 = render_batch(batch, data_rng)
        if a["caption_noise"]:
            batch = mismatch_captions(batch, a["caption_noise"], data_rng)
        prompts = [p.text for p in batch]
        drop = data_rng.random(a["batch_size"]) < a["prompt_dropout"]
        prompts = ["" if d else p for p, d in zip(prompts, drop, strict=True)]
        loss = _old_flow_matching_loss(model, x0, prompts, gen, a["time_sampling"], a["time_shift"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, a["grad_clip"])
        opt.step()
        sched.step()
        if ema:
            ema.update()
        losses.append(loss.item())
    model.eval()
    if ema:
        ema.copy_to()
    return model, losses


_OLD_DEFAULTS = dict(
    steps=3000, batch_size=64, lr=1e-3, warmup=100, cooldown=0, init_from=None, width=None, layers=None,
    freeze_text_encoder=False, text_pretrain_steps=0, text_pretrain_lr=3e-3, ema=0.0, weight_decay=0.01,
    grad_clip=1.0, time_sampling="uniform", time_shift=3.0, prompt_dropout=0.1, caption_noise=0.0, seed=0,
)
_OLD_TYPES = {k: type(v) for k, v in _OLD_DEFAULTS.items() if v is not None} | {
    "init_from": str, "width": int, "layers": int
}


def _old_args(argv: list[str]) -> dict:
    """The old argparse's values of ``argv`` (its flags, its types; ``--threads`` is set by the caller)."""
    a, i = dict(_OLD_DEFAULTS), 0
    while i < len(argv):
        name = argv[i][2:].replace("-", "_")
        if name == "freeze_text_encoder":
            a[name], i = True, i + 1
            continue
        if name != "threads":
            a[name] = _OLD_TYPES[name](argv[i + 1])
        i += 2
    if a["init_from"] == "models/embedded":  # the default at 38ceb80
        a["init_from"] = str(STAGE3)
    return a


def _new_argv(name: str, out: Path) -> list[str]:
    argv = [str(STAGE3) if v == "models/embedded" else v for v in NEW_ARGV[name]]
    return [*argv, "--out", str(out), "--log.every", "1", "--log.file"]


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_the_key_bias_gets_no_gradient_beyond_rounding():
    """Why the fixture leaves the key third of ``qkv.bias`` out: the softmax over keys ignores ``q . b_k``."""
    torch.manual_seed(0)
    enc = EmbeddedDefault(model_config(32, 2)).text_encoder
    emb, pooled = enc(enc.tokenize(["a red circle", "two blue squares above a green triangle"]))
    (emb.square().mean() + pooled.sin().sum()).backward()
    for block in enc.blocks:
        q, k, v = block.qkv.bias.grad.chunk(3)
        assert float(k.abs().max()) < 1e-6 * float(q.abs().max() + v.abs().max()), float(k.abs().max())


def test_renamed_options_translate_the_fixture():
    """Every old option of the fixture's command lines has its new name in RENAMED, with the same value."""
    for name, run in RUNS.items():
        translated = [RENAMED[t].split()[0] if t in RENAMED else t for t in run["argv"]]
        assert translated == NEW_ARGV[name], name


@pytest.mark.parametrize("name", list(RUNS))
def test_pretraining_steps_equal_the_pre_refactor_code(name, tmp_path):
    cfg = parse_args(_new_argv(name, tmp_path))
    with _threads(1):
        new = pretrain(cfg, argv=[])
        old, old_losses = _old_pretrain(_old_args(RUNS[name]["argv"]))
    # in one process: the pre-refactor loop, bit for bit
    new_state, old_state = new.state_dict(), old.state_dict()
    assert new_state.keys() == old_state.keys()
    for key, value in new_state.items():
        assert torch.equal(value, old_state[key]), key
    logged = [json.loads(line) for line in (tmp_path / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == [round(v, 5) for v in old_losses]
    # across processes: what the old code itself wrote at 38ceb80 (float rounding may differ elsewhere)
    fixture = RUNS[name]
    assert [r["loss"] for r in logged] == pytest.approx(fixture["losses"], abs=2e-5)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "default.safetensors"))
    assert sorted(saved) == sorted(fixture["sum_abs_sum"])
    digest = hashlib.sha256()
    for key in sorted(saved):
        total, magnitude = fixture["sum_abs_sum"][key]
        value = saved[key].double()
        if key.endswith("qkv.bias"):  # the key third is the CPU's rounding (module docstring): q and v only
            q, _, v = value.chunk(3)
            value = torch.cat([q, v])
            total, magnitude = fixture["qkv_bias_q_v"][key]
        assert float(value.sum()) == pytest.approx(total, rel=1e-4, abs=1e-4 * magnitude + 1e-6), key
        assert float(value.abs().sum()) == pytest.approx(magnitude, rel=1e-5), key
        digest.update(key.encode())
        digest.update(saved[key].numpy().tobytes())
    same = digest.hexdigest() == fixture["sha256"]
    print(f"{name}: sha256 {'equals' if same else 'differs from'} the fixture's")


def test_evaluation_during_pretraining_goes_through_the_evaluator_and_changes_no_weight(tmp_path):
    """``--eval.every``: the held-out evaluation of the weight EMA through the training loops' Evaluator,
    logged per CFG scale with its grid; the trajectory is the one of a run without it."""
    from train.pretrain import PretrainEvalConfig, evaluate

    common = ["--train.steps", "2", "--train.batch-size", "4", "--train.warmup", "1", "--seed", "7",
              "--models.width", "32", "--models.layers", "1", "--train.ema", "0.5", "--log.file"]
    plain = pretrain(parse_args([*common, "--out", str(tmp_path / "plain")]))
    argv = [*common, "--eval.every", "1", "--eval.per-task", "1", "--eval.cfg-scales", "1,3",
            "--out", str(tmp_path / "eval")]
    evaluated = pretrain(parse_args(argv))
    for (key, a), b in zip(plain.state_dict().items(), evaluated.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    log = (tmp_path / "eval" / "pretrain_log.jsonl").read_text().splitlines()
    scores = [r for r in map(json.loads, log) if "cfg1" in r]
    assert [r["step"] for r in scores] == [1, 2]
    assert all(set(r) == {"step", "minutes", "cfg1", "cfg3"} for r in scores)
    assert {"score", "single_object", "position", "score_partial"} <= set(scores[-1]["cfg1"])
    for scale in ("1", "3"):
        assert (tmp_path / "eval" / f"eval_cfg{scale}" / "samples" / "iter_000002.png").is_file()
    # the last evaluation is that of the saved weights (the EMA average the run ended with)
    again = evaluate(evaluated, PretrainEvalConfig(per_task=1, cfg_scales=(1.0, 3.0)))
    assert {k: {m: round(v, 4) for m, v in r.items()} for k, r in again.items()} == {
        k: scores[-1][k] for k in ("cfg1", "cfg3")
    }


def _documented_commands() -> list[str]:
    """train.pretrain command lines of models/embedded/{,stage1/}pretrain.json and docs/embedded-model.md."""
    record = json.loads((DEFAULT_DIR / "pretrain.json").read_text())
    found = [*record["command"].split(" && "), *record["reproduce"].split(" && ")]
    found += [stage["reproduce"] for stage in record["stages"]]
    stage1 = json.loads((DEFAULT_DIR / "stage1" / "pretrain.json").read_text())
    found += [stage1["command"], stage1["reproduce"]]
    docs = (Path(__file__).resolve().parents[2] / "docs" / "embedded-model.md").read_text()
    for part in docs.split("python -m train.pretrain")[1:]:
        end = min(i for i in (part.find("`"), part.find("\npython"), part.find("\n```"), len(part)) if i >= 0)
        found.append("python -m train.pretrain" + part[:end].replace("\\\n", " ").replace("\n", " "))
    return found


def test_documented_recipes_use_the_new_option_names():
    """The recipes were rewritten for the dataclass CLI; each parses (the --models.init-from directories are
    earlier stages' outputs, so they are not validated here) and names the options it sets."""
    from train.config import parse_cli
    from train.pretrain import PRESETS, PretrainConfig

    commands = _documented_commands()
    assert len(commands) >= 3 + 3 + 3 + 3 + 1
    for command in commands:
        argv = shlex.split(command)[3:]
        assert argv and not any(a in RENAMED for a in argv), command
        cfg = parse_cli(PretrainConfig, argv, prog="train.pretrain", description="", presets=PRESETS)
        assert cfg.train.steps in (1000, 2000, 3500, 8000, 10000, 16000), command
    stage2 = parse_cli(PretrainConfig, shlex.split(commands[1])[3:], prog="", description="", presets=PRESETS)
    assert (stage2.models.layers, stage2.text.freeze, stage2.train.ema) == (8, True, 0.998)


# --- checkpoints and --resume ---
RESUME_ARGV = ["--train.steps", "6", "--train.batch-size", "4", "--train.warmup", "2",
               "--train.cooldown", "3", "--models.width", "32", "--models.layers", "2", "--train.ema", "0.5",
               "--train.caption-noise", "0.3", "--train.time-sampling", "logit-normal", "--seed", "5",
               "--threads", "1", "--log.every", "1", "--log.file"]  # fmt: skip


def _loss_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "pretrain_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "minutes"} for r in rows]


def _equal_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "default.safetensors")), load_file(str(b / "default.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _loss_then(monkeypatch, at_call: int, action) -> None:
    """``flow_matching_loss`` runs ``action()`` at its ``at_call``-th call (during that step)."""
    import train.pretrain as tp

    real, calls = tp.flow_matching_loss, {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(tp, "flow_matching_loss", wrapped)


def test_a_stopped_or_killed_run_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    """A SIGINT during step 3 finishes the step, checkpoints it and exits 3; a crash during step 4 (nothing
    written since the periodic checkpoint of step 2) leaves a log with step 3's row.  ``--resume`` continues
    both to the weights and loss rows of the uninterrupted run, in this process bit for bit, and removes the
    checkpoint when done."""
    import os
    import signal

    from train.pretrain import CHECKPOINT, main

    whole = tmp_path / "whole"
    assert main([*RESUME_ARGV, "--out", str(whole)]) == 0
    assert not (whole / CHECKPOINT).exists()

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _loss_then(m, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
        assert main([*RESUME_ARGV, "--out", str(stopped)]) == 3
    assert "SIGINT: checkpoint of step 3 written" in capsys.readouterr().err
    assert torch.load(stopped / CHECKPOINT, weights_only=False)["step"] == 3

    crashed = tmp_path / "crashed"

    def crash():
        raise RuntimeError("crash")

    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="crash"):
        _loss_then(m, 4, crash)
        main([*RESUME_ARGV, "--out", str(crashed), "--log.checkpoint-every", "2"])
    assert torch.load(crashed / CHECKPOINT, weights_only=False)["step"] == 2
    assert [r["step"] for r in _loss_rows(crashed)] == [1, 2, 3]

    for run, at in ((stopped, 3), (crashed, 2)):
        assert main([*RESUME_ARGV, "--out", str(run), "--resume", "--threads", "1"]) == 0
        assert f"resumed {str(run)!r} at step {at} of 6" in capsys.readouterr().out
        _equal_weights(run, whole)
        assert _loss_rows(run) == _loss_rows(whole)
        assert not (run / CHECKPOINT).exists()
        assert json.loads((run / "pretrain.json").read_text())["resumed_at_steps"] == [at]


def test_resume_is_refused_before_any_work_without_its_checkpoint_or_with_other_options(tmp_path, capsys):
    from train.pretrain import CHECKPOINT, main

    out = tmp_path / "run"
    assert main([*RESUME_ARGV, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: expected a checkpoint at {str(out / CHECKPOINT)!r}" in err and "got none" in err
    argv = [*RESUME_ARGV, "--out", str(out), "--max-minutes", "1e-9"]  # stops before its first step
    assert main(argv) == 0 and torch.load(out / CHECKPOINT, weights_only=False)["step"] == 0
    capsys.readouterr()
    assert main([*RESUME_ARGV, "--train.lr", "5e-3", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--train.lr: expected 0.001, the value of the run being resumed" in err and "got 0.005" in err
    assert main([*RESUME_ARGV, "--out", str(out)]) == 2  # a fresh run would overwrite the unfinished one
    err = capsys.readouterr().err
    assert f"--out: expected a directory without an unfinished run, got {str(out)!r}" in err
    assert "continue that run with --resume" in err


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """A NaN loss at step 2 makes every trained weight NaN: the periodic checkpoint of step 2 is refused with
    an error, and the one of step 1 stays."""
    from train.pretrain import CHECKPOINT, main

    out = tmp_path / "run"
    import train.pretrain as tp

    real, calls = tp.flow_matching_loss, {"n": 0}

    def nan_at_2(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(tp, "flow_matching_loss", nan_at_2)
    with pytest.raises(RuntimeError, match="step 2: non-finite weights; not checkpointed"):
        main([*RESUME_ARGV, "--out", str(out), "--log.checkpoint-every", "1"])
    assert torch.load(out / CHECKPOINT, weights_only=False)["step"] == 1
