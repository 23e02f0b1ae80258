"""python -m train.make_pairs and make_pairs_from_rollouts: on the embedded default with a tiny budget the
written pairs re-score (GenEval-mini on the PNG files) to the recorded rewards, winner above loser; --labels
writes the same images as KTO labels; the in-memory pairs are the best and worst of the documented seeds, ties
left out; a --model run writes its VAE's images; bad input is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kernels
import train.make_pairs as mp
from train.data import parse_prompt
from train.data.preference import LabelRecord, PairRecord, load_image, read_preference_jsonl
from train.rewards.geneval_mini import GenEvalMini

TINY = ["--num-prompts", "8", "--k", "4", "--num-steps", "4", "--threads", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory):
    """One make_pairs run, with the PyTorch reference kernels that tests/train/conftest.py sets for each
    test (a module fixture runs outside it): a test's --labels run must draw these images, byte for byte."""
    out = tmp_path_factory.mktemp("pairs") / "out"
    with kernels.use_backend("reference"):
        assert mp.main(["--out", str(out), *TINY]) == 0
    return out


def test_pairs_rescore_to_their_rewards(pairs_run, capsys):
    records = read_preference_jsonl(pairs_run / "pairs.jsonl")
    stats = json.loads((pairs_run / "make_pairs.json").read_text())["stats"]
    assert stats["prompts"] == 8 and stats["pairs"] == len(records) >= 1
    assert stats["pairs"] + stats["ties"] == 8
    assert all(isinstance(r, PairRecord) for r in records)
    scorer = GenEvalMini()
    winners = torch.stack([load_image(r.winner) for r in records])
    losers = torch.stack([load_image(r.loser) for r in records])
    prompts = [parse_prompt(r.prompt) for r in records]
    rw, rl = scorer.score(winners, prompts)["strict"], scorer.score(losers, prompts)["strict"]
    assert (rw > rl).all(), (rw, rl)
    assert rw.tolist() == [r.meta["reward_winner"] for r in records]
    assert rl.tolist() == [r.meta["reward_loser"] for r in records]
    gap = sum(r.meta["reward_winner"] - r.meta["reward_loser"] for r in records) / len(records)
    assert stats["mean_gap"] == pytest.approx(gap)
    assert winners.shape[1:] == (3, 32, 32)


def test_labels_hold_the_same_images(pairs_run, tmp_path):
    out = tmp_path / "labels"
    assert mp.main(["--out", str(out), "--labels", *TINY]) == 0
    labels = read_preference_jsonl(out / "labels.jsonl")
    pairs = read_preference_jsonl(pairs_run / "pairs.jsonl")
    assert not (out / "pairs.jsonl").exists() and all(isinstance(r, LabelRecord) for r in labels)
    assert [r.desirable for r in labels] == [True, False] * len(pairs)
    for p, (w, l_) in zip(pairs, zip(labels[::2], labels[1::2], strict=True), strict=True):
        assert w.prompt == l_.prompt == p.prompt
        assert w.image.read_bytes() == p.winner.read_bytes() and l_.image.read_bytes() == p.loser.read_bytes()
        assert w.meta["reward"] == p.meta["reward_winner"] and l_.meta["seed"] == p.meta["seed_loser"]


def test_out_dir_with_pairs_needs_overwrite(pairs_run, capsys):
    before = (pairs_run / "pairs.jsonl").read_bytes()
    assert mp.main(["--out", str(pairs_run), *TINY]) == 2
    err = capsys.readouterr().err
    assert "--out: expected a new or empty directory" in err and "pass --overwrite" in err
    assert (pairs_run / "pairs.jsonl").read_bytes() == before


class _Brightness:
    """A reward with known values: the mean pixel, except 0 for every sample of ``tied`` prompts."""

    def __init__(self, tied=()):
        self.tied = set(tied)

    def __call__(self, images, prompts):
        r = images.float().mean(dim=(1, 2, 3))
        mask = torch.tensor([str(p) in self.tied for p in prompts])
        return torch.where(mask, torch.zeros_like(r), r), {}


@pytest.fixture(scope="module")
def policy():
    from train.policy import ModelConfig, build_policy

    return build_policy(ModelConfig(), preset="tiny", model_path=None, device=torch.device("cpu"), seed=0)


@pytest.fixture
def one_thread():
    """One torch thread, as the CLI runs take with --threads 1 (two threads on a shared CPU are slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rollout_pairs_are_best_and_worst_of_the_seeds(policy, one_thread):
    from train.common import derive_seed

    prompts = policy.sample_train_prompts(3, 0)
    tied = str(prompts[1])
    pairs = mp.make_pairs_from_rollouts(policy, _Brightness([tied]), prompts, 4, 11, num_steps=3, batch=5)
    assert [str(p.prompt) for p in pairs] == [str(prompts[0]), str(prompts[2])]  # the tie left out
    for pair, i in zip(pairs, (0, 2), strict=True):
        seeds = [derive_seed(11, "make_pairs", i, j) for j in range(4)]
        x0 = policy.sample([prompts[i]] * 4, seeds, solver="dpm2", num_steps=3)
        r = policy.decode(x0).mean(dim=(1, 2, 3))
        torch.testing.assert_close(pair.x0_w, x0[r.argmax()], rtol=0, atol=1e-5)
        torch.testing.assert_close(pair.x0_l, x0[r.argmin()], rtol=0, atol=1e-5)
        assert pair.r_w == pytest.approx(float(r.max()), abs=1e-5) and pair.r_w > pair.r_l
    stats = mp.pair_statistics(pairs, len(prompts))
    assert stats["ties"] == 1 and stats["mean_gap"] == pytest.approx(sum(p.r_w - p.r_l for p in pairs) / 2)
    again = mp.make_pairs_from_rollouts(policy, _Brightness([tied]), prompts, 4, 11, num_steps=3, batch=16)
    torch.testing.assert_close(again[0].x0_w, pairs[0].x0_w, rtol=0, atol=1e-5)  # batching does not matter
    other = mp.make_pairs_from_rollouts(policy, _Brightness([tied]), prompts, 4, 12, num_steps=3)
    assert not torch.equal(other[0].x0_w, pairs[0].x0_w)
    bright = _Brightness([tied])
    kept = mp.make_pairs_from_rollouts(policy, bright, prompts, 4, 11, num_steps=3, keep_ties=True)
    assert [str(p.prompt) for p in kept] == [str(p) for p in prompts] and kept[1].r_w == kept[1].r_l == 0
    seeds = [derive_seed(11, "make_pairs", 1, j) for j in range(2)]
    x0 = policy.sample([prompts[1]] * 2, seeds, solver="dpm2", num_steps=3)
    torch.testing.assert_close(torch.stack([kept[1].x0_w, kept[1].x0_l]), x0[[1, 0]], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="--k: expected an integer >= 2"):
        mp.make_pairs_from_rollouts(policy, _Brightness(), prompts, 1, 0)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--k", "1"], "--k: expected an integer >= 2 (a best and a worst sample), got 1"),
        (["--num-steps", "0"], "--num-steps: expected an integer >= 1, got 0"),
        (["--num-prompts", "-1"], "--num-prompts: expected an integer >= 0"),
        (["--batch", "0"], "--batch: expected an integer >= 1, got 0"),
        (["--solver", "heun"], "--solver: expected one of auto, dpm2, euler, flow-sde, cps, ddim, got 'heun"),
        (["--solver", "ddim"], "--solver: expected dpm2, euler, flow-sde or cps (or auto) for a flow"),
        (["--guidance-scale", "-1"], "--guidance-scale: expected a value >= 0"),
        (["--guidance-scale", "nan"], "--guidance-scale: expected a finite number, got nan"),
        (["--eta", "2"], "--eta: expected a value in [0, 1], got 2.0"),
        (["--shift", "0"], "--shift"),
        (["--reward", "nope"], "--reward: expected names from"),
        (["--tasks", "colours"], "--tasks: expected distinct task types"),
        (["--models.dtype", "int8"], "--models.dtype: expected float32, bfloat16 or float16, got 'int8'"),
        (["--preset", "sd3.5-m"], "--model: expected a local diffusers directory for preset 'sd3.5-m'"),
        (["--k", "two"], "--k: expected a value of type int, got 'two'"),
        (["--models.embedded-dir", "/nonexistent"], "--models.embedded-dir: expected a directory with"),
        (["--prompts", "p.txt"], "--prompts: a --model run's prompt file; the embedded default uses"),
        (["--solver", "dpm2", "--noise-level", "0.9"],
         "--noise-level: acts on the flow-sde and cps rollouts; with --solver dpm2 it changes nothing"),
        (["--models.lora-init", "olora"], "--models.lora-init: expected gaussian"),
        (["--reward-clip-path", "/m/clip"], "--reward-clip-path: the CLIP of the clip_score reward"),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    assert mp.main(["--out", str(out), *argv]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert mp.main(["--out", str(tmp_path / "f")]) == 2
    assert "--out: expected a directory, got the file" in capsys.readouterr().err


def test_model_run_writes_vae_images(tmp_path, capsys):
    """A --model run (a tiny SD3 pipeline; its VAE decodes 8 x 8 latents to 16 px images) with a text-prompt
    reward; the images go through the JSONL reader and the policy's encoder."""
    from tests.models.test_text_vae import _sd3_pipeline

    _sd3_pipeline(tmp_path).save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\n")
    base = ["--model", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"), "--threads", "1",
            "--models.resolution", "16", "--k", "3", "--num-steps", "2", "--num-prompts", "0"]
    assert mp.main([*base, "--out", str(tmp_path / "o")]) == 2
    assert "--reward: expected a reward for a --model run's prompts" in capsys.readouterr().err
    jpeg = ["--reward", "jpeg_compressibility"]
    assert mp.main([*base, "--out", str(tmp_path / "o"), *jpeg, "--models.resolution", "15"]) == 2
    assert "--models.resolution: expected a positive multiple of the VAE factor 2, got 15" in (
        capsys.readouterr().err
    )
    assert mp.main([*base, "--out", str(tmp_path / "o"), "--solver", "ddim", *jpeg]) == 2
    assert "--solver: expected dpm2, euler, flow-sde or cps (or auto) for a flow" in capsys.readouterr().err
    assert mp.main([*base, "--out", str(tmp_path / "o"), *jpeg]) == 0
    records = read_preference_jsonl(tmp_path / "o" / "pairs.jsonl")
    assert [r.prompt for r in records] == ["a red cat", "a blue dog"]  # --num-prompts 0: every prompt once
    assert all(r.meta["reward_winner"] > r.meta["reward_loser"] for r in records)
    assert load_image(records[0].winner).shape == (3, 16, 16)
    assert Path(tmp_path / "o" / "images").is_dir()


def test_all_ties_leave_out_as_it_was(tmp_path, monkeypatch, capsys):
    """A run whose every prompt ties writes nothing, so the same command can run again without --overwrite
    (it left an empty images/ that the next run refused as an earlier output)."""
    import train.rewards.registry as registry

    real = registry.build_reward

    class Constant:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, images, prompts):
            r, parts = self.inner(images, prompts)
            return torch.zeros_like(r), parts

    monkeypatch.setattr(registry, "build_reward", lambda *a, **k: Constant(real(*a, **k)))
    out = tmp_path / "o"
    argv = ["--out", str(out), "--num-prompts", "2", "--k", "2", "--num-steps", "2", "--threads", "1"]
    assert mp.main(argv) == 1
    assert "every one of the 2 prompts gave a tie" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert mp.main(argv) == 1  # refused again for the ties, not for --out
    assert "gave a tie" in capsys.readouterr().err
