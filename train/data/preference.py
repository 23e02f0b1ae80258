"""Offline preference data: the JSONL format, a Pick-a-Pic-v2 parquet loader, image preprocessing and an
on-disk cache of VAE latents.  The format is documented in docs/preference-data.md.

* :func:`read_preference_jsonl` / :func:`write_preference_jsonl`: a JSONL file of pair records
  ``{"prompt", "winner", "loser"}`` or label records ``{"prompt", "image", "desirable"}`` (Diffusion-KTO),
  image paths relative to the JSONL's folder (or absolute).  Reading validates every record (and that every
  image file exists and is an image) before returning; an error names ``file:line``, the field, what was
  expected and what was given.
* :func:`load_pickapic`: a local directory of Pick-a-Pic-v2-style parquet files (``caption``, ``jpg_0``,
  ``jpg_1``, ``label_0``, ``label_1``) -> pair records; ties (0.5/0.5) dropped as Diffusion-DPO does
  (SalesforceAIResearch/DiffusionDPO@5233e759 train.py keeps ``label_0 in (0, 1)``); images written once,
  named by their content hash, so a second load writes nothing.  Needs pyarrow (``pip install -e ".[data]"``).
* :func:`load_image`: the reference's preprocessing (same file): ``Resize(resolution)`` (shorter side,
  bilinear), ``CenterCrop(resolution)``, optional horizontal flip, ``ToTensor``, ``Normalize(0.5, 0.5)``
  -> ``[3, R, R]`` in [-1, 1].
* :class:`LatentCache` / :func:`preference_latents`: latents encoded once and kept on disk, keyed by the
  image file's content hash, the VAE's fingerprint (``Policy.vae_fingerprint``), the resolution and the
  flip; a changed image or another VAE misses.  Entries hold the posterior's mean and standard deviation
  (latent units), so a caller can take the mean or, as the reference does at every step
  (``vae.encode(x).latent_dist.sample() * scaling_factor``), a sample drawn from a seeded generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = [
    "PairRecord",
    "LabelRecord",
    "PreferenceDataError",
    "read_preference_jsonl",
    "write_preference_jsonl",
    "pairs_to_labels",
    "load_pickapic",
    "PICKAPIC_COLUMNS",
    "load_image",
    "load_images",
    "LatentCache",
    "preference_latents",
    "file_hash",
]

PAIR_FIELDS = ("prompt", "winner", "loser")
LABEL_FIELDS = ("prompt", "image", "desirable")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
_MAX_SHOWN = 10  # problems listed in one error message
_DATA_EXTRA = 'pip install -e ".[data]"'


class PreferenceDataError(ValueError):
    """Bad preference data: the message names the file (and line or row), the field, expected and given."""


@dataclass(frozen=True)
class PairRecord:
    """One preference pair: ``winner`` preferred over ``loser`` for ``prompt`` (absolute paths after
    reading).  ``meta``: optional JSON-able extras kept with the record (e.g. make_pairs' rewards); not part
    of equality."""

    prompt: str
    winner: Path
    loser: Path
    meta: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class LabelRecord:
    """One unpaired image labelled desirable or undesirable for ``prompt`` (Diffusion-KTO)."""

    prompt: str
    image: Path
    desirable: bool
    meta: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


# ------------------------------------------------------------------------------------------------------------
# JSONL
# ------------------------------------------------------------------------------------------------------------
def _kind_of(obj: dict) -> str | None:
    if "winner" in obj or "loser" in obj:
        return "pair"
    if "image" in obj or "desirable" in obj:
        return "label"
    return None


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_image_file(path: Path) -> str | None:
    """None when ``path`` is a readable image file, else what it is instead."""
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a file"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            _ = im.size  # the header only: no decode
    except (UnidentifiedImageError, OSError) as e:
        return f"not an image PIL can read ({type(e).__name__})"
    return None


def _parse_record(obj: Any, kind: str, base: Path, check_images: bool) -> tuple[object | None, list[str]]:
    """``(record, [])`` or ``(None, problems)``; each problem reads ``field 'x': expected ..., got ...``."""
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {_describe(obj)}"]
    fields = PAIR_FIELDS if kind == "pair" else LABEL_FIELDS
    problems = []
    other = _kind_of(obj)
    if other is not None and other != kind:
        return None, [
            f"expected a {kind} record ({', '.join(fields)}) like the file's first record, got a "
            f"{other} record (one kind per file)"
        ]
    for name in fields:
        if name not in obj:
            problems.append(f"field {name!r}: expected it ({', '.join(fields)}), got no such field")
    unknown = sorted(set(obj) - set(fields) - {"meta"})
    for name in unknown:
        problems.append(f"field {name!r}: expected only {', '.join(fields)} (and meta), got this field too")
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        problems.append(f"field 'prompt': expected a string, got {_describe(obj['prompt'])}")
    if "meta" in obj and not isinstance(obj["meta"], dict):
        problems.append(f"field 'meta': expected a JSON object, got {_describe(obj['meta'])}")
    if kind == "label" and "desirable" in obj and not isinstance(obj["desirable"], bool):
        problems.append(f"field 'desirable': expected true or false, got {_describe(obj['desirable'])}")
    paths = {}
    for name in ("winner", "loser") if kind == "pair" else ("image",):
        if name not in obj:
            continue
        value = obj[name]
        if not isinstance(value, str) or not value:
            problems.append(
                f"field {name!r}: expected an image path (a non-empty string), got {_describe(value)}"
            )
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        path = Path(os.path.normpath(path))
        paths[name] = path
        if check_images:
            why = _check_image_file(path)
            if why is not None:
                problems.append(f"field {name!r}: expected an image file, got {value!r} ({path}: {why})")
    if kind == "pair" and "winner" in paths and paths.get("winner") == paths.get("loser"):
        problems.append(
            f"field 'loser': expected another image than the winner, got the same {obj['loser']!r}"
        )
    if problems:
        return None, problems
    meta = obj.get("meta")
    if kind == "pair":
        return PairRecord(obj["prompt"], paths["winner"], paths["loser"], meta), []
    return LabelRecord(obj["prompt"], paths["image"], obj["desirable"], meta), []


def read_preference_jsonl(path, *, check_images: bool = True) -> list[PairRecord] | list[LabelRecord]:
    """Every record of a preference JSONL file (one kind per file: pairs or labels), image paths resolved
    against the file's folder.  Every record is checked first (``check_images``: each image file exists and
    its header is an image's); any problem raises :class:`PreferenceDataError` listing ``file:line`` with
    the field, expected and given (the first ten problems, and how many there are)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PreferenceDataError(
            f"{path}: expected a preference JSONL file, got "
            f"{'a directory' if path.is_dir() else 'no such file'}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PreferenceDataError(
            f"{path}: expected UTF-8 JSON lines, got byte {e.start} that is not UTF-8"
        ) from None
    base = path.resolve().parent
    records, problems, kind = [], [], None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(
                f"{path}:{lineno}: expected a JSON object, got invalid JSON ({e.msg} at column {e.colno})"
            )
            continue
        if kind is None:
            kind = _kind_of(obj) if isinstance(obj, dict) else None
            if kind is None:
                problems.append(
                    f"{path}:{lineno}: expected a pair record ({', '.join(PAIR_FIELDS)}) or a label record "
                    f"({', '.join(LABEL_FIELDS)}), got {_describe(obj)}"
                )
                continue
        record, bad = _parse_record(obj, kind, base, check_images)
        problems += [f"{path}:{lineno}: {p}" for p in bad]
        if record is not None:
            records.append(record)
    if problems:
        shown = "\n  ".join(problems[:_MAX_SHOWN])
        more = f"\n  ... and {len(problems) - _MAX_SHOWN} more" if len(problems) > _MAX_SHOWN else ""
        raise PreferenceDataError(f"{len(problems)} problem(s) in {path}:\n  {shown}{more}")
    if not records:
        raise PreferenceDataError(f"{path}: expected at least one record, got none (an empty file)")
    return records


def _relative(image: Path, base: Path) -> str:
    """``image`` relative to ``base`` when it lies under it, else absolute."""
    image = Path(os.path.abspath(image))
    try:
        return image.relative_to(base).as_posix()
    except ValueError:
        return str(image)


def write_preference_jsonl(path, records: Sequence[PairRecord] | Sequence[LabelRecord]) -> None:
    """Write ``records`` (all pairs or all labels) as a preference JSONL file, atomically (a temporary file
    renamed into place).  Image paths under the file's folder are written relative to it, others absolute;
    every image must exist (what :func:`read_preference_jsonl` would refuse is refused here)."""
    from train.common import atomic_write_text

    path = Path(path).expanduser()
    records = list(records)
    if not records:
        raise PreferenceDataError(f"records: expected at least one record for {path}, got none")
    kinds = {type(r) for r in records}
    if len(kinds) != 1 or not kinds <= {PairRecord, LabelRecord}:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise PreferenceDataError(
            f"records: expected all PairRecord or all LabelRecord (one kind per file), got {names}"
        )
    base = Path(os.path.abspath(path.parent))
    lines = []
    for i, r in enumerate(records):
        images = {"winner": r.winner, "loser": r.loser} if isinstance(r, PairRecord) else {"image": r.image}
        for name, image in images.items():
            why = _check_image_file(Path(image))
            if why is not None:
                raise PreferenceDataError(
                    f"records[{i}].{name}: expected an image file, got {str(image)!r} ({why})"
                )
        if not isinstance(r.prompt, str):
            raise PreferenceDataError(f"records[{i}].prompt: expected a string, got {r.prompt!r}")
        obj: dict[str, Any] = {"prompt": r.prompt}
        obj.update({name: _relative(Path(p), base) for name, p in images.items()})
        if isinstance(r, LabelRecord):
            if not isinstance(r.desirable, bool):
                raise PreferenceDataError(f"records[{i}].desirable: expected a bool, got {r.desirable!r}")
            obj["desirable"] = r.desirable
        if r.meta is not None:
            obj["meta"] = dict(r.meta)
        lines.append(json.dumps(obj, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


def pairs_to_labels(pairs: Sequence[PairRecord]) -> list[LabelRecord]:
    """Each pair -> its winner labelled desirable, then its loser labelled undesirable (``meta`` kept)."""
    out = []
    for p in pairs:
        out.append(LabelRecord(p.prompt, p.winner, True, p.meta))
        out.append(LabelRecord(p.prompt, p.loser, False, p.meta))
    return out


# ------------------------------------------------------------------------------------------------------------
# Pick-a-Pic v2 parquet
# ------------------------------------------------------------------------------------------------------------
def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"load_pickapic reads parquet with pyarrow, which is not installed: {_DATA_EXTRA}"
        ) from None
    return pq


def _image_suffix(data) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def _write_once(data: bytes, image_dir: Path, suffix: str) -> tuple[Path, bool]:
    """``image_dir/<sha256>.<suffix>`` holding ``data``; written (atomically) only when it is not there
    already with those bytes.  Returns the path and whether it was written."""
    digest = hashlib.sha256(data).hexdigest()
    out = image_dir / f"{digest[:32]}{suffix}"
    if out.is_file() and out.stat().st_size == len(data):
        return out, False
    fd, tmp = tempfile.mkstemp(dir=image_dir, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out, True


def load_pickapic(directory, image_dir, *, report: Callable[[str], None] | None = None) -> list[PairRecord]:
    """Pair records from a local Pick-a-Pic-v2-style directory of ``*.parquet`` files (read in name order)
    with the columns ``caption`` (string), ``jpg_0``/``jpg_1`` (image bytes), ``label_0``/``label_1`` (1/0,
    0/1, or 0.5/0.5 for a tie).  The winner is the image whose label is 1; ties are dropped (as
    SalesforceAIResearch/DiffusionDPO@5233e759 train.py does).  Every file's schema and every row's labels
    and caption are checked before any image is written; images go to ``image_dir`` named by their content
    hash, once: a second load (or an image shared by two pairs) reuses the file."""
    pq = _pyarrow_parquet()
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise PreferenceDataError(
            f"directory: expected a folder of *.parquet files, got {str(directory)!r} (not a folder)"
        )
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise PreferenceDataError(f"directory: expected *.parquet files in {directory}, found none")
    # pass 1: schema, labels and captions of every row (no image bytes read)
    keep: list[list[tuple[int, str, int]]] = []  # per file: (row, caption, winner column 0/1)
    ties = 0
    for f in files:
        try:
            meta = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
            raise PreferenceDataError(
                f"{f}: expected a parquet file, got one pyarrow cannot read ({e})"
            ) from None
        names = meta.schema_arrow.names
        missing = [c for c in PICKAPIC_COLUMNS if c not in names]
        if missing:
            raise PreferenceDataError(
                f"{f}: expected the columns {', '.join(PICKAPIC_COLUMNS)}, got no {', '.join(missing)} "
                f"(columns: {', '.join(names)})"
            )
        table = meta.read(columns=["caption", "label_0", "label_1"])
        rows = []
        columns = [table.column(c).to_pylist() for c in ("caption", "label_0", "label_1")]
        for i, (cap, l0, l1) in enumerate(zip(*columns, strict=True)):
            where = f"{f}: row {i}"
            if not isinstance(cap, str):
                raise PreferenceDataError(f"{where}: field 'caption': expected a string, got {cap!r}")
            try:
                l0, l1 = float(l0), float(l1)
            except (TypeError, ValueError):
                raise PreferenceDataError(
                    f"{where}: fields 'label_0', 'label_1': expected numbers (1/0, 0/1 or 0.5/0.5), "
                    f"got {l0!r}, {l1!r}"
                ) from None
            if (l0, l1) == (0.5, 0.5):
                ties += 1
                continue
            if (l0, l1) not in ((1.0, 0.0), (0.0, 1.0)):
                raise PreferenceDataError(
                    f"{where}: fields 'label_0', 'label_1': expected 1/0, 0/1 or 0.5/0.5 (a tie), "
                    f"got {l0:g}/{l1:g}"
                )
            rows.append((i, cap, 0 if l0 == 1.0 else 1))
        keep.append(rows)
    image_dir = Path(image_dir).expanduser()
    try:
        image_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreferenceDataError(
            f"image_dir: expected a writable folder, got {str(image_dir)!r} ({e.strerror})"
        ) from None
    # pass 2: image bytes, written once
    records, written, same = [], 0, 0
    for f, rows in zip(files, keep, strict=True):
        if not rows:
            continue
        wanted = {i: (cap, w) for i, cap, w in rows}
        offset = 0
        for batch in pq.ParquetFile(f).iter_batches(columns=["jpg_0", "jpg_1"], batch_size=256):
            cols = [batch.column(0).to_pylist(), batch.column(1).to_pylist()]
            for j in range(batch.num_rows):
                i = offset + j
                if i not in wanted:
                    continue
                cap, w = wanted[i]
                paths = []
                for c in (0, 1):
                    data = cols[c][j]
                    suffix = _image_suffix(data) if isinstance(data, (bytes, bytearray)) else None
                    if suffix is None:
                        shown = repr(data)[:40]
                        if isinstance(data, (bytes, bytearray)):
                            shown = f"{len(data)} bytes starting {bytes(data[:4])!r}"
                        raise PreferenceDataError(
                            f"{f}: row {i}: field 'jpg_{c}': expected JPEG/PNG/WebP image bytes, got {shown}"
                        )
                    p, new = _write_once(bytes(data), image_dir, suffix)
                    written += new
                    paths.append(p)
                if paths[0] == paths[1]:  # the same bytes twice: no preference to learn
                    same += 1
                    continue
                records.append(PairRecord(cap, paths[w], paths[1 - w]))
            offset += batch.num_rows
    if report is not None:
        report(
            f"pick-a-pic: {len(records)} pairs from {len(files)} file(s); dropped {ties} tie(s) and {same} "
            f"pair(s) of identical images; {written} image(s) written to {image_dir}"
        )
    return records


# ------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------
def load_image(path, resolution: int | None = None, *, hflip: bool = False) -> torch.Tensor:
    """``[3, H, W]`` float32 in [-1, 1], preprocessed as SalesforceAIResearch/DiffusionDPO@5233e759 train.py
    ``train_transforms``: RGB; ``Resize(resolution)`` (the shorter side to ``resolution``, the longer to
    ``int(resolution * long / short)``, PIL bilinear); ``CenterCrop(resolution)`` (offsets rounded);
    ``RandomHorizontalFlip`` as the explicit ``hflip``; ``ToTensor`` + ``Normalize([0.5], [0.5])``.
    ``resolution`` None keeps the image as it is."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    if resolution is not None:
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = resolution, int(resolution * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        if size != (w, h):
            im = im.resize(size, Image.BILINEAR)
        w, h = im.size
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
        im = im.crop((left, top, left + resolution, top + resolution))
    if hflip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)
    return (x - 0.5) / 0.5


def load_images(paths: Sequence, resolution: int | None = None, *, hflips: Sequence[bool] | None = None):
    """:func:`load_image` of each path, stacked -> ``[N, 3, H, W]`` (same size required)."""
    flips = list(hflips) if hflips is not None else [False] * len(paths)
    images = [load_image(p, resolution, hflip=f) for p, f in zip(paths, flips, strict=True)]
    sizes = sorted({tuple(x.shape[1:]) for x in images})
    if len(sizes) > 1:
        raise PreferenceDataError(
            f"images: expected one size to batch (pass a resolution to resize them), got sizes {sizes}"
        )
    return torch.stack(images)


# ------------------------------------------------------------------------------------------------------------
# Latent cache
# ------------------------------------------------------------------------------------------------------------
def file_hash(path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LatentCache:
    """Latents on disk under ``directory/<fingerprint hash>/``, one safetensors file per (image content,
    VAE, resolution, flip), written atomically (temporary file renamed into place, so concurrent writers and
    a crash never leave a half-written entry; an unreadable entry is re-encoded).  ``hits`` and ``misses``
    count entries read and encoded."""

    def __init__(self, directory, vae_fingerprint: str):
        if not isinstance(vae_fingerprint, str) or not vae_fingerprint:
            raise ValueError(f"vae_fingerprint: expected a non-empty string, got {vae_fingerprint!r}")
        self.vae_fingerprint = vae_fingerprint
        self.root = Path(directory).expanduser()
        self.directory = self.root / hashlib.sha256(vae_fingerprint.encode()).hexdigest()[:16]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            note = self.directory / "vae_fingerprint.txt"
            if not note.exists():
                note.write_text(vae_fingerprint + "\n", encoding="utf-8")
        except OSError as e:
            raise PermissionError(
                f"latent cache: expected a writable directory, got {str(self.root)!r} ({e.strerror})"
            ) from None
        self.hits = self.misses = 0
        self._hashes: dict[tuple, str] = {}

    def _content_hash(self, path: Path) -> str:
        st = path.stat()  # memo on (path, size, mtime): a rewritten file is hashed again
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_hash(path)
        return self._hashes[key]

    def _entry(self, content: str, resolution: int | None, hflip: bool) -> Path:
        key = hashlib.sha256(
            json.dumps([content, self.vae_fingerprint, resolution, bool(hflip)]).encode()
        ).hexdigest()
        return self.directory / key[:2] / f"{key}.safetensors"

    def _read(self, entry: Path):
        from safetensors.torch import load_file

        try:
            data = load_file(str(entry))
            return data["mean"], data.get("std")
        except Exception:  # a damaged entry (truncated by a full disk, edited): encode it again
            return None

    def _write(self, entry: Path, mean: torch.Tensor, std: torch.Tensor | None, meta: dict) -> None:
        from safetensors.torch import save_file

        entry.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": mean.detach().cpu().contiguous()}
        if std is not None:
            tensors["std"] = std.detach().cpu().contiguous()
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()})
            os.replace(tmp, entry)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def latents(
        self,
        paths: Sequence,
        encode: Callable,
        *,
        resolution: int | None = None,
        hflips: Sequence[bool] | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Latents of the images at ``paths`` (``[N, ...]`` float32, CPU).  Misses are loaded with
        :func:`load_image` (``resolution``, ``hflips``), encoded ``batch_size`` at a time by ``encode``
        (images ``[B, 3, H, W]`` in [-1, 1] -> latents, or ``(mean, std)`` of the posterior, latent units;
        deterministic) and stored.  With ``generator`` (and entries holding a std) the result is a sample
        ``mean + std * eps``, ``eps ~ N(0, I)`` from ``generator``; otherwise the mean."""
        paths = [Path(p).expanduser() for p in paths]
        flips = [bool(f) for f in hflips] if hflips is not None else [False] * len(paths)
        if len(flips) != len(paths):
            raise ValueError(f"hflips: expected {len(paths)} values (one per path), got {len(flips)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"paths: expected image files, got {str(p)!r} (no such file)")
        entries = []
        for p, f in zip(paths, flips, strict=True):
            content = self._content_hash(p)
            entries.append((self._entry(content, resolution, f), content))
        found: dict[Path, tuple] = {}
        todo: dict[Path, tuple[Path, bool, str]] = {}
        for (entry, _), p, f in zip(entries, paths, flips, strict=True):
            if entry in found or entry in todo:
                continue
            got = self._read(entry) if entry.is_file() else None
            if got is None:
                todo[entry] = (p, f, content)
            else:
                found[entry] = got
                self.hits += 1
        items = list(todo.items())
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = load_images(
                [p for _, (p, _, _) in chunk], resolution, hflips=[f for _, (_, f, _) in chunk]
            )
            with torch.no_grad():
                out = encode(images)
            mean, std = out if isinstance(out, (tuple, list)) else (out, None)
            for k, (entry, (p, f, content)) in enumerate(chunk):
                m, s = mean[k].float(), None if std is None else std[k].float()
                self._write(entry, m, s, {"image_sha256": content, "vae": self.vae_fingerprint,
                                          "resolution": resolution, "hflip": f, "source": p.name})
                found[entry] = (m.cpu(), None if s is None else s.cpu())
                self.misses += 1
        means = torch.stack([found[e][0] for e, _ in entries]).float()
        if generator is None:
            return means
        stds = [found[e][1] for e, _ in entries]
        if any(s is None for s in stds):
            raise ValueError(
                "generator: a sampled latent needs the posterior's std, but these cache entries hold only "
                "latents (their encode returned a tensor, not (mean, std))"
            )
        eps = torch.randn(means.shape, generator=generator, device=generator.device).to(means.device)
        return means + torch.stack(stds).float() * eps


def preference_latents(
    policy,
    paths: Sequence,
    cache: LatentCache,
    *,
    hflips: Sequence[bool] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Latents of the images at ``paths`` for ``policy`` (``[N, C, h, w]`` float32 on the policy's device):
    images preprocessed at the policy's resolution (:func:`load_image`), encoded by
    ``Policy.encode_images`` through ``cache``.  The mean of the VAE posterior, or with ``generator`` a
    seeded sample of it (the reference's ``latent_dist.sample()``, SalesforceAIResearch/DiffusionDPO@5233e759
    train.py).  The embedded default's latents are the images themselves."""
    fp = policy.vae_fingerprint
    if cache.vae_fingerprint != fp:
        raise ValueError(
            f"cache: expected a LatentCache for this policy's VAE ({fp[:60]}...), got one for "
            f"{cache.vae_fingerprint[:60]}..."
        )
    out = cache.latents(
        paths,
        lambda images: policy.encode_images(images.to(policy.device), moments=True),
        resolution=policy.image_size,
        hflips=hflips,
        generator=generator,
        batch_size=batch_size,
    )
    if not math.prod(out.shape[1:]) == math.prod(policy.latent_shape):
        raise ValueError(
            f"latents: expected shape {policy.latent_shape} per image, got {tuple(out.shape[1:])}"
        )
    return out.to(policy.device)
