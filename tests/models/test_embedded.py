"""The embedded default model: shipped checkpoint, prompt encoding, denoiser, a pretraining smoke run."""

import json

import pytest
import torch

from models.conditioning import Conditioning
from models.embedded import DEFAULT_DIR, EmbeddedDefault, load_default, tokenize
from models.embedded.vocab import BOS_ID, PAD_ID


@pytest.fixture(scope="module")
def model():
    return load_default()


def test_shipped_checkpoint_is_small_and_documented():
    weights = DEFAULT_DIR / "default.safetensors"
    assert weights.exists() and weights.stat().st_size < 8 * 2**20
    record = json.loads((DEFAULT_DIR / "pretrain.json").read_text())
    assert record["command"].startswith("python -m train.pretrain") and record["steps"] > 0


def test_loads_frozen_in_eval_mode(model):
    assert isinstance(model, EmbeddedDefault)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    names = {n for n, _ in model.transformer.named_modules()}
    for target in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj"):
        assert any(n.endswith(target) for n in names), target
    assert model.transformer.config.in_channels == 3 and model.transformer.config.sample_size == 32


def test_tokenizer():
    ids = tokenize(["a red circle", ""], max_length=10)
    assert ids.shape == (2, 10) and ids[0, 0] == BOS_ID and ids[1, 0] == BOS_ID
    assert (ids[1, 1:] == PAD_ID).all() and (ids[0, 4:] == PAD_ID).all()
    with pytest.raises(ValueError, match="purple"):
        tokenize(["a purple circle"], max_length=10)
    with pytest.raises(ValueError, match="at most"):
        tokenize(["a " * 12], max_length=10)


def test_encode_shapes_cache_and_empty_prompt(model):
    cond = model.encode(["a red circle", "", "a red circle left of a blue square"])
    assert isinstance(cond, Conditioning)
    assert cond.prompt_embeds.shape == (3, model.config.max_length, model.config.text_dim)
    assert cond.pooled_embeds.shape == (3, model.config.text_dim)
    again = model.encode(["", "a red circle"])
    assert torch.equal(again.prompt_embeds[1], cond.prompt_embeds[0])
    assert torch.equal(again.pooled_embeds[0], cond.pooled_embeds[1])
    assert not torch.allclose(cond.pooled_embeds[0], cond.pooled_embeds[1])
    with pytest.raises(TypeError, match="prompts"):
        model.encode("a red circle")


def test_denoiser_shape_and_determinism(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 32, 32, generator=g)
    t = torch.rand(5, generator=g) * 1000
    cond = model.encode(["a circle", "two squares", "a blue triangle", "", "a green circle and a red square"])
    v1, v2 = model.denoiser(x, t, cond), model.denoiser(x, t, cond)
    assert v1.shape == x.shape and torch.isfinite(v1).all()
    assert torch.equal(v1, v2)
    # the prompt matters
    other = model.encode(["a square"] * 5)
    assert not torch.allclose(v1, model.denoiser(x, t, other))
    with pytest.raises(ValueError, match="timestep"):
        model.denoiser(x, t[:3], cond)
    with pytest.raises(ValueError, match="cond"):
        model.denoiser(x, t, cond[:2])


def _pretrain(argv):
    """``train.pretrain`` with the command line ``argv`` -> the trained model."""
    from train.pretrain import parse_args, pretrain

    return pretrain(parse_args(argv), argv)


def test_pretrain_smoke_writes_loadable_checkpoint_and_loss_falls(tmp_path):
    from train.pretrain import main

    argv = ["--train.steps", "40", "--train.batch-size", "16", "--train.lr", "2e-3", "--train.warmup", "5",
            "--out", str(tmp_path), "--log.every", "1", "--log.file", "--threads", "1", "--seed", "3"]
    assert main(argv) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "pretrain_log.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    loaded = load_default(directory=tmp_path)
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["steps"] == 40 and "--train.steps 40" in record["reproduce"]
    x = torch.randn(2, 3, 32, 32)
    assert loaded.denoiser(x, torch.tensor([500.0, 10.0]), loaded.encode(["a circle", ""])).shape == x.shape


def test_weight_ema_math_and_applied_restores():
    """The weight EMA ``train.pretrain --ema`` uses (``models.EMA``, the NFT loop's evaluation EMA)."""
    from models import EMA

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in net.parameters()]
    ema = EMA(net.parameters(), max_decay=0.9)
    expected = [p.clone() for p in start]
    for step in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ema.update()
        s = step + 1  # optimizer steps including this one, counted from 1 as DiffusionNFT's ema.py does
        d = min(0.9, (1 + s) / (10 + s))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters(), strict=True)]
    for e, s in zip(expected, ema.shadow, strict=True):
        torch.testing.assert_close(s, e)
    own = [p.detach().clone() for p in net.parameters()]
    with ema.average_parameters():
        for p, s in zip(net.parameters(), ema.shadow, strict=True):
            assert torch.equal(p, s)
    for p, o in zip(net.parameters(), own, strict=True):
        assert torch.equal(p, o)


def test_pretrain_architecture_and_ema_flags(tmp_path):
    common = ["--train.steps", "6", "--train.batch-size", "4", "--train.warmup", "2", "--threads", "1"]
    common += ["--seed", "1", "--models.width", "96", "--models.layers", "2"]
    plain = _pretrain([*common, "--out", str(tmp_path / "plain")])
    averaged = _pretrain([*common, "--train.ema", "0.5", "--out", str(tmp_path / "ema")])
    loaded = load_default(directory=tmp_path / "ema")
    tc = loaded.transformer.config
    arch = (tc.num_attention_heads, tc.attention_head_dim, tc.num_layers, tc.caption_projection_dim)
    assert arch == (3, 32, 2, 96)
    for a, b in zip(loaded.state_dict().values(), averaged.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the saved weights are the average the run ended with
    pairs = zip(plain.state_dict().values(), averaged.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    record = json.loads((tmp_path / "ema" / "pretrain.json").read_text())
    assert "--models.width 96 --models.layers 2 --train.ema 0.5" in record["reproduce"]


def test_pretrain_freeze_text_encoder_trains_the_transformer_only(tmp_path):
    from models.embedded import DEFAULT_DIR

    start = load_default()
    model = _pretrain(["--train.steps", "3", "--train.batch-size", "4", "--train.warmup", "1",
                       "--threads", "1", "--seed", "2", "--models.init-from", str(DEFAULT_DIR),
                       "--text.freeze", "--out", str(tmp_path)])
    for (name, a), b in zip(start.text_encoder.state_dict().items(), model.text_encoder.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    pairs = zip(start.transformer.state_dict().values(), model.transformer.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["reproduce"].endswith(" --text.freeze")


def test_text_pretraining_learns_the_structure_of_heldout_prompts():
    """A fresh encoder scores at chance on the structure targets; 300 steps of the text-only objective (a few
    seconds) get the role of every word right on the test split, held-out bags included."""
    from train.pretrain import pretrain_text_encoder

    torch.manual_seed(0)
    encoder = EmbeddedDefault().text_encoder
    before = dict(encoder.state_dict())
    before = {k: v.clone() for k, v in before.items()}
    r = pretrain_text_encoder(encoder, steps=300, seed=0)
    assert r["test_accuracy/role"] == 1.0 and r["test_accuracy/color"] == 1.0, r
    assert min(v for k, v in r.items() if k.startswith("test_accuracy/")) > 0.99, r
    assert any(not torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    with pytest.raises(ValueError, match="steps: expected >= 1"):
        pretrain_text_encoder(encoder, steps=0)


def test_pretrain_text_pretraining_then_frozen_encoder(tmp_path):
    from train.pretrain import pretrain_text_encoder

    common = ["--train.steps", "3", "--train.batch-size", "4", "--train.warmup", "1", "--threads", "1"]
    model = _pretrain([*common, "--seed", "3", "--text.pretrain-steps", "5", "--out", str(tmp_path)])
    torch.manual_seed(3)  # what the run did before its flow-matching steps: fresh model, text pretraining
    expected = EmbeddedDefault().text_encoder
    pretrain_text_encoder(expected, steps=5, seed=3)
    for (name, a), b in zip(expected.state_dict().items(), model.text_encoder.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name  # frozen during flow matching
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["reproduce"].endswith(" --text.pretrain-steps 5 --text.pretrain-lr 0.003")
    assert set(record["text_pretrain"]) >= {"loss", "test_accuracy/role", "minutes"}


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--text.pretrain-steps", "-1"], "--text.pretrain-steps: expected an integer >= 0 (0: off), got -1"),
        (["--text.pretrain-lr", "0"], "--text.pretrain-lr: expected a positive number, got 0.0"),
        (["--models.width", "100"], "--models.width: expected a positive multiple of 32, got 100"),
        (["--models.layers", "0"], "--models.layers: expected >= 1, got 0"),
        (["--train.ema", "1"], "--train.ema: expected a decay in [0, 1), got 1.0"),
        (["--models.width", "96", "--models.init-from", "x"],
         "--models.width: the architecture comes from --models.init-from"),
        (["--models.init-from", "x"], "--models.init-from: expected a directory with default.safetensors"),
        (["--max-minutes", "-1"], "--max-minutes: expected >= 0 (none or 0: no cap), got -1.0"),
        (["--train.caption-noise", "1"], "--train.caption-noise: expected a share in [0, 1), got 1.0"),
        (["--train.caption-noise", "-0.1"], "--train.caption-noise: expected a share in [0, 1), got -0.1"),
        (["--train.time-sampling", "normal"],
         "--train.time-sampling: expected one of uniform, logit-normal, got 'normal'"),
        (["--eval.cfg-scales", "1,-2"],
         "--eval.cfg-scales: expected one or more scales >= 0 (1: CFG-free), got 1,-2"),
        (["--eval.solver", "heun"],
         "--eval.solver: expected a deterministic ODE solver (dpm2 or euler), got 'heun'"),
        (["--log.every", "0"], "--log.every: expected an integer >= 1, got 0"),
        (["--train.lr", "nan"], "--train.lr: expected a finite number, got nan"),
        (["--steps", "5"], "--steps: expected --train.steps (renamed for the dataclass CLI on 2026-12-03"),
        (["--freeze-text-encoder"], "--freeze-text-encoder: expected --text.freeze (renamed"),
        (["--train.step", "5"], "--train.step: unknown option"),
    ],
)
def test_pretrain_rejects_bad_input_before_any_work(argv, match, tmp_path, capsys):
    from train.pretrain import main

    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_grow_depth_is_the_same_function_and_its_copies_start_closed():
    from train.pretrain import grow_depth, model_config

    torch.manual_seed(0)
    model = EmbeddedDefault(model_config(layers=4)).eval().requires_grad_(False)
    grown = grow_depth(model, 8)
    assert grown.transformer.config.num_layers == 8 and len(grown.transformer.transformer_blocks) == 8
    assert not grown.training and not any(p.requires_grad for p in grown.parameters())
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([50.0, 500, 990])
    prompts = ["a red circle left of a blue square", "three triangles", ""]
    with torch.no_grad():
        before = model.denoiser(x, t, model.encode(prompts))
        assert torch.equal(grown.denoiser(x, t, grown.encode(prompts)), before)
    src, new = model.transformer.transformer_blocks, grown.transformer.transformer_blocks
    copies_of = [0, 0, 1, 1, 2, 2, 2, 3]  # the last block stays last; the remainder goes to the later blocks
    for j, i in enumerate(copies_of):
        repeat = j > 0 and copies_of[j - 1] == i
        for (name, a), b in zip(new[j].state_dict().items(), src[i].state_dict().values(), strict=True):
            if repeat and name in ("norm1.linear.weight", "norm1.linear.bias", "norm1_context.linear.weight",
                                   "norm1_context.linear.bias"):
                gates = a.view(6, 64, *a.shape[1:])[[2, 5]]  # gate_msa, gate_mlp rows: zero
                assert not gates.any() and torch.equal(a.view(6, 64, *a.shape[1:])[[0, 1, 3, 4]],
                                                       b.view(6, 64, *b.shape[1:])[[0, 1, 3, 4]])
            else:
                assert torch.equal(a, b), (j, name)
    assert grow_depth(model, 4).state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="layers: expected >= the model's 4 blocks, got 3"):
        grow_depth(model, 3)


def test_pretrain_init_from_with_layers_grows_then_trains(tmp_path, capsys):
    from train.pretrain import main

    common = ["--train.steps", "3", "--train.batch-size", "4", "--train.warmup", "1", "--threads", "1"]
    common += ["--seed", "2"]
    _pretrain([*common, "--models.layers", "2", "--out", str(tmp_path / "small")])
    small = str(tmp_path / "small")
    grown = _pretrain([*common, "--models.init-from", small, "--models.layers", "5",
                       "--out", str(tmp_path / "b")])
    assert load_default(directory=tmp_path / "b").transformer.config.num_layers == 5
    gate = grown.transformer.transformer_blocks[1].norm1.linear.bias.view(6, 64)[2]
    assert gate.abs().max() > 0  # the copy's gate was opened by training
    record = json.loads((tmp_path / "b" / "pretrain.json").read_text())
    assert f"--models.init-from {tmp_path / 'small'} --models.layers 5" in record["reproduce"]
    argv = [*common, "--models.init-from", str(tmp_path / "b"), "--models.layers", "2",
            "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "--models.layers: expected >= the model's 5 blocks, got 2" in capsys.readouterr().err


def test_mismatch_captions_swaps_the_caption_within_the_task_type():
    """``--caption-noise``: about ``share`` of the captions become another prompt of the same task type;
    the rest, and the renders, stay."""
    import numpy as np

    from train.data import sample_prompts
    from train.pretrain import mismatch_captions

    batch = sample_prompts(4000, np.random.default_rng(0))
    noisy = mismatch_captions(batch, 0.3, np.random.default_rng(1))
    changed = [a.text != b.text for a, b in zip(batch, noisy, strict=True)]
    assert 0.27 < sum(changed) / len(batch) < 0.33
    assert all(a.task == b.task for a, b in zip(batch, noisy, strict=True))
    assert mismatch_captions(batch, 0.0, np.random.default_rng(1)) == batch


def test_pretrain_caption_noise_changes_the_run_and_its_recipe(tmp_path):
    common = ["--train.steps", "2", "--train.batch-size", "8", "--train.warmup", "1", "--threads", "1"]
    common += ["--seed", "4"]
    clean = _pretrain([*common, "--out", str(tmp_path / "clean")])
    noisy = _pretrain([*common, "--train.caption-noise", "0.5", "--out", str(tmp_path / "noisy")])
    pairs = zip(clean.transformer.state_dict().values(), noisy.transformer.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    recipes = {
        k: json.loads((tmp_path / k / "pretrain.json").read_text())["reproduce"] for k in ("clean", "noisy")
    }
    assert "--train.caption-noise" not in recipes["clean"]
    assert " --train.caption-noise 0.5" in recipes["noisy"]


def test_pretrain_has_no_wall_clock_cap_unless_asked():
    """The recipes in pretrain.json and the README carry no --max-minutes: a default cap (it was 25 min)
    stopped a 20000-step run at step 8025 without a word in the recipe."""
    from train.pretrain import parse_args

    assert parse_args([]).max_minutes is None
