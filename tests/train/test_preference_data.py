"""train.data.preference: the JSONL format (round trip and every refusal, each naming file:line, the field,
expected and given), the Pick-a-Pic parquet loader (several files, a tie, label_0 = 0, idempotent image
writes, schema and label refusals, the missing-pyarrow sentence), the latent cache (hit, miss on a changed
image / another VAE / another resolution / a flip, a damaged entry re-encoded, seeded samples), and
Policy.encode_images on the embedded default (identity) and on a tiny diffusers AutoencoderKL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.preference import (
    LabelRecord,
    LatentCache,
    PairRecord,
    PreferenceDataError,
    load_image,
    load_images,
    load_pickapic,
    pairs_to_labels,
    preference_latents,
    read_preference_jsonl,
    write_preference_jsonl,
)


def _png(path: Path, seed: int, size=(12, 10)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _jpeg_bytes(seed: int, size=(16, 12)) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- JSONL format
def test_pairs_round_trip_with_relative_and_absolute_paths(tmp_path):
    data = tmp_path / "data"
    a, b = _png(data / "img" / "a.png", 0), _png(data / "img" / "b.png", 1)
    outside = _png(tmp_path / "elsewhere" / "c.png", 2)
    records = [
        PairRecord("a red circle", a, b, {"reward_winner": 1.0, "reward_loser": 0.0}),
        PairRecord("two squares", outside, a),
    ]
    path = data / "pairs.jsonl"
    write_preference_jsonl(path, records)
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert lines[0] == {"prompt": "a red circle", "winner": "img/a.png", "loser": "img/b.png",
                        "meta": {"reward_winner": 1.0, "reward_loser": 0.0}}
    assert lines[1]["winner"] == str(outside.resolve()) and lines[1]["loser"] == "img/a.png"
    back = read_preference_jsonl(path)
    assert back == records and back[0].meta == records[0].meta and back[1].meta is None
    assert all(r.winner.is_absolute() and r.loser.is_absolute() for r in back)
    # the folder moves with its images: relative paths follow it
    moved = tmp_path / "moved"
    data.rename(moved)
    again = read_preference_jsonl(moved / "pairs.jsonl")
    assert again[0].winner == moved / "img" / "a.png"


def test_labels_round_trip_and_pairs_to_labels(tmp_path):
    a, b = _png(tmp_path / "a.png", 0), _png(tmp_path / "b.png", 1)
    labels = pairs_to_labels([PairRecord("p", a, b, {"k": 1})])
    assert labels == [LabelRecord("p", a, True), LabelRecord("p", b, False)]
    assert labels[0].meta == {"k": 1}
    path = tmp_path / "labels.jsonl"
    write_preference_jsonl(path, labels)
    second = json.loads(path.read_text().splitlines()[1])
    assert second == {"prompt": "p", "image": "b.png", "desirable": False, "meta": {"k": 1}}
    assert read_preference_jsonl(path) == labels


def _refusal(tmp_path, lines: list, make_images=("a.png", "b.png")) -> str:
    for i, name in enumerate(make_images):
        _png(tmp_path / name, i)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(PreferenceDataError) as e:
        read_preference_jsonl(path)
    return str(e.value)


GOOD = {"prompt": "p", "winner": "a.png", "loser": "b.png"}


@pytest.mark.parametrize(
    "bad, where, words",
    [
        ('{"prompt": "p", "winner": "a.png",', 2, ["expected a JSON object", "invalid JSON"]),
        ("[1, 2]", 2, ["expected a JSON object", "[1, 2]"]),
        ({"prompt": "p", "winner": "a.png"}, 2, ["field 'loser'", "expected it", "got no such field"]),
        ({**GOOD, "winer": "a.png"}, 2, ["field 'winer'", "expected only prompt, winner, loser"]),
        ({**GOOD, "prompt": 3}, 2, ["field 'prompt'", "expected a string", "got 3"]),
        ({**GOOD, "winner": ""}, 2, ["field 'winner'", "expected an image path", 'got ""']),
        ({**GOOD, "winner": "missing.png"}, 2, ["field 'winner'", "expected an image file", "missing.png",
                                                 "no such file"]),
        ({**GOOD, "loser": "notes.txt"}, 2, ["field 'loser'", "expected an image file", "not an image"]),
        ({**GOOD, "loser": "a.png"}, 2, ["field 'loser'", "expected another image than the winner"]),
        ({**GOOD, "meta": [1]}, 2, ["field 'meta'", "expected a JSON object", "[1]"]),
        (
            {"prompt": "p", "image": "a.png", "desirable": True},
            2,
            ["expected a pair record", "got a label record", "one kind per file"],
        ),
    ],
)
def test_pair_file_refusals_name_line_field_expected_and_given(tmp_path, bad, where, words):
    (tmp_path / "notes.txt").write_text("not an image")
    msg = _refusal(tmp_path, [GOOD, bad, GOOD])
    assert f"data.jsonl:{where}: " in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert msg.startswith("1 problem(s) in "), msg


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"prompt": "p", "image": "a.png", "desirable": 1}, ["field 'desirable'", "expected true or false"]),
        ({"prompt": "p", "image": "a.png"}, ["field 'desirable'", "got no such field"]),
        ({"prompt": "p", "image": "gone.png", "desirable": False}, ["field 'image'", "gone.png", "no such"]),
        (GOOD, ["expected a label record", "got a pair record"]),
    ],
)
def test_label_file_refusals(tmp_path, bad, words):
    msg = _refusal(tmp_path, [{"prompt": "p", "image": "a.png", "desirable": True}, bad])
    assert "data.jsonl:2: " in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_file_level_refusals(tmp_path):
    with pytest.raises(PreferenceDataError, match="expected a preference JSONL file, got no such file"):
        read_preference_jsonl(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PreferenceDataError, match="expected at least one record, got none"):
        read_preference_jsonl(tmp_path / "empty.jsonl")
    msg = _refusal(tmp_path, [{"text": "p"}])
    assert "data.jsonl:1: expected a pair record (prompt, winner, loser) or a label record" in msg
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(PreferenceDataError, match="expected UTF-8 JSON lines"):
        read_preference_jsonl(tmp_path / "latin1.jsonl")


def test_every_problem_is_counted_and_the_first_ten_shown(tmp_path):
    msg = _refusal(tmp_path, [GOOD] + [{**GOOD, "winner": f"m{i}.png"} for i in range(12)])
    assert msg.startswith("12 problem(s) in ") and "data.jsonl:2: " in msg and "data.jsonl:11: " in msg
    assert "data.jsonl:12: " not in msg and "... and 2 more" in msg


def test_write_refusals(tmp_path):
    a = _png(tmp_path / "a.png", 0)
    with pytest.raises(PreferenceDataError, match="expected at least one record"):
        write_preference_jsonl(tmp_path / "x.jsonl", [])
    with pytest.raises(PreferenceDataError, match="one kind per file.*LabelRecord, PairRecord"):
        write_preference_jsonl(tmp_path / "x.jsonl", [PairRecord("p", a, a), LabelRecord("p", a, True)])
    with pytest.raises(PreferenceDataError, match=r"records\[0\].loser: expected an image file.*no such"):
        write_preference_jsonl(tmp_path / "x.jsonl", [PairRecord("p", a, tmp_path / "gone.png")])
    assert not (tmp_path / "x.jsonl").exists()


# ------------------------------------------------------------------------------------------------ Pick-a-Pic
def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: [r[k] for r in rows] for k in rows[0]}
    types = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(),
             "label_1": pa.float64(), "model_0": pa.string()}
    pq.write_table(pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()}), path)


def _row(caption, i0, i1, l0, extra=True):
    row = {"caption": caption, "jpg_0": _jpeg_bytes(i0), "jpg_1": _jpeg_bytes(i1), "label_0": l0,
           "label_1": 1.0 - l0}
    if extra:
        row["model_0"] = "sd"
    return row


@pytest.fixture
def pickapic_dir(tmp_path):
    d = tmp_path / "pickapic"
    d.mkdir()
    _write_parquet(d / "train-00000.parquet", [_row("a cat", 0, 1, 1.0), _row("a tie", 2, 3, 0.5)])
    _write_parquet(d / "train-00001.parquet", [_row("a dog", 4, 5, 0.0), _row("a cat again", 1, 0, 0.0)])
    _write_parquet(d / "train-00002.parquet", [_row("a boat", 6, 7, 1.0, extra=False)])
    return d


def test_pickapic_loader(pickapic_dir, tmp_path):
    pytest.importorskip("pyarrow")
    said = []
    records = load_pickapic(pickapic_dir, tmp_path / "images", report=said.append)
    assert [r.prompt for r in records] == ["a cat", "a dog", "a cat again", "a boat"]  # the tie dropped

    def decoded(p):
        return np.asarray(Image.open(p))

    def expected(seed):
        import io

        return np.asarray(Image.open(io.BytesIO(_jpeg_bytes(seed))))

    for r, (w, l_) in zip(records, [(0, 1), (5, 4), (0, 1), (6, 7)], strict=True):
        np.testing.assert_array_equal(decoded(r.winner), expected(w))  # the winner is the label-1 image
        np.testing.assert_array_equal(decoded(r.loser), expected(l_))
    images = sorted((tmp_path / "images").iterdir())
    assert len(images) == 6 and all(p.suffix == ".jpg" for p in images)  # images 0 and 1 shared by two pairs
    assert records[0].winner == records[2].winner
    assert "4 pairs from 3 file(s); dropped 1 tie(s)" in said[0] and "6 image(s) written" in said[0]
    # a second load writes nothing and gives the same records
    stamps = {p: p.stat().st_mtime_ns for p in images}
    again = load_pickapic(pickapic_dir, tmp_path / "images", report=said.append)
    assert again == records and "0 image(s) written" in said[1]
    assert {p: p.stat().st_mtime_ns for p in images} == stamps
    # the records go through the JSONL format
    write_preference_jsonl(tmp_path / "images" / "pairs.jsonl", records)
    assert read_preference_jsonl(tmp_path / "images" / "pairs.jsonl") == records


def test_pickapic_refusals(pickapic_dir, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "images"
    bad = pickapic_dir / "train-00003.parquet"
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"a"], "label_0": [1.0]}), bad)
    want = (
        r"train-00003.parquet: expected the columns caption, jpg_0, jpg_1, label_0, label_1, "
        r"got no jpg_1, label_1 \(columns: caption, jpg_0, label_0\)"
    )
    with pytest.raises(PreferenceDataError, match=want):
        load_pickapic(pickapic_dir, out)
    assert not out.exists()  # the schema and labels of every file are checked before any image is written
    _write_parquet(bad, [_row("ok", 0, 1, 1.0), {**_row("odd", 0, 1, 1.0), "label_1": 1.0}])
    with pytest.raises(PreferenceDataError, match=r"train-00003.parquet: row 1: fields 'label_0', 'label_1': "
                       r"expected 1/0, 0/1 or 0.5/0.5 \(a tie\), got 1/1"):
        load_pickapic(pickapic_dir, out)
    assert not out.exists()
    _write_parquet(bad, [{**_row("ok", 0, 1, 1.0), "jpg_1": b"GIF89a..."}])
    want = r"row 0: field 'jpg_1': expected JPEG/PNG/WebP image bytes, got 9 bytes starting b'GIF8'"
    with pytest.raises(PreferenceDataError, match=want):  # image bytes are checked as they are written
        load_pickapic(pickapic_dir, out)
    bad.unlink()
    with pytest.raises(PreferenceDataError, match="expected \\*.parquet files in .*, found none"):
        load_pickapic(tmp_path / "images", out)  # created by the failed run above, holds no parquet
    with pytest.raises(PreferenceDataError, match="expected a folder of \\*.parquet files, got .* \\(not a"):
        load_pickapic(tmp_path / "nowhere", out)


def test_pickapic_without_pyarrow_names_the_extra(pickapic_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError) as e:
        load_pickapic(pickapic_dir, tmp_path / "images")
    assert str(e.value) == ('load_pickapic reads parquet with pyarrow, which is not installed: '
                            'pip install -e ".[data]"')


# --------------------------------------------------------------------------------------- preprocessing
def test_load_image_resizes_the_shorter_side_and_centre_crops(tmp_path):
    """The reference's transforms (SalesforceAIResearch/DiffusionDPO@5233e759 train.py): Resize(R) makes the
    shorter side R and the longer int(R * long / short) (torchvision's ``_compute_resized_output_size``),
    PIL bilinear; CenterCrop(R) starts at int(round((size - R) / 2)); ToTensor + Normalize(0.5, 0.5)."""
    p = _png(tmp_path / "wide.png", 0, size=(37, 20))
    got = load_image(p, 16)
    im = Image.open(p).convert("RGB").resize((int(16 * 37 / 20), 16), Image.BILINEAR)  # (29, 16)
    arr = np.asarray(im)[:, int(round((29 - 16) / 2)) :][:, :16]  # left offset 6 (round-half-even of 6.5)
    want = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0 * 2 - 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.shape == (3, 16, 16) and got.min() >= -1 and got.max() <= 1
    torch.testing.assert_close(load_image(p, 16, hflip=True), want.flip(-1), rtol=0, atol=1e-6)
    tall = _png(tmp_path / "tall.png", 1, size=(8, 11))
    assert load_image(tall, 8).shape == (3, 8, 8)
    exact = _png(tmp_path / "exact.png", 2, size=(8, 8))  # already R x R: the pixels unchanged
    want = torch.from_numpy(np.asarray(Image.open(exact)).copy()).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(load_image(exact, 8), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- latent cache
class _Encoder:
    """A deterministic stand-in VAE: (mean, std) = (2x - 0.5 per pixel, pooled 2 x 2; |x| / 4 + 0.1)."""

    def __init__(self):
        self.calls = 0
        self.encoded = 0

    def __call__(self, images):
        self.calls += 1
        self.encoded += len(images)
        pooled = torch.nn.functional.avg_pool2d(images, 2)
        return 2 * pooled - 0.5, pooled.abs() / 4 + 0.1


def test_cache_hits_misses_and_invalidation(tmp_path):
    imgs = [_png(tmp_path / f"{i}.png", i, size=(10, 8)) for i in range(3)]
    enc = _Encoder()
    cache = LatentCache(tmp_path / "cache", "vae-A")
    first = cache.latents(imgs + [imgs[0]], enc, resolution=8, batch_size=2)
    assert first.shape == (4, 3, 4, 4) and (cache.hits, cache.misses) == (0, 3) and enc.calls == 2
    torch.testing.assert_close(first[0], first[3], rtol=0, atol=0)
    want = enc(load_image(imgs[1], 8)[None])[0][0]
    torch.testing.assert_close(first[1], want, rtol=0, atol=0)
    # a new cache object over the same directory: every entry read from disk, nothing encoded
    enc2 = _Encoder()
    again = LatentCache(tmp_path / "cache", "vae-A").latents(imgs, enc2, resolution=8)
    assert enc2.encoded == 0
    torch.testing.assert_close(again, first[:3], rtol=0, atol=0)
    # a changed image misses (its content hash changed), the others hit
    _png(imgs[2], 99, size=(10, 8))
    c = LatentCache(tmp_path / "cache", "vae-A")
    changed = c.latents(imgs, enc2, resolution=8)
    assert (c.hits, c.misses) == (2, 1) and not torch.equal(changed[2], first[2])
    # another VAE, another resolution, a flip: misses
    other = LatentCache(tmp_path / "cache", "vae-B")
    other.latents(imgs[:1], enc2, resolution=8)
    assert other.misses == 1 and other.directory != c.directory
    c.latents(imgs[:1], enc2, resolution=4)
    c.latents(imgs[:1], enc2, resolution=8, hflips=[True])
    assert c.misses == 3
    flipped = c.latents(imgs[:1], enc2, resolution=8, hflips=[True])
    torch.testing.assert_close(flipped[0], enc(load_image(imgs[0], 8, hflip=True)[None])[0][0])
    # no temporary files left behind; a damaged entry is encoded again
    files = list((tmp_path / "cache").rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    entry = c._entry(c._content_hash(imgs[0]), 8, False)
    entry.write_bytes(b"garbage")
    c2 = LatentCache(tmp_path / "cache", "vae-A")
    torch.testing.assert_close(c2.latents(imgs[:1], enc2, resolution=8), first[:1], rtol=0, atol=0)
    assert c2.misses == 1


def test_cache_seeded_samples(tmp_path):
    imgs = [_png(tmp_path / f"{i}.png", i, size=(8, 8)) for i in range(2)]
    cache = LatentCache(tmp_path / "cache", "vae-A")
    enc = _Encoder()
    mean = cache.latents(imgs, enc)
    s1 = cache.latents(imgs, enc, generator=torch.Generator().manual_seed(1))
    s1b = cache.latents(imgs, enc, generator=torch.Generator().manual_seed(1))
    s2 = cache.latents(imgs, enc, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(s1, s1b, rtol=0, atol=0)
    assert not torch.equal(s1, s2) and not torch.equal(s1, mean)
    mean_t, std_t = enc(load_images(imgs))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s1, mean_t + std_t * eps)
    only_mean = LatentCache(tmp_path / "c2", "vae-A")
    only_mean.latents(imgs, lambda x: x)
    with pytest.raises(ValueError, match="needs the posterior's std"):
        only_mean.latents(imgs, lambda x: x, generator=torch.Generator().manual_seed(1))


def test_cache_refusals(tmp_path):
    with pytest.raises(ValueError, match="vae_fingerprint: expected a non-empty string, got ''"):
        LatentCache(tmp_path, "")
    cache = LatentCache(tmp_path / "c", "v")
    with pytest.raises(FileNotFoundError, match="expected image files, got .*gone.png"):
        cache.latents([tmp_path / "gone.png"], lambda x: x)
    a = _png(tmp_path / "a.png", 0, size=(8, 8))
    with pytest.raises(ValueError, match="hflips: expected 1 values"):
        cache.latents([a], lambda x: x, hflips=[True, False])
    b = _png(tmp_path / "b.png", 1, size=(6, 8))
    with pytest.raises(PreferenceDataError, match="expected one size to batch"):
        cache.latents([a, b], lambda x: x)


# --------------------------------------------------------------------------------------- Policy encode
@pytest.fixture
def one_thread():
    """One torch thread (two threads on a shared CPU are slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embedded_policy():
    from train.policy import ModelConfig, build_policy

    return build_policy(ModelConfig(), preset="tiny", model_path=None, device=torch.device("cpu"), seed=0)


def test_embedded_default_encode_is_the_identity(embedded_policy, tmp_path, one_thread):
    pol = embedded_policy
    assert pol.image_size == 32 and pol.vae_fingerprint == "identity:embedded-default:rgb-3x32x32"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(pol.encode_images(x), x, rtol=0, atol=0)
    torch.testing.assert_close(pol.decode(pol.encode_images(x)), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected \[B, 3, 32, 32\] \(the policy's resolution\), got shape"):
        pol.encode_images(torch.zeros(1, 3, 16, 16))
    # rollout -> PNG -> latent: the latent is the 8-bit image
    from train.rewards.basic import to_uint8

    x0 = pol.sample(["a red circle"], [3], solver="dpm2", num_steps=2)
    Image.fromarray(to_uint8(pol.decode(x0))[0]).save(tmp_path / "s.png")
    z = preference_latents(pol, [tmp_path / "s.png"], LatentCache(tmp_path / "c", pol.vae_fingerprint))
    torch.testing.assert_close(z, x0.clamp(-1, 1), rtol=0, atol=1 / 255 + 1e-6)
    with pytest.raises(ValueError, match="cache: expected a LatentCache for this policy's VAE"):
        preference_latents(pol, [tmp_path / "s.png"], LatentCache(tmp_path / "c", "other"))


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    """A tiny SD3 pipeline saved to disk (AutoencoderKL with factor 2, scaling 1.5305, shift 0.0609)."""
    from tests.models.test_text_vae import _sd3_pipeline

    tmp = tmp_path_factory.mktemp("sd3")
    _sd3_pipeline(tmp).save_pretrained(tmp / "pipe")
    return tmp / "pipe"


def _vae_policy(path):
    """A Policy on the tiny SD3 pipeline at 16 px."""
    from train.policy import ModelConfig, build_policy

    (path.parent / "prompts.txt").write_text("a red cat\n")
    return build_policy(ModelConfig(resolution=16), preset="sd3.5-m", model_path=str(path),
                        device=torch.device("cpu"), seed=0, prompts=str(path.parent / "prompts.txt"))


def test_vae_encode_inverts_decode_as_the_pipeline_does(sd3_pipe, tmp_path, one_thread):
    """z = (mu - shift) * scale (diffusers' StableDiffusion3Img2ImgPipeline._encode_vae_image) and
    Policy.decode(z) = D(z / scale + shift): encode then decode is the VAE's own reconstruction D(mu); with a
    generator, the reference's latent_dist.sample(generator) (SalesforceAIResearch/DiffusionDPO@5233e759
    train.py), scaled."""
    pol = _vae_policy(sd3_pipe)
    vae = pol._vae.vae
    assert pol.image_size == 16 and pol.latent_shape == (4, 8, 8)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        want = (dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        recon = vae.decode(dist.mean).sample.clamp(-1, 1)
        drawn = dist.sample(torch.Generator().manual_seed(5))
        sample = (drawn - vae.config.shift_factor) * vae.config.scaling_factor
    z = pol.encode_images(x)
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pol.decode(z), recon, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pol.encode_images(x, generator=torch.Generator().manual_seed(5)), sample,
                               rtol=1e-5, atol=1e-6)
    mean, std = pol.encode_images(x, moments=True)
    torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, dist.std * vae.config.scaling_factor, rtol=1e-5, atol=1e-6)
    # the fingerprint: stable for the same weights, another for changed weights
    fp = pol.vae_fingerprint
    assert fp.startswith("AutoencoderKL:") and _vae_policy(sd3_pipe).vae_fingerprint == fp
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    pol._vae_fingerprint = None
    assert pol.vae_fingerprint != fp
    # through files and the cache
    paths = [_png(tmp_path / f"{i}.png", i, size=(20, 16)) for i in range(2)]
    cache = LatentCache(tmp_path / "cache", pol.vae_fingerprint)
    got = preference_latents(pol, paths, cache)
    want = pol.encode_images(torch.stack([load_image(p, 16) for p in paths]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert cache.misses == 2
    assert preference_latents(pol, paths, cache).shape == (2, 4, 8, 8) and cache.hits == 2
