"""train.d3po (math.md §6): bad input refused before work, a pair shares x_T and re-scoring a stored step
reproduces its rollout log-prob, the UNet/DDIM path end to end on a tiny random SD1.5-style pipeline with a
bit-identical resume, a tiny SD3 pipeline, and a short JPEG-compressibility run on the embedded default
that beats a learning-rate-0 control."""

import pytest
import torch

import train.d3po as d3po
from train import common

from ._pg_helpers import make_tiny_sd_pipeline, use_embedded_default


@pytest.fixture(autouse=True)
def _embedded(monkeypatch):
    use_embedded_default(monkeypatch)


@pytest.fixture(scope="module")
def tiny_sd_pipeline(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def tiny_sd3_pipeline(tmp_path_factory):
    from tests.models.test_text_vae import _sd3_pipeline

    tmp = tmp_path_factory.mktemp("sd3")
    _sd3_pipeline(tmp).save_pretrained(tmp / "pipe")
    (tmp / "prompts.txt").write_text("a red cat\na blue dog\n")
    return tmp / "pipe", tmp / "prompts.txt"


PAIRS_SMALL = [
    "--sample.prompts-per-iter", "2", "--sample.images-per-prompt", "2", "--sample.num-steps", "4",
    "--train.batch-size", "2", "--train.grad-accum", "1", "--eval.num-prompts", "2", "--eval.num-steps", "4",
    "--log.progress", "false",
]  # fmt: skip


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--train.beta", "0"], "--train.beta: expected a value > 0, got 0.0"),
        (["--train.eps", "1.5"], "--train.eps: expected a value in (0, 1), got 1.5"),
        (
            ["--train.timestep-fraction", "0"],
            "--train.timestep-fraction: expected a value in (0, 1], got 0.0",
        ),
        (["--sample.sde-window", "0,2"], "--sample.sde-window: expected none"),
        (["--sample.images-per-prompt", "0"], "--sample.images-per-prompt: expected an integer >= 1, got 0"),
        (["--sample.solver", "euler"], "--sample.solver: expected auto, flow-sde, cps or ddim, got 'euler'"),
        (["--preset", "sd1.5"], "--model: expected a local diffusers directory"),
    ],
)
def test_bad_input_fails_before_work(tmp_path, capsys, argv, needle):
    run = tmp_path / "r"
    assert d3po.main(["--run-dir", str(run), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not run.exists()


def _trainer(tmp_path, argv):
    from ._pg_helpers import build_trainer

    return build_trainer(d3po, tmp_path, argv)


def test_pairs_share_x_t_and_rescoring_is_exact(tmp_path):
    """Both members of a pair start from one x_T and then differ; at the rollout's weights the D3PO ratio is
    exactly 1 (the adapter is zero-initialised) and every per-step loss is log 2."""
    tr = _trainer(tmp_path, [*PAIRS_SMALL, "--sample.solver", "cps"])
    pairs = tr.rollout_pairs(1)
    st = pairs.states
    assert torch.equal(st[:, 0, 0], st[:, 1, 0]) and not torch.equal(st[:, 0, 1], st[:, 1, 1])
    rows = torch.arange(st.shape[0])
    pairs.winner = torch.zeros(len(rows), dtype=torch.long)
    for j in tr.sched.train_steps:
        loss, q_w, q_l = tr.pair_loss(pairs, rows, torch.full((len(rows),), j))
        assert torch.equal(q_w, torch.zeros_like(q_w)) and torch.equal(q_l, torch.zeros_like(q_l))
        assert float(loss.detach()) == pytest.approx(0.6931471805599453, abs=1e-7)


def test_unet_ddim_end_to_end_and_resume(tmp_path, tiny_sd_pipeline):
    """D3PO's SD1.5 path (DDIM eta 1, CFG 5) on a tiny random pipeline: 2 iterations straight equal 1 + a
    resumed 1, metric for metric and weight for weight."""
    pipe, prompts = tiny_sd_pipeline
    run = [
        "--model", str(pipe), "--prompts", str(prompts), "--preset", "sd1.5", "--models.dtype", "float32",
        "--models.resolution", "16", "--reward", "jpeg_compressibility", *PAIRS_SMALL,
        "--sample.forward-chunk", "4", "--eval.every", "1", "--log.checkpoint-every", "1",
        "--train.lr", "1e-2",
    ]  # fmt: skip
    assert d3po.main(["--run-dir", str(tmp_path / "straight"), *run, "--max-iters", "2"]) == 0
    assert d3po.main(["--run-dir", str(tmp_path / "split"), *run, "--max-iters", "1"]) == 0
    assert d3po.main(["--resume", str(tmp_path / "split"), "--max-iters", "2"]) == 0
    timing = ("elapsed_s", "train/iter_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    straight = strip(common.read_metrics(tmp_path / "straight"))
    assert strip(common.read_metrics(tmp_path / "split")) == straight
    (pa, a), (pb, b) = (
        common.find_checkpoint(tmp_path / "straight"),
        common.find_checkpoint(tmp_path / "split"),
    )
    assert pa.name == pb.name == "iter_000002.pt"
    for x, y in zip(a["policy"]["default"], b["policy"]["default"], strict=True):
        assert torch.equal(x, y)
    rows = [r for r in straight if "train/loss" in r]
    assert len(rows) == 2 and all(0 <= r["train/tie_frac"] <= 1 for r in rows)
    assert (tmp_path / "straight" / "lora").is_dir()


def test_sd3_smoke(tmp_path, tiny_sd3_pipeline):
    """The flow path (Flow-GRPO's SDE log-prob) on a tiny random SD3 pipeline: one iteration runs."""
    pipe, prompts = tiny_sd3_pipeline
    argv = [
        "--model", str(pipe), "--prompts", str(prompts), "--models.dtype", "float32", "--models.resolution",
        "16", "--reward", "jpeg_compressibility", *PAIRS_SMALL, "--sample.solver", "flow-sde",
        "--max-iters", "1", "--run-dir", str(tmp_path / "r"),
    ]  # fmt: skip
    assert d3po.main(argv) == 0
    rows = [r for r in common.read_metrics(tmp_path / "r") if "train/loss" in r]
    assert len(rows) == 1


JPEG_RUN = [
    "--reward", "jpeg_compressibility", "--sample.prompts-per-iter", "2", "--sample.images-per-prompt", "4",
    "--sample.num-steps", "6", "--sample.solver", "flow-sde", "--train.batch-size", "4",
    "--train.grad-accum", "1",
]  # fmt: skip


def test_short_run_raises_the_reward_of_fresh_rollouts(tmp_path):
    """D3PO with JPEG compressibility (a dense reward: few ties) on the embedded default, 20 iterations of 8
    prompts x 4 images at lr 3e-3 against a learning-rate-0 control on the same prompts and seeds: the reward
    of the last 5 iterations' fresh rollouts (new prompts and seeds, sampled before that iteration's update)
    is higher.  The held-out reward after the run (32 test prompts, eval EMA, the ODE sampler) is printed,
    not asserted: it does not follow on every seed, since the ODE's samples are not what the SDE-trained run
    optimises (``bench.sampler_gap``; docs/results.md, "The rollout sampler and the evaluation's ODE"; on
    seed 1 the run also breaks near iteration 20).  Measured (stage-1 checkpoint, 2026-12-06,
    ``NFT_LEARNING_SEED`` 0-3): fresh +0.059, +0.031, +0.084, +0.071; held-out -0.028, -0.453, -0.070,
    +0.228.  The same helper called from a script outside pytest gave, on seeds 0 and 1, fresh +0.059 and
    +0.057, held-out +0.030 and +0.070 (seeds 2 and 3 alike): the run is sensitive to small numerical
    differences, hence the low margin (runs that do not learn, at lr 1e-3, stayed within 0.004).  The earlier
    setting (12 iterations of 2 prompts at lr 1e-2) passed on seed 0 only: fresh +0.074,
    -0.142, -0.059, -0.118, held-out +0.159, -0.570, -0.478, -0.660 (the step too large); at lr 1e-3 nothing
    moved (within 0.007).  With ``cps`` rollouts (Gaussian log-prob) the run went the other way (-0.47 at lr
    1e-2, about -0.02 at 1e-3: the step size, docs/math.md §6)."""
    from ._pg_helpers import trained_vs_lr0

    argv = [*JPEG_RUN, "--log.progress", "false", "--eval.num-prompts", "32"]
    argv += ["--sample.prompts-per-iter", "8"]
    means, heldout = trained_vs_lr0(d3po, _trainer, tmp_path, argv, "3e-3", iters=20)
    print(f"d3po fresh rollouts {means}, held-out {heldout}")
    assert means["trained"] - means["control"] > 0.01, means
