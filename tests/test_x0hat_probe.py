"""bench.x0hat_probe: the last step's one-step prediction is the final sample, so its verdict agrees with the
final one everywhere, and bad options are refused before any work."""

import json

import numpy as np
import torch

from bench import x0hat_probe as probe
from train import reward_model as rm
from train.reward_backprop import RBSampleConfig, make_schedule
from train.spo_scorer import build_embedded


def test_last_step_prediction_is_the_final_sample_and_rows_are_consistent():
    policy, reward = build_embedded(0), rm.GenEvalLearned()
    prompts = rm.draw(rm.heldout_pool(), 6, np.random.default_rng(3))
    seeds = [101 + i for i in range(6)]
    sc = RBSampleConfig(solver="euler", num_steps=4)
    sched = make_schedule(policy, sc, "euler")
    final = probe.x0hat_images(policy, sched, sc, prompts, seeds, None, batch=4)
    last = probe.x0hat_images(policy, sched, sc, prompts, seeds, 3, batch=4)
    # the Euler step to sigma 0 is x - sigma v, the same expression as x0_hat (fp32 rounding only)
    torch.testing.assert_close(last, final, rtol=0, atol=1e-5)
    res = probe.run(policy, reward, prompts, seeds, num_steps=4, batch=4, say=lambda *a, **k: None)
    assert [r["step"] for r in res["steps"]] == [0, 1, 2, 3]
    assert res["steps"][-1]["agree"] == 1.0
    assert res["steps"][-1]["pass"] == res["final"]["pass"]
    for r in res["steps"]:
        assert 0.0 <= r["pass"] <= 1.0 and 0.0 <= r["agree"] <= 1.0 and 0.0 < r["learned"] < 1.0
    json.dumps(res)


def test_bad_options_are_refused(capsys):
    assert probe.main(["--n", "0"]) == 2
    assert "--n: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert probe.main(["--num-steps", "1"]) == 2
    assert "--num-steps: expected an integer >= 2, got 1" in capsys.readouterr().err
