"""models.lora: adapters, reference = adapters disabled, copy / EMA math, eval EMA, diffusers save/load."""

import pytest
import torch

import models
from models import lora


def _inputs(batch=2):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    cond = models.Conditioning(torch.randn(batch, 7, 32, generator=g), torch.randn(batch, 32, generator=g))
    return x, torch.tensor([800.0, 200.5])[:batch], cond


def _perturb(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, adapter):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _run(model, inputs):
    with torch.no_grad():
        return models.as_denoiser(model)(*inputs)


@pytest.fixture
def sd3():
    return models.load_transformer("sd3-tiny", seed=0)


def test_add_adapters_layout(sd3):
    n_base = sum(p.numel() for p in sd3.parameters())
    lora.add_adapters(sd3, rank=4, alpha=8)
    assert lora.adapter_names(sd3) == ["default", "old"]
    assert sd3.peft_config["default"].lora_alpha / sd3.peft_config["default"].r == 2.0
    trainable = {n for n, p in sd3.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    n_default, n_old = len(lora.adapter_parameters(sd3, "default")), len(lora.adapter_parameters(sd3, "old"))
    assert len(trainable) == n_default == n_old
    # the math.md §2 targets, and nothing else (attn2 of the dual-attention block is not a target)
    targeted = {n.split(".lora_A.")[0].split(".", 2)[-1] for n in trainable if ".lora_A." in n}
    assert targeted == set(lora.SD3_TARGET_MODULES)
    assert not any("attn2" in n for n in trainable)
    # old starts as an exact copy of default; gaussian init: A random, B zero
    for a, b in zip(lora.adapter_parameters(sd3, "default"), lora.adapter_parameters(sd3, "old"),
                    strict=True):
        assert torch.equal(a, b)
    a_weights = [p for n, p in sd3.named_parameters() if ".lora_A.default" in n]
    assert all(p.abs().sum() > 0 for p in a_weights)
    assert all(torch.count_nonzero(p) == 0 for n, p in sd3.named_parameters() if ".lora_B." in n)
    assert sum(p.numel() for p in sd3.parameters()) > n_base


def test_add_adapters_errors(sd3):
    with pytest.raises(ValueError, match="adapters: expected distinct"):
        lora.add_adapters(sd3, adapters=("a", "a"))
    lora.add_adapters(sd3, rank=2, alpha=2)
    with pytest.raises(ValueError, match=r"adapters: expected new names, got \['default', 'old'\]"):
        lora.add_adapters(sd3)
    with pytest.raises(ValueError, match="name: expected one of the model's adapters"):
        with lora.use_adapter(sd3, "nope"):
            pass
    with pytest.raises(ValueError, match="target_modules: expected a list for a Linear"):
        lora.add_adapters(torch.nn.Linear(2, 2))


def test_reference_old_and_default_outputs(sd3):
    inputs = _inputs()
    base = _run(sd3, inputs)
    lora.add_adapters(sd3, rank=4, alpha=8)
    torch.testing.assert_close(_run(sd3, inputs), base, rtol=0, atol=0)  # B = 0: adapters are no-ops at init
    _perturb(sd3, "default", seed=1)
    v = _run(sd3, inputs)
    assert (v - base).abs().max() > 1e-3
    with lora.adapters_disabled(sd3):
        torch.testing.assert_close(_run(sd3, inputs), base, rtol=0, atol=0)
    with lora.use_adapter(sd3, "old"):
        torch.testing.assert_close(_run(sd3, inputs), base, rtol=0, atol=0)  # old is still the init copy
    torch.testing.assert_close(_run(sd3, inputs), v, rtol=0, atol=0)  # restored on exit
    lora.copy_adapter(sd3)
    with lora.use_adapter(sd3, "old"):
        torch.testing.assert_close(_run(sd3, inputs), v, rtol=0, atol=0)
    _perturb(sd3, "old", seed=9)
    lora.set_active_adapter(sd3, "old")
    v_old = _run(sd3, inputs)
    assert not torch.equal(v_old, v)
    with lora.use_adapter(sd3, "default"):
        torch.testing.assert_close(_run(sd3, inputs), v, rtol=0, atol=0)
    torch.testing.assert_close(_run(sd3, inputs), v_old, rtol=0, atol=0)
    lora.set_active_adapter(sd3, "default")
    # switching never touches requires_grad (peft's set_adapter / enable_adapters would)
    assert all(p.requires_grad == (".default." in n) for n, p in sd3.named_parameters())


def test_gradients_reach_only_default(sd3):
    lora.add_adapters(sd3, rank=4, alpha=8)
    _perturb(sd3, "default", seed=1)
    x, t, cond = _inputs()
    den = models.as_denoiser(sd3)
    with lora.use_adapter(sd3, "old"), torch.no_grad():
        v_old = den(x, t, cond)
    den(x, t, cond).sub(v_old).square().mean().backward()
    grads = {n: p.grad for n, p in sd3.named_parameters()}
    assert all(g is not None for n, g in grads.items() if ".default." in n)
    assert all(g is None for n, g in grads.items() if ".default." not in n)


def test_ema_update_adapter_math(sd3):
    lora.add_adapters(sd3, rank=4, alpha=8)
    _perturb(sd3, "default", seed=1)
    _perturb(sd3, "old", seed=2)
    base = {n: p.clone() for n, p in sd3.named_parameters() if "lora_" not in n}
    default = [p.clone() for p in lora.adapter_parameters(sd3, "default")]
    old = [p.clone() for p in lora.adapter_parameters(sd3, "old")]
    d = 0.3
    lora.ema_update_adapter(sd3, d)
    for p, po, pd in zip(lora.adapter_parameters(sd3, "old"), old, default, strict=True):
        torch.testing.assert_close(p, d * po + (1 - d) * pd, rtol=1e-6, atol=1e-7)
    for p, pd in zip(lora.adapter_parameters(sd3, "default"), default, strict=True):
        assert torch.equal(p, pd)  # src untouched
    assert all(torch.equal(p, base[n]) for n, p in sd3.named_parameters() if "lora_" not in n)
    lora.ema_update_adapter(sd3, 1.0)  # d = 1 keeps old
    for p, po, pd in zip(lora.adapter_parameters(sd3, "old"), old, default, strict=True):
        torch.testing.assert_close(p, d * po + (1 - d) * pd, rtol=1e-6, atol=1e-7)
    lora.ema_update_adapter(sd3, 0.0)  # d = 0 is a copy
    for p, pd in zip(lora.adapter_parameters(sd3, "old"), default, strict=True):
        assert torch.equal(p, pd)
    with pytest.raises(ValueError, match="decay: expected a value in"):
        lora.ema_update_adapter(sd3, 1.5)


def test_old_adapter_decay_schedule():
    assert lora.old_adapter_decay(0) == 0.0
    assert lora.old_adapter_decay(100) == pytest.approx(0.1)
    assert lora.old_adapter_decay(10_000) == 0.5
    assert lora.old_adapter_decay(5, flat=10) == 0.0


def test_three_adapters_copy_targets_only_dst(sd3):
    lora.add_adapters(sd3, rank=2, alpha=2, adapters=("default", "old", "ema"))
    _perturb(sd3, "default", seed=3)
    ema_before = [p.clone() for p in lora.adapter_parameters(sd3, "ema")]
    lora.copy_adapter(sd3, src="default", dst="old")
    for a, b in zip(lora.adapter_parameters(sd3, "default"), lora.adapter_parameters(sd3, "old"),
                    strict=True):
        assert torch.equal(a, b)
    for p, before in zip(lora.adapter_parameters(sd3, "ema"), ema_before, strict=True):
        assert torch.equal(p, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_ema(dtype):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g).to(dtype)),
              torch.nn.Parameter(torch.randn(7, generator=g).to(dtype))]
    ema = lora.EMA(params)
    expected = [p.detach().float().clone() for p in params]
    for s in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g).to(dtype))
        d = ema.update()
        step = s + 1  # the optimizer steps taken, the one just taken included (the reference's count)
        assert d == pytest.approx(min((1 + step) / (10 + step), 0.9))
        expected = [d * e + (1 - d) * p.detach().float() for e, p in zip(expected, params, strict=True)]
    for s, e in zip(ema.shadow, expected, strict=True):
        assert s.dtype == torch.float32
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)
    assert ema.decay(step=1000) == 0.9
    current = [p.detach().clone() for p in params]
    with ema.average_parameters():
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.detach(), e.to(dtype))
    for p, c in zip(params, current, strict=True):
        assert torch.equal(p, c)
    other = lora.EMA([torch.zeros(5, 3), torch.zeros(7)])
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 4
    for a, b in zip(other.shadow, ema.shadow, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"state\[.shadow.\]: expected 1 tensors.*got 2"):
        lora.EMA([torch.zeros(2)]).load_state_dict(ema.state_dict())


def test_eval_ema_of_adapter(sd3):
    lora.add_adapters(sd3, rank=2, alpha=4)
    ema = lora.EMA(p for p in sd3.parameters() if p.requires_grad)
    _perturb(sd3, "default", seed=4)
    ema.update()
    inputs = _inputs()
    with ema.average_parameters():
        averaged = _run(sd3, inputs)
    assert not torch.equal(averaged, _run(sd3, inputs))


@pytest.mark.parametrize("preset", ["sd3-tiny", "flux-tiny"])
def test_save_load_into_fresh_diffusers_model(tmp_path, preset):
    model = models.load_transformer(preset, seed=0)
    lora.add_adapters(model, rank=4, alpha=8)
    _perturb(model, "default", seed=1)
    _perturb(model, "old", seed=2)
    inputs = _inputs()
    want = _run(model, inputs)
    file = lora.save_lora(model, tmp_path, adapter="default")
    assert file.name == "pytorch_lora_weights.safetensors" and file.is_file()

    # a fresh model (same base weights) loads it with diffusers' own loader and reproduces the outputs
    fresh = models.load_transformer(preset, seed=0)
    fresh.load_lora_adapter(str(tmp_path), prefix="transformer", adapter_name="trained",
                            weight_name=file.name)
    torch.testing.assert_close(_run(fresh, inputs), want, rtol=1e-5, atol=1e-6)

    # our loader into a fresh model, and into an existing adapter (resume)
    fresh2 = lora.load_lora(models.load_transformer(preset, seed=0), tmp_path)
    torch.testing.assert_close(_run(fresh2, inputs), want, rtol=1e-5, atol=1e-6)
    lora.load_lora(model, tmp_path, adapter="old")
    with lora.use_adapter(model, "old"):
        torch.testing.assert_close(_run(model, inputs), want, rtol=0, atol=0)


def test_save_keys_are_pipeline_format(tmp_path, sd3):
    from diffusers import StableDiffusion3Pipeline

    lora.add_adapters(sd3, rank=2, alpha=4)
    lora.save_lora(sd3, tmp_path)
    state = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path))
    state = state[0] if isinstance(state, tuple) else state
    assert state and all(k.startswith("transformer.") and ".lora_" in k for k in state)
    assert not any(".default." in k or ".old." in k for k in state)


def test_load_missing_file(tmp_path, sd3):
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        lora.load_lora(sd3, tmp_path)


@pytest.mark.parametrize("preset", ["sd3-tiny", "flux-tiny"])
def test_per_sample_lora_grads_on_diffusers_transformers(preset):
    """On the diffusers SD3 and FLUX transformers (joint attention, FLUX's single-stream blocks over the
    concatenated tokens), one backward inside ``per_sample_lora_grads`` gives each sample the gradient of its
    own loss term through the same batch, and the adapter's own gradient is unchanged."""
    model = models.load_transformer(preset, seed=0)
    lora.add_adapters(model, rank=4, alpha=8)
    _perturb(model, "default", seed=1)  # B away from 0, so lora_A gets a gradient too
    g = torch.Generator().manual_seed(7)
    b = 3
    x = torch.randn(b, 4, 16, 16, generator=g)
    cond = models.Conditioning(torch.randn(b, 7, 32, generator=g), torch.randn(b, 32, generator=g))
    t = torch.tensor([800.0, 200.5, 500.0])
    params = lora.adapter_parameters(model, "default")
    den = models.as_denoiser(model)

    def terms():
        out = den(x, t, cond).float()
        return (out.flatten(1) ** 2).mean(1) * torch.tensor([1.0, 2.0, 0.5])

    def grad_of(loss):
        for p in params:
            p.grad = None
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params])

    with lora.use_adapter(model, "default"):
        own = [grad_of(terms()[i]) for i in range(b)]
        plain = grad_of(terms().sum())
        for p in params:
            p.grad = None
        with lora.per_sample_lora_grads(model, b) as ps:
            terms().sum().backward()
    assert {id(p) for p in ps.params} == {id(p) for p in params}
    order = {id(p): j for j, p in enumerate(ps.params)}
    per = ps.grads()
    for i in range(b):
        mine = torch.cat([per[order[id(p)]][i].flatten() for p in params])
        assert own[i].abs().max() > 0
        torch.testing.assert_close(mine, own[i], rtol=1e-4, atol=1e-6 * float(own[i].abs().max()))
    batched = torch.cat([p.grad.flatten() for p in params])
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-7 * float(plain.abs().max()))
