"""A new user's bad input is refused before any work, with one message that names the CLI option, what was
expected and what was given: a --model run without a reward (or with the embedded default's), a transformer
folder instead of its pipeline, a UNet for a flow-only loop (and accepted by every other), a wrong --model
path, a non-UTF-8 prompts file; --help matches what is accepted and shows the chosen preset's defaults; a
``models/`` folder in the working directory that shadows the package is named in one sentence."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import train.grpo as grpo
import train.nft as nft
from train.config import parse_cli
from train.policy import UNET_LOOPS

from ._pg_helpers import make_tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[2]
JPEG = "jpeg_compressibility"


@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory):
    from tests.models.test_text_vae import _sd3_pipeline

    tmp = tmp_path_factory.mktemp("sd3")
    _sd3_pipeline(tmp).save_pretrained(tmp / "pipe")
    (tmp / "prompts.txt").write_text("a red cat\na blue dog\n")
    return tmp / "pipe", tmp / "prompts.txt"


@pytest.fixture(scope="module")
def unet_pipeline(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd15"))


def _refused(main, tmp_path, capsys, argv) -> str:
    """``main(argv)`` exits 2 before any work (no run directory) -> its stderr."""
    run = tmp_path / "run"
    assert main(["--run-dir", str(run), *argv]) == 2
    assert not run.exists()
    return capsys.readouterr().err


def test_model_run_needs_a_reward(tmp_path, capsys, sd3_pipeline):
    pipe, prompts = sd3_pipeline
    err = _refused(nft.main, tmp_path, capsys, ["--model", str(pipe), "--prompts", str(prompts)])
    assert "--reward: expected a reward for a --model run's prompts" in err and "got none" in err
    argv = ["--model", str(pipe), "--prompts", str(prompts), "--reward", "geneval_mini"]
    err = _refused(nft.main, tmp_path, capsys, argv)
    assert "--reward: expected a reward for a --model run's text prompts" in err and "'geneval_mini'" in err


def test_ocr_reward_needs_quoted_text_in_every_prompt_it_scores(tmp_path, capsys, sd3_pipeline):
    """The ocr reward reads the prompt's "quoted text": prompts without any are refused before any work (they
    raised at the first evaluation, after the base model's)."""
    err = _refused(nft.main, tmp_path, capsys, ["--reward", "ocr"])
    assert '--reward: expected prompts with "quoted text" for the ocr reward' in err and "GenEval-mini" in err
    pipe, plain = sd3_pipeline
    quoted = tmp_path / "quoted.txt"
    quoted.write_text('a sign that says "open"\na mug with "hello" on it\n')
    mixed = tmp_path / "mixed.txt"
    mixed.write_text('a sign that says "open"\na blue dog\n')
    model = ["--model", str(pipe)]
    err = _refused(nft.main, tmp_path, capsys, [*model, "--reward", "ocr", "--prompts", str(mixed)])
    want = '--prompts: expected every prompt to hold "quoted text" for the ocr reward (--reward ocr), got '
    assert f"{want}prompt 2 of {mixed}: 'a blue dog'" in err
    argv = [*model, "--reward", "ocr", "--prompts", str(quoted), "--eval-prompts", str(plain)]
    err = _refused(nft.main, tmp_path, capsys, argv)
    assert "--eval-prompts: expected every prompt to hold" in err
    assert f"prompt 1 of {plain}: 'a red cat'" in err
    # as a gold reward it scores only the held-out prompts: unquoted training prompts are fine
    argv = [*model, "--reward", JPEG, "--eval.rewards", "ocr", "--prompts", str(plain), "--eval-prompts",
            str(mixed)]
    err = _refused(nft.main, tmp_path, capsys, argv)
    assert "(--eval.rewards ocr), got prompt 2 of" in err


def test_embedded_default_keeps_geneval_mini_as_default_reward():
    cfg = parse_cli(nft.NFTConfig, [], prog="train.nft", description="", presets=nft.PRESETS)
    assert cfg.reward is None
    nft.validate(cfg)
    assert cfg.reward == "geneval_mini"


def test_transformer_folder_is_refused_naming_its_pipeline(tmp_path, capsys, sd3_pipeline):
    pipe, prompts = sd3_pipeline
    argv = ["--model", str(pipe / "transformer"), "--prompts", str(prompts), "--reward", JPEG]
    err = _refused(nft.main, tmp_path, capsys, argv)
    assert "--model: expected a diffusers pipeline directory" in err
    assert "SD3Transformer2DModel model folder" in err and f"{str(pipe.resolve())!r} is the pipeline" in err


@pytest.mark.parametrize("module", [nft, grpo], ids=["nft", "grpo"])
def test_unet_is_refused_by_the_flow_loops(tmp_path, capsys, unet_pipeline, module):
    pipe, prompts = unet_pipeline
    argv = ["--model", str(pipe), "--prompts", str(prompts), "--reward", "jpeg_compressibility"]
    if module is grpo:
        argv += ["--preset", "sd3.5-m"]
    err = _refused(module.main, tmp_path, capsys, argv)
    assert "--model: expected an SD3/SD3.5/FLUX pipeline" in err and str(pipe) in err
    assert all(name in err for name in UNET_LOOPS), err


class _Validated(BaseException):
    pass


@pytest.mark.parametrize("name", UNET_LOOPS)
def test_the_loops_named_for_unets_accept_one(tmp_path, monkeypatch, unet_pipeline, name):
    """Every loop the refusal above (and ``--model``'s help) names for UNets passes a UNet pipeline through
    its validation to the run."""
    import importlib

    import train.loop as loop

    def reached(*args, **kwargs):
        raise _Validated

    monkeypatch.setattr(loop, "_run", reached)
    pipe, prompts = unet_pipeline
    gradient = name in ("train.draft", "train.alignprop", "train.refl", "train.nabla_gfn")
    argv = ["--run-dir", str(tmp_path / "run"), "--model", str(pipe), "--prompts", str(prompts),
            "--reward", "saturation" if gradient else JPEG]  # fmt: skip
    if name == "train.dpo":
        argv.append("--online")  # a --model run's pairs: its own rollouts (or a JSONL / parquet --data)
    with pytest.raises(_Validated):
        importlib.import_module(name).main(argv)


def test_resolution_is_checked_before_the_model_loads(tmp_path, capsys, sd3_pipeline):
    """``--models.resolution`` must be a multiple of the --model's VAE factor (read from its config, before
    loading anything), and is refused on the embedded default, whose checkpoint fixes the image size."""
    import json

    pipe, prompts = sd3_pipeline
    blocks = json.loads((pipe / "vae" / "config.json").read_text())["block_out_channels"]
    factor = 2 ** (len(blocks) - 1)
    argv = ["--model", str(pipe), "--prompts", str(prompts), "--reward", JPEG]
    err = _refused(nft.main, tmp_path, capsys, [*argv, "--models.resolution", str(factor + 1)])
    want = f"--models.resolution: expected a positive multiple of the VAE factor {factor}, got {factor + 1}"
    assert want in err
    err = _refused(grpo.main, tmp_path, capsys, ["--models.resolution", "64"])
    assert "--models.resolution: sets a --model run's image size; the embedded default samples" in err


def test_wrong_model_path_names_the_option(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    argv = ["--model", str(tmp_path / "nowhere"), "--prompts", str(prompts), "--reward", JPEG]
    err = _refused(nft.main, tmp_path, capsys, argv)
    assert err.startswith("error: --model: expected a local diffusers directory") and "nowhere" in err
    assert "path_or_preset" not in err


def test_non_utf8_prompts_file_is_named(tmp_path, capsys, sd3_pipeline):
    pipe, _ = sd3_pipeline
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a caf\xe9 at night\n".encode("latin-1"))
    argv = ["--model", str(pipe), "--prompts", str(bad), "--reward", "jpeg_compressibility"]
    err = _refused(nft.main, tmp_path, capsys, argv)
    assert f"--prompts: expected a UTF-8 text file with one prompt per line, got {str(bad)!r}" in err


def _help(main, capsys, *argv, code=0) -> str:
    """``main([*argv, "--help"])`` in this process, as ``python -m`` runs it (``sys.exit(main())``): it exits
    with ``code`` -> what it printed (stdout, or stderr for a refusal)."""
    try:
        got = main([*argv, "--help"])
    except SystemExit as e:
        got = e.code
    out = capsys.readouterr()
    assert got == code, out.err
    return out.out if code == 0 else out.err


def _option_line(text: str, option: str) -> str:
    return next(ln for ln in text.splitlines() if ln.strip().startswith(option + " "))


def test_grpo_help_offers_only_the_solvers_it_accepts(tmp_path, capsys):
    line = _option_line(_help(grpo.main, capsys), "--sample.solver")
    assert "flow-sde" in line and "cps" in line and "ddim" not in line and "auto" not in line
    for solver in ("flow-sde", "cps"):  # what the help offers is accepted
        cfg = parse_cli(grpo.GRPOConfig, ["--sample.solver", solver], prog="", description="",
                        presets=grpo.PRESETS)
        grpo.validate(cfg)


def test_help_shows_the_chosen_presets_defaults(capsys):
    tiny, big = _help(nft.main, capsys), _help(nft.main, capsys, "--preset", "sd3.5-m")
    want = nft.preset_sd35m()
    assert _option_line(big, "--max-iters").endswith(f"[{want.max_iters}]")
    assert _option_line(big, "--models.dtype").endswith(f"[{want.models.dtype}]")
    assert _option_line(big, "--reward").endswith(f"[{want.reward}]")
    assert _option_line(tiny, "--models.dtype").endswith(f"[{nft.preset_tiny().models.dtype}]")
    assert _option_line(tiny, "--max-iters") != _option_line(big, "--max-iters")
    assert "under --preset sd3.5-m" in big
    bad = _help(nft.main, capsys, "--preset", "sd9", code=2)
    assert "--preset: expected one of tiny, sd3.5-m, got 'sd9'" in bad


# An editable install puts the project behind a meta-path finder that Python consults after the working
# directory, so a plain ``models/`` folder there (a namespace package) wins.  The launcher reproduces that.
_EDITABLE_LAUNCHER = textwrap.dedent(
    """
    import importlib.machinery, runpy, sys
    ROOT = sys.argv.pop(1)
    class Editable:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name in ("kernels", "engine", "models", "train", "tests"):
                return importlib.machinery.PathFinder.find_spec(name, [ROOT])
            return None
    # right after the path finder (before any installed editable finder of another checkout)
    sys.meta_path.insert(sys.meta_path.index(importlib.machinery.PathFinder) + 1, Editable)
    sys.argv[0] = "-m"
    runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
    """
)


def test_models_folder_in_the_working_directory_is_named(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights.safetensors").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the project reaches the interpreter only through the launcher's finder, as with an editable install
    cmd = [sys.executable, "-c", _EDITABLE_LAUNCHER, str(ROOT), "train.nft", "--max-iters", "1"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "AttributeError" not in out.stderr
    assert f"the package 'models' resolves to the folder {tmp_path / 'models'}" in out.stderr
    assert "rename that folder or run from another directory" in out.stderr
    # the control: without the folder the same launcher gets past the import check
    (tmp_path / "models" / "weights.safetensors").unlink()
    (tmp_path / "models").rmdir()
    cmd = [sys.executable, "-c", _EDITABLE_LAUNCHER, str(ROOT), "train.nft", "--help"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "--max-iters" in out.stdout, out.stderr[-2000:]


def test_hub_kernels_distribution_shadowing_ours_is_named(tmp_path):
    """transformers >= 5.25 installs the Hub's ``kernels`` distribution, whose import name is ours: when it
    wins, the error names the distribution and the fix, not a folder in the working directory."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("def get_kernel(name): ...\n")
    info = site / "kernels-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    (info / "top_level.txt").write_text("kernels\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(site)}
    cmd = [sys.executable, "-c", _EDITABLE_LAUNCHER, str(ROOT), "train.nft", "--max-iters", "1"]
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert f"the package 'kernels' resolves to {site / 'kernels' / '__init__.py'}" in out.stderr
    assert "the installed distribution kernels 0.19.1 (the Hugging Face Hub kernel loader" in out.stderr
    assert "pip uninstall kernels, or install this project in another virtualenv" in out.stderr


def test_embedded_dir_is_checked_before_work(tmp_path, capsys, monkeypatch, sd3_pipeline):
    """``--models.embedded-dir`` must hold an embedded checkpoint, and only replaces the embedded default."""
    err = _refused(nft.main, tmp_path, capsys, ["--models.embedded-dir", str(tmp_path)])
    assert "--models.embedded-dir: expected a directory with default.safetensors and default.json" in err
    assert f"got {str(tmp_path)!r} without default.safetensors and default.json" in err
    assert "relative paths" not in err
    # the README's relative path, given from another working directory: the shipped checkpoint is named
    monkeypatch.chdir(tmp_path)
    err = _refused(nft.main, tmp_path, capsys, ["--models.embedded-dir", "models/embedded/stage1"])
    shipped = str(ROOT / "models" / "embedded" / "stage1")
    assert f"relative paths are from the working directory, and the shipped one is {shipped!r}" in err
    pipe, prompts = sd3_pipeline
    stage1 = str(ROOT / "models" / "embedded" / "stage1")
    argv = ["--model", str(pipe), "--prompts", str(prompts), "--reward", JPEG]
    err = _refused(nft.main, tmp_path, capsys, [*argv, "--models.embedded-dir", stage1])
    assert "--models.embedded-dir: replaces the embedded default; expected none with --model" in err


def test_embedded_dir_trains_and_reloads_that_checkpoint(tmp_path, capsys):
    """A run on ``--models.embedded-dir models/embedded/stage1`` names it and trains LoRA on that checkpoint
    (not the shipped model), and its config records it: ``train.export.load_policy`` rebuilds the run on
    the same base weights."""
    import torch

    from models.embedded import EmbeddedDefault
    from train.export import load_policy

    stage1 = ROOT / "models" / "embedded" / "stage1"
    run = tmp_path / "run"
    argv = ["--run-dir", str(run), "--models.embedded-dir", str(stage1), "--max-iters", "1",
            "--sample.prompts-per-iter", "2", "--sample.images-per-prompt", "4", "--sample.num-steps", "2",
            "--train.batch-size", "4", "--eval.num-prompts", "2", "--eval.num-steps", "2",
            "--eval.every", "1", "--eval.diversity-prompts", "0", "--log.progress", "false"]  # fmt: skip
    assert nft.main(argv) == 0
    assert f"preset tiny ({stage1})" in capsys.readouterr().out
    policy, it = load_policy(run)
    assert it == 1
    base = {
        n.replace(".base_layer", ""): t
        for n, t in policy.transformer.state_dict().items()
        if "lora_" not in n
    }
    for directory, same in ((stage1, True), (ROOT / "models" / "embedded", False)):
        want = EmbeddedDefault.from_pretrained(directory).transformer.state_dict()
        equal = set(base) == set(want) and all(torch.equal(base[n], want[n]) for n in want)
        assert equal is same, directory  # the shipped 12-block model has other blocks than stage 1's 4
