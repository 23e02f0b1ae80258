"""CUDA-graph cache: CPU behaviour and env switches here; capture / replay on a GPU (``@pytest.mark.gpu``)."""

import warnings

import pytest
import torch

from engine import GraphCache, RolloutEngine
from engine.graphs import graphs_enabled_by_env, max_graphs_from_env
from models.conditioning import Conditioning


def test_env_switches(monkeypatch):
    monkeypatch.delenv("NFT_CUDA_GRAPHS", raising=False)
    monkeypatch.delenv("NFT_MAX_GRAPHS", raising=False)
    assert graphs_enabled_by_env() and max_graphs_from_env() == 16
    assert GraphCache().enabled and GraphCache().max_graphs == 16
    monkeypatch.setenv("NFT_CUDA_GRAPHS", "0")
    monkeypatch.setenv("NFT_MAX_GRAPHS", "3")
    assert not GraphCache().enabled and GraphCache().max_graphs == 3
    assert GraphCache(enabled=True, max_graphs=5).enabled
    monkeypatch.setenv("NFT_MAX_GRAPHS", "zero")
    with pytest.raises(ValueError, match="NFT_MAX_GRAPHS"):
        GraphCache()
    with pytest.raises(ValueError, match="max_graphs"):
        GraphCache(max_graphs=0)


def test_cpu_inputs_run_eagerly_every_call():
    cache = GraphCache(enabled=True)
    calls = []

    def fn(inputs):
        calls.append(1)
        return {"y": inputs["x"] * 2}

    x = torch.arange(4.0)
    for _ in range(3):
        out = cache.run(("k",), fn, {"x": x})
        assert torch.equal(out["y"], x * 2)
    assert len(calls) == 3 and len(cache) == 0 and not cache.active({"x": x})


# ------------------------------------------------------------------------------------------------ GPU
class ConvDenoiser(torch.nn.Module):
    prediction_type = "flow"

    def __init__(self, channels=4, sync=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = torch.nn.Linear(16, channels)
        self.adapter = "default"
        self.sync = sync

    def graph_key(self):
        return self.adapter

    def forward(self, x, timestep, cond):
        if self.sync:
            _ = timestep[0].item()  # a host read: not capturable
        scale = 1.0 + (timestep / 1000.0).reshape(-1, 1, 1, 1)
        bias = self.emb(cond.pooled_embeds)[:, :, None, None]
        out = self.conv(x) * scale + bias
        return out * (2.0 if self.adapter == "other" else 1.0)


def _cond(batch, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    c = Conditioning(torch.randn(batch, 5, 16, generator=g), torch.randn(batch, 16, generator=g))
    return c.to(device)


def _both(solver, batch=3, **kw):
    den = ConvDenoiser().cuda()
    kw = {"num_steps": 6, "latent_shape": (4, 8, 8), "solver": solver, "seed": list(range(batch)), **kw}
    graphed = RolloutEngine(cuda_graphs=True)
    eager = RolloutEngine(cuda_graphs=False)
    return den, graphed, graphed.rollout(den, _cond(batch), **kw), eager.rollout(den, _cond(batch), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["dpm2", "euler", "flow-sde", "cps"])
def test_graph_replay_equals_eager(solver):
    stochastic = solver in ("flow-sde", "cps")
    den, eng, g, e = _both(solver, return_trajectory=True, return_log_probs=stochastic, guidance_scale=1.0)
    assert eng.graphs.captures >= 1, "nothing was captured"
    torch.testing.assert_close(g.trajectory, e.trajectory, rtol=1e-6, atol=1e-6)
    if stochastic:
        torch.testing.assert_close(g.log_probs, e.log_probs, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_graph_replay_with_cfg_equals_eager():
    den = ConvDenoiser().cuda()
    kw = {
        "num_steps": 5,
        "latent_shape": (4, 8, 8),
        "solver": "dpm2",
        "seed": [1, 2],
        "guidance_scale": 3.0,
        "uncond": _cond(2, seed=9),
    }
    eng = RolloutEngine(cuda_graphs=True)
    g = eng.rollout(den, _cond(2), **kw)
    e = RolloutEngine(cuda_graphs=False).rollout(den, _cond(2), **kw)
    assert eng.graphs.captures >= 1
    torch.testing.assert_close(g.x0, e.x0, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_one_graph_serves_every_step_seed_and_schedule():
    den = ConvDenoiser().cuda()
    eng = RolloutEngine(cuda_graphs=True)
    kw = {"num_steps": 6, "latent_shape": (4, 8, 8), "solver": "flow-sde", "return_log_probs": True}
    a = eng.rollout(den, _cond(3), seed=[1, 2, 3], **kw)
    captured = eng.graphs.captures
    assert captured == 1  # every step of a flow-sde rollout replays the same SDE graph
    b = eng.rollout(den, _cond(3), seed=[4, 5, 6], **kw)
    c = eng.rollout(den, _cond(3), seed=[1, 2, 3], shift=1.0, **kw)
    d = eng.rollout(den, _cond(3, seed=5), seed=[1, 2, 3], **kw)
    assert eng.graphs.captures == captured  # static buffers: no recapture for a new seed, sigma or cond
    assert not torch.allclose(a.x0, b.x0, atol=1e-3)  # the seed buffer is read at replay
    assert not torch.allclose(a.x0, c.x0, atol=1e-3)  # so are sigma / sigma_next / timestep
    assert not torch.allclose(a.x0, d.x0, atol=1e-3)  # and the conditioning
    again = eng.rollout(den, _cond(3), seed=[1, 2, 3], **kw)
    assert torch.equal(again.x0, a.x0)
    eager = RolloutEngine(cuda_graphs=False)
    for out, kwargs in ((b, {"seed": [4, 5, 6]}), (c, {"seed": [1, 2, 3], "shift": 1.0})):
        torch.testing.assert_close(
            out.x0, eager.rollout(den, _cond(3), **kwargs, **kw).x0, rtol=1e-6, atol=1e-6
        )


@pytest.mark.gpu
def test_number_of_graphs_is_capped():
    den = ConvDenoiser().cuda()
    eng = RolloutEngine(cuda_graphs=True, max_graphs=2)
    eager = RolloutEngine(cuda_graphs=False)
    for batch in (1, 2, 3, 4, 2, 1):
        kw = {"num_steps": 3, "latent_shape": (4, 8, 8), "solver": "euler", "seed": list(range(batch))}
        g = eng.rollout(den, _cond(batch), **kw)
        assert len(eng.graphs) <= 2
        torch.testing.assert_close(g.x0, eager.rollout(den, _cond(batch), **kw).x0, rtol=1e-6, atol=1e-6)
    assert eng.graphs.evictions >= 2 and eng.graphs.captures >= 4


@pytest.mark.gpu
def test_adapter_switch_gets_its_own_graph():
    den = ConvDenoiser().cuda()
    eng = RolloutEngine(cuda_graphs=True)
    kw = {"num_steps": 3, "latent_shape": (4, 8, 8), "solver": "euler", "seed": [1]}
    a = eng.rollout(den, _cond(1), **kw)
    n = eng.graphs.captures
    den.adapter = "other"
    b = eng.rollout(den, _cond(1), **kw)
    assert eng.graphs.captures == n + 1 and not torch.allclose(a.x0, b.x0)
    torch.testing.assert_close(b.x0, RolloutEngine(cuda_graphs=False).rollout(den, _cond(1), **kw).x0)


@pytest.mark.gpu
def test_capture_failure_falls_back_to_eager_and_warns_once():
    den = ConvDenoiser(sync=True).cuda()
    eng = RolloutEngine(cuda_graphs=True)
    kw = {"num_steps": 4, "latent_shape": (4, 8, 8), "solver": "dpm2", "seed": [1, 2]}
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        g = eng.rollout(den, _cond(2), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g2 = eng.rollout(den, _cond(2), **kw)
    e = RolloutEngine(cuda_graphs=False).rollout(den, _cond(2), **kw)
    assert len(eng.graphs) == 0
    torch.testing.assert_close(g.x0, e.x0, rtol=1e-6, atol=1e-6)
    assert torch.equal(g.x0, g2.x0)


@pytest.mark.gpu
def test_env_switch_turns_graphs_off(monkeypatch):
    monkeypatch.setenv("NFT_CUDA_GRAPHS", "0")
    den = ConvDenoiser().cuda()
    eng = RolloutEngine()
    eng.rollout(den, _cond(2), num_steps=3, latent_shape=(4, 8, 8), solver="euler", seed=[1, 2])
    assert eng.graphs.captures == 0 and len(eng.graphs) == 0
