"""Config/CLI, checkpoints, metrics, advantages and rewards shared by the training loops."""

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from train import common
from train.advantages import equal_reward_groups, group_advantages, nft_optimality
from train.config import ConfigError, from_dict, parse_cli, to_dict
from train.rewards.registry import RewardError, aggregate, build_reward


@dataclass
class _Inner:
    lr: float = 1e-3
    steps: int = 3
    names: tuple[str, ...] = ("a",)
    flag: bool = False


@dataclass
class _Cfg:
    preset: str = "small"
    seed: int = 0
    run_dir: str | None = None
    train: _Inner = field(default_factory=_Inner)


_PRESETS = {"small": _Cfg, "big": lambda: _Cfg(seed=7, train=_Inner(steps=100))}


def _parse(argv):
    return parse_cli(_Cfg, argv, prog="x", description="d", presets=_PRESETS)


def test_cli_overrides_and_presets():
    cfg = _parse(
        [
            "--preset",
            "big",
            "--train.lr",
            "1e-4",
            "--run-dir",
            "/tmp/x",
            "--train.names",
            "a,b",
            "--train.flag=true",
        ]
    )
    assert cfg.seed == 7 and cfg.train.steps == 100 and cfg.train.lr == 1e-4
    assert cfg.run_dir == "/tmp/x" and cfg.train.names == ("a", "b") and cfg.train.flag is True
    assert from_dict(_Cfg, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--nope", "1"], "--nope: unknown option"),
        (["--train.steps", "x"], "--train.steps: expected a value of type int, got 'x'"),
        (["--preset", "huge"], "--preset: expected one of small, big, got 'huge'"),
        (["--seed"], "--seed: expected a value after it"),
        (["seed", "1"], "expected an option of the form"),
    ],
)
def test_cli_errors_name_the_option(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _parse(argv)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        _parse(["--help"])
    out = capsys.readouterr().out
    for flag in ("--seed", "--run-dir", "--train.lr", "--train.steps", "--train.names", "--train.flag"):
        assert flag in out


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    run = common.prepare_run_dir(str(tmp_path / "r"), algo="t")
    for it in range(1, 5):
        common.save_checkpoint(run, it, {"iteration": it})
    files = sorted(p.name for p in (run / "checkpoints").glob("iter_*.pt"))
    assert files == ["iter_000003.pt", "iter_000004.pt"]
    assert common.load_checkpoint(run)["iteration"] == 4
    assert not list((run / "checkpoints").glob(".*tmp"))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        common.save_checkpoint(run, 5, {"x": Boom()})
    assert common.load_checkpoint(run)["iteration"] == 4  # the failed write left the old one intact
    assert not list((run / "checkpoints").glob(".*tmp"))


def test_run_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume"):
        common.prepare_run_dir(None, algo="t", resume=str(tmp_path / "missing"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="--run-dir: expected a writable directory"):
        common.prepare_run_dir(str(blocker / "sub"), algo="t")


def test_metrics_resume_truncates(tmp_path):
    m = common.MetricsLogger(tmp_path)
    for it in range(4):
        m.log(it, it * 1.0, {"a": torch.tensor(float(it))})
    m.close()
    m = common.MetricsLogger(tmp_path, resume_iteration=2)
    m.log(3, 9.0, {"a": 33.0})
    m.close()
    rows = common.read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3] and rows[-1]["a"] == 33.0


def test_group_advantages_global_and_group_std():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    a = group_advantages(r, g)
    expect = torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 0.0]) / (r.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(a, expect)
    ag = group_advantages(r, g, std="group")
    torch.testing.assert_close(ag[:2], torch.tensor([0.5, -0.5]) / (0.5 + 1e-4))
    assert equal_reward_groups(r, g).tolist() == [False, False, True, True, True, True]


def test_nft_optimality_map():
    a = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0])
    torch.testing.assert_close(nft_optimality(a, 5.0), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    with pytest.raises(ValueError, match="adv_clip_max"):
        nft_optimality(a, 0.0)


def test_jpeg_rewards_order_smooth_and_noisy_images():
    smooth = torch.zeros(1, 3, 32, 32)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    imgs = torch.cat([smooth, noisy])
    comp = build_reward("jpeg_compressibility")(imgs, ["", ""])[0]
    incomp = build_reward("jpeg_incompressibility")(imgs, ["", ""])[0]
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    torch.testing.assert_close(comp, -incomp)


def test_reward_aggregations():
    vals = {"a": torch.tensor([0.0, 1.0, 2.0]), "b": torch.tensor([2.0, 1.0, 0.0])}
    z = aggregate(vals, {"a": 1.0, "b": 1.0}, "zmean")
    torch.testing.assert_close(z, torch.zeros(3), atol=1e-5, rtol=0)
    mn = aggregate(vals, {"a": 1.0, "b": 1.0}, "min")
    assert mn[1] == 0 and mn[0] < 0 and mn[2] < 0
    mms = aggregate(vals, {"a": 3.0, "b": 1.0}, "mean_minus_std", k_std=1.0)
    za = (vals["a"] - 1) / math.sqrt(2 / 3)
    torch.testing.assert_close(mms, (3 * za - za) / 4 - (za - -za).abs() / 2, atol=1e-4, rtol=0)


def test_reward_failures_are_loud():
    rw = build_reward("jpeg_compressibility")
    rw.fns["jpeg_compressibility"] = lambda imgs, p: torch.tensor([float("nan")] * imgs.shape[0])
    with pytest.raises(RewardError, match="non-finite"):
        rw(torch.zeros(2, 3, 8, 8), ["", ""])

    def raises(imgs, p):
        raise OSError("disk on fire")

    rw.fns["jpeg_compressibility"] = raises
    with pytest.raises(RewardError, match="raised OSError: disk on fire"):
        rw(torch.zeros(2, 3, 8, 8), ["", ""])


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(names="nope"), "--reward: expected names from"),
        (dict(names="jpeg_compressibility", weights=(1.0, 2.0)), "--reward-weights: expected 1 weights"),
        (dict(names="jpeg_compressibility", aggregation="max"), "--reward-aggregation"),
        (dict(names="clip_score"), "--reward-clip-path"),
    ],
)
def test_reward_config_errors(kwargs, needle):
    names = kwargs.pop("names")
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        build_reward(names, **kwargs)
