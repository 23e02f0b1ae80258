"""The CLIP-based model rewards (pickscore, aesthetic, clip_score) through the registry: built from local
directories named by --reward-paths, refused by name when an entry or file is missing, float32 [B] on the
images' device, batched, differentiable (finite non-zero gradients, gradcheck on the grad path in float64).
Fidelity to the reference scorers: tests/fidelity/test_reward_scorers_clip.py."""

from __future__ import annotations

import pytest
import torch

from train.rewards.registry import build_reward, require_differentiable

from . import _clip_helpers as H


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_rewards")
    H.write_clip(root / "pickscore", seed=1)  # model and processor in one directory
    H.write_clip(root / "aesthetic", projection_dim=768, seed=2)
    H.write_aesthetic_head(root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    H.write_clip(root / "clip", seed=3)
    return root


def _paths(dirs):
    return {"pickscore": str(dirs / "pickscore"), "aesthetic": str(dirs / "aesthetic"),
            "clip_score": str(dirs / "clip")}


@pytest.fixture(scope="module")
def combined(dirs):
    return build_reward("pickscore,aesthetic,clip_score", paths=_paths(dirs), device="cpu")


def test_built_from_reward_paths_and_scores_a_batch(combined):
    assert combined.differentiable
    require_differentiable(combined)  # no error
    x = H.images(3, 40, 48)
    total, comps = combined(x, H.PROMPTS)
    assert set(comps) == {"pickscore", "aesthetic", "clip_score"} and total.shape == (3,)
    for name, v in comps.items():
        assert v.dtype == torch.float32 and v.shape == (3,) and torch.isfinite(v).all(), name
    # the scores depend on the image (all) and on the prompt (the two text-image rewards only)
    flipped = {n: fn(x.flip(0), H.PROMPTS) for n, fn in combined.fns.items()}
    reprompted = {n: fn(x, H.PROMPTS[::-1]) for n, fn in combined.fns.items()}
    for n in comps:
        assert not torch.allclose(comps[n], flipped[n]), n
    assert not torch.allclose(comps["pickscore"], reprompted["pickscore"])
    assert not torch.allclose(comps["clip_score"], reprompted["clip_score"])
    torch.testing.assert_close(comps["aesthetic"], reprompted["aesthetic"], atol=0, rtol=0)


def test_chunked_batches_equal_one_batch(combined):
    x = H.images(5, 32, 32, seed=3)
    prompts = H.PROMPTS + ["a dog", "a tree"]
    for name, fn in combined.fns.items():
        whole = fn(x, prompts)
        fn.batch_size = 2
        try:
            chunked = fn(x, prompts)
        finally:
            fn.batch_size = 32
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5, msg=name)


def test_no_grad_path_unless_images_require_grad(combined):
    """Grad enabled but images without requires_grad: the reference (PIL) path, identical to no_grad."""
    x = H.images(2, 40, 48, seed=9)
    for name, fn in combined.fns.items():
        with torch.no_grad():
            a = fn(x, H.PROMPTS[:2])
        b = fn(x, H.PROMPTS[:2])
        assert not b.requires_grad, name
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_gradients_reach_the_images(combined):
    x = H.images(2, 40, 48, seed=10).requires_grad_(True)
    for name, fn in combined.fns.items():
        x.grad = None
        v = fn(x, H.PROMPTS[:2])
        assert v.requires_grad and v.device == x.device, name
        v.sum().backward()
        g = x.grad
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        # every image gets its own gradient, none leaks to another image
        (g0,) = torch.autograd.grad(fn(x, H.PROMPTS[:2])[0], x)
        assert g0[0].abs().sum() > 0 and g0[1].abs().sum() == 0, name
    # the frozen reward models take no gradient
    for fn in combined.fns.values():
        mods = [fn.clip, fn.mlp] if hasattr(fn, "clip") else [fn.model]
        assert not any(p.requires_grad for m in mods for p in m.parameters())


@pytest.mark.parametrize("name", ["pickscore", "aesthetic", "clip_score"])
def test_gradcheck_grad_path_float64(dirs, name):
    """torch.autograd.gradcheck (fast mode: a random projection of the Jacobian against finite
    differences) on the torch-op path with the model in float64, images kept inside (-1, 1)."""
    fn = build_reward(name, paths=_paths(dirs), device="cpu").fns[name]
    for m in ([fn.clip, fn.mlp] if name == "aesthetic" else [fn.model]):
        m.double()
    x = H.images(1, 36, 40, seed=11).double().mul(0.9).requires_grad_(True)
    prompts = H.PROMPTS[:1]
    assert torch.autograd.gradcheck(lambda im: fn._score(im, prompts), (x,), eps=1e-6, atol=1e-5, rtol=1e-3,
                                    fast_mode=True)


@pytest.mark.parametrize(
    "name, paths, err, needle",
    [
        ("pickscore", {}, ValueError, "--reward-paths: expected pickscore=DIR"),
        ("aesthetic", {}, ValueError, "--reward-paths: expected aesthetic=DIR"),
        ("pickscore", {"pickscore": "{tmp}/nope"}, FileNotFoundError, "pickscore=DIR to be a directory"),
        ("pickscore", {"pickscore": "{aes}", "pickscore_processor": "{tmp}"}, FileNotFoundError,
         "preprocessor_config.json"),
        ("pickscore", {"pickscore": "{tmp}/model_only"}, FileNotFoundError, "pickscore_processor=DIR"),
        ("aesthetic", {"aesthetic": "{clip}"}, FileNotFoundError, "aesthetic_head=FILE"),
        ("aesthetic", {"aesthetic": "{clip}", "aesthetic_head": "{aes}/sac+logos+ava1-l14-linearMSE.pth"},
         ValueError, "projection_dim=8"),
        ("aesthetic", {"aesthetic": "{aes}", "aesthetic_head": "{tmp}/bad.pth"}, ValueError,
         "aesthetic head's state dict"),
        ("clip_score", {}, ValueError, "--reward-clip-path"),
        ("clip_score", {"clip_score": "{tmp}"}, FileNotFoundError, "preprocessor_config.json"),
    ],
)
def test_missing_or_wrong_paths_refused_by_name(dirs, tmp_path, name, paths, err, needle):
    H.write_clip(tmp_path / "model_only", processor=False, tokenizer=False)
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    fmt = {"tmp": str(tmp_path), "aes": str(dirs / "aesthetic"), "clip": str(dirs / "clip")}
    paths = {k: v.format(**fmt) for k, v in paths.items()}
    with pytest.raises(err, match=needle.replace("(", r"\(").replace("+", r"\+")):
        build_reward(name, paths=paths, device="cpu")


def test_clip_score_path_options_agree(dirs):
    a = build_reward("clip_score", clip_path=str(dirs / "clip"), device="cpu")
    b = build_reward("clip_score", paths={"clip_score": str(dirs / "clip")}, device="cpu")
    x = H.images(2, 32, 32)
    torch.testing.assert_close(a(x, H.PROMPTS[:2])[0], b(x, H.PROMPTS[:2])[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="--reward-clip-path: expected the same directory"):
        build_reward("clip_score", clip_path=str(dirs / "clip"),
                     paths={"clip_score": str(dirs / "pickscore")})


def test_every_path_checked_before_any_model_loads(dirs, monkeypatch):
    """A bad entry for a later reward is refused before an earlier one's (large) model is loaded."""
    import train.rewards.clip_models as cm

    loaded = []
    monkeypatch.setattr(cm, "PickScore", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError, match="--reward-paths: expected aesthetic=DIR"):
        build_reward("pickscore,aesthetic", paths={"pickscore": str(dirs / "pickscore")}, device="cpu")
    with pytest.raises(ValueError, match="--reward-clip-path"):
        build_reward("pickscore,clip_score", paths={"pickscore": str(dirs / "pickscore")}, device="cpu")
    assert loaded == []
