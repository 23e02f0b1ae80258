import pytest
import torch

import engine.profiling as profiling
from engine import nvtx_range, rollout

from ._analytic import GaussianFlowDenoiser, dummy_cond


class Recorder:
    def __init__(self):
        self.events = []

    def push_range(self, message=None, color=None, domain=None):
        self.events.append(("push", message, domain))

    def pop_range(self, domain=None):
        self.events.append(("pop", domain))


def test_nvtx_range_pushes_and_pops(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(profiling, "_nvtx", rec)
    monkeypatch.delenv("NFT_NVTX", raising=False)
    with nvtx_range("reward"):
        with nvtx_range("reward/clip"):
            pass
    assert rec.events == [
        ("push", "reward", "nft_engine"),
        ("push", "reward/clip", "nft_engine"),
        ("pop", "nft_engine"),
        ("pop", "nft_engine"),
    ]
    with pytest.raises(RuntimeError), nvtx_range("train"):
        raise RuntimeError("boom")
    assert rec.events[-1] == ("pop", "nft_engine")  # popped even on error


def test_rollout_is_wrapped_in_ranges(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(profiling, "_nvtx", rec)
    rollout(
        GaussianFlowDenoiser(0.0, 1.0), dummy_cond(2), num_steps=3, latent_shape=(1, 2, 2), solver="euler"
    )
    pushed = [e[1] for e in rec.events if e[0] == "push"]
    assert pushed == ["rollout/euler", "rollout/step 0", "rollout/step 1", "rollout/step 2"]
    assert sum(e[0] == "pop" for e in rec.events) == 4


def test_no_op_without_package_or_when_disabled(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(profiling, "_nvtx", rec)
    monkeypatch.setenv("NFT_NVTX", "0")
    with nvtx_range("x"):
        pass
    assert rec.events == [] and not profiling.nvtx_available()
    monkeypatch.delenv("NFT_NVTX")
    monkeypatch.setattr(profiling, "_nvtx", None)
    with nvtx_range("x"):
        y = torch.ones(1) + 1
    assert float(y) == 2.0


def test_real_nvtx_package_runs_without_a_profiler():
    pytest.importorskip("nvtx")
    with nvtx_range("engine-test", color="green"):
        pass
