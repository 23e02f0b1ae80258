"""GenEval-mini: compositional prompts about coloured shapes and a procedural 32x32 renderer.

The world: up to four flat shapes (circle, square, upward triangle) in four saturated colours on a black
background, 32x32 RGB, float values in [-1, 1].  Prompts cover GenEval's six task types:

=============  ======================================  ============================================
task           example                                 requirement (checked by the verifier)
=============  ======================================  ============================================
single_object  "a circle"                              exactly one object, a circle
two_object     "a circle and a square"                 exactly one circle and one square
counting       "three triangles"                       exactly three triangles, nothing else
colors         "a green square"                        exactly one object, a green square
position       "a red circle left of a blue square"    both objects, A's centre left of B's, no more
color_attr     "a red circle and a blue square"        exactly a red circle and a blue square
=============  ======================================  ============================================

Unspecified colours are drawn at random per object.  Objects sit on a grid of ``GRID`` px (see below).

The held-out split works on *bags*: the two colours and two shapes a position/color_attr prompt names,
whatever the binding and order ("a red circle and a green square", "a red square and a green circle" and
"a green square left of a red circle" share the bag {red, green} x {circle, square}).  Six of the 18 bags
(``HELDOUT_BAGS``: each colour pair once, each shape pair twice) are test-only: no train prompt of either
task names them, in any binding.  Every colour-shape pair still occurs in train two-object prompts, so the
test asks for unseen combinations of seen pieces.  (Holding out colour-shape *pairs* instead would leave
each test prompt's swapped-binding twin, e.g. "a red circle and a green triangle" for "a red triangle and a
green circle", in the train split, and a model that binds by the bag of words would be taught the wrong
answer.)  The four small tasks have so few prompts that train and test share the strings and differ only in
the seeds.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from models.embedded.vocab import COLORS, NUMBERS, PLURALS, RELATIONS, SHAPES

__all__ = [
    "TASKS",
    "SHAPES",
    "COLORS",
    "RELATIONS",
    "PALETTE",
    "HELDOUT_BAGS",
    "GRID",
    "bag",
    "IMAGE_SIZE",
    "ObjectSpec",
    "Prompt",
    "all_prompts",
    "split_prompts",
    "train_prompts",
    "test_prompts",
    "sample_prompts",
    "parse_prompt",
    "render",
    "render_batch",
    "STRUCTURE_FIELDS",
    "ROLES",
    "structure_targets",
]

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
IMAGE_SIZE = 32
# RGB in [0, 1]; far apart so the nearest-palette-colour rule of the verifier is unambiguous.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
BACKGROUND = (0.0, 0.0, 0.0)
# (colour pair, shape pair) bags held out of the train split of position and color_attr; per shape pair, the
# two colour pairs form a perfect matching of the four colours.
HELDOUT_BAGS: frozenset[tuple[frozenset[str], frozenset[str]]] = frozenset(
    (frozenset(colors), frozenset(shapes))
    for colors, shapes in [
        (("red", "green"), ("circle", "square")),
        (("blue", "yellow"), ("circle", "square")),
        (("red", "blue"), ("circle", "triangle")),
        (("green", "yellow"), ("circle", "triangle")),
        (("red", "yellow"), ("square", "triangle")),
        (("green", "blue"), ("square", "triangle")),
    ]
)
# Objects sit on a grid of GRID px: box corners and sizes are multiples of it.  GRID is the embedded model's
# patch size, so a square fills whole patches and every edge runs along a patch border or through a patch at
# one of a few fixed offsets: a 64-wide DiT draws the shapes crisply and its errors are compositional.
GRID = 4
_MIN_GAP = GRID  # px between the bounding boxes of two objects (one grid cell), so they never touch


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of ``shape``; ``color`` is ``None`` when the prompt leaves it free."""

    shape: str
    color: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Prompt:
    """A structured prompt: ``task``, the required ``objects``, and for ``position`` a ``relation``
    saying where ``objects[0]`` lies with respect to ``objects[1]``."""

    task: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        return " ".join(w for _, words in self.segments() for w in words)

    def segments(self) -> list[tuple[int | None, list[str]]]:
        """The words of :attr:`text` in order, in groups: ``(k, words)`` for the noun phrase of ``objects[k]``
        (article or number, colour, shape), ``(None, words)`` for the words between them ("and", the
        relation)."""
        def noun(o: ObjectSpec) -> list[str]:
            if self.task == "counting":
                return [NUMBERS[o.count - 1], o.shape if o.count == 1 else PLURALS[o.shape]]
            return ["a", o.color, o.shape] if o.color else ["a", o.shape]

        joiner = self.relation.split() if self.task == "position" else ["and"]
        out: list[tuple[int | None, list[str]]] = []
        for k, o in enumerate(self.objects):
            if k:
                out.append((None, joiner))
            out.append((k, noun(o)))
        return out

    def __str__(self) -> str:
        return self.text


def all_prompts() -> dict[str, list[Prompt]]:
    """Every prompt of the benchmark, per task, in a fixed order."""
    shape_pairs = list(itertools.permutations(SHAPES, 2))
    color_pairs = list(itertools.permutations(COLORS, 2))
    return {
        "single_object": [Prompt("single_object", (ObjectSpec(s),)) for s in SHAPES],
        "two_object": [Prompt("two_object", (ObjectSpec(a), ObjectSpec(b))) for a, b in shape_pairs],
        "counting": [Prompt("counting", (ObjectSpec(s, None, n),)) for s in SHAPES for n in range(1, 5)],
        "colors": [Prompt("colors", (ObjectSpec(s, c),)) for c in COLORS for s in SHAPES],
        "position": [
            Prompt("position", (ObjectSpec(a, ca), ObjectSpec(b, cb)), rel)
            for rel in RELATIONS
            for a, b in shape_pairs
            for ca, cb in color_pairs
        ],
        "color_attr": [
            Prompt("color_attr", (ObjectSpec(a, ca), ObjectSpec(b, cb)))
            for a, b in shape_pairs
            for ca, cb in color_pairs
        ],
    }


def bag(p: Prompt) -> tuple[frozenset[str], frozenset[str]]:
    """The colours and shapes ``p`` names, as sets: the unit of the held-out split."""
    return frozenset(o.color for o in p.objects), frozenset(o.shape for o in p.objects)


def _is_heldout(p: Prompt) -> bool:
    return p.task in ("position", "color_attr") and bag(p) in HELDOUT_BAGS


def split_prompts(split: str) -> dict[str, list[Prompt]]:
    """The ``"train"`` or ``"test"`` prompts per task (see the module docstring for the split)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    out = {}
    for task, prompts in all_prompts().items():
        if task in ("position", "color_attr"):
            out[task] = [p for p in prompts if _is_heldout(p) == (split == "test")]
        else:
            out[task] = list(prompts)
    return out


def train_prompts() -> dict[str, list[Prompt]]:
    return split_prompts("train")


def test_prompts(n_per_task: int = 32, seed: int = 0) -> list[Prompt]:
    """The fixed evaluation list: ``n_per_task`` test prompts per task (tasks in ``TASKS`` order).

    Tasks with fewer test prompts than ``n_per_task`` cycle through them; larger tasks take a seeded
    sample without replacement.  The score is the mean over tasks, so every task weighs the same.
    """
    if n_per_task < 1:
        raise ValueError(f"n_per_task: expected >= 1, got {n_per_task}")
    rng = np.random.default_rng(seed)
    out = []
    for task in TASKS:
        pool = split_prompts("test")[task]
        order = rng.permutation(len(pool))
        if len(pool) >= n_per_task:
            out += [pool[i] for i in order[:n_per_task]]
        else:
            out += [pool[order[i % len(pool)]] for i in range(n_per_task)]
    return out


def sample_prompts(
    n: int, rng: np.random.Generator, split: str = "train", tasks: tuple[str, ...] = TASKS
) -> list[Prompt]:
    """``n`` prompts of ``split``: a task of ``tasks`` uniformly at random, then a prompt of that task
    uniformly."""
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks: expected task types among {', '.join(TASKS)}, got {tasks!r}")
    pools = split_prompts(split)
    picks = rng.integers(0, len(tasks), size=n)
    return [pools[tasks[t]][rng.integers(0, len(pools[tasks[t]]))] for t in picks]


@functools.lru_cache(maxsize=1)
def _prompts_by_text() -> dict[str, Prompt]:
    return {p.text: p for prompts in all_prompts().values() for p in prompts}


def parse_prompt(text: str) -> Prompt:
    """The structured :class:`Prompt` whose ``text`` is ``text``."""
    prompt = _prompts_by_text().get(text)
    if prompt is not None:
        return prompt
    raise ValueError(f"text: expected a GenEval-mini prompt such as 'a red circle', got {text!r}")


# ------------------------------------------------------------------------------- prompt structure (text only)
# What each word of a prompt says about the object it belongs to: the targets of the prompt encoder's
# text-only pretraining (``train.pretrain --text-pretrain-steps``).  ``ROLES`` is where an object goes:
# "none" unless the prompt is a position prompt, whose objects[0] takes the relation's side and objects[1]
# the opposite one.
ROLES: tuple[str, ...] = ("none", "left", "right", "above", "below")
_SIDES = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("above", "below"),
          "below": ("below", "above")}
# field -> number of classes; the class of "color" is 0 for an unspecified colour, 1 + COLORS index otherwise
STRUCTURE_FIELDS: dict[str, int] = {"shape": len(SHAPES), "color": 1 + len(COLORS), "count": len(NUMBERS),
                                    "role": len(ROLES)}
IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index


def structure_targets(prompts: list[Prompt], max_length: int) -> torch.Tensor:
    """``[B, max_length, 4]`` int64 targets per token of ``prompt.text`` as the embedded tokenizer lays it
    out (token 0 is ``<bos>``): every word of object ``k``'s noun phrase (article or number, colour, shape)
    carries that object's ``(shape, color, count - 1, role)`` in ``STRUCTURE_FIELDS`` order; ``<bos>``,
    "and", the relation words and padding carry ``-100`` (ignored).  The words come from
    :meth:`Prompt.segments`, the layout :attr:`Prompt.text` is written from."""
    out = torch.full((len(prompts), max_length, len(STRUCTURE_FIELDS)), IGNORE, dtype=torch.long)
    for row, p in enumerate(prompts):
        sides = _SIDES[p.relation] if p.relation else ("none",) * len(p.objects)
        col = 1  # after <bos>
        for k, words in p.segments():
            if col + len(words) > max_length:
                raise ValueError(f"prompts[{row}]: expected a prompt of at most {max_length - 1} words, "
                                 f"got {p.text!r}")
            if k is not None:
                o = p.objects[k]
                target = (SHAPES.index(o.shape), 0 if o.color is None else 1 + COLORS.index(o.color),
                          o.count - 1, ROLES.index(sides[k]))
                out[row, col : col + len(words)] = torch.tensor(target)
            col += len(words)
    return out


# ---------------------------------------------------------------------------------------------- rendering
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # pixel centres


def _shape_mask(shape: str, x0: int, y0: int, size: int) -> np.ndarray:
    """Boolean ``[H, W]`` mask of ``shape`` inscribed in the box ``[x0, x0+size) x [y0, y0+size)``."""
    cx, cy = x0 + size / 2, y0 + size / 2
    if shape == "square":
        return (_XX > x0) & (_XX < x0 + size) & (_YY > y0) & (_YY < y0 + size)
    if shape == "circle":
        return (_XX - cx) ** 2 + (_YY - cy) ** 2 <= (size / 2) ** 2
    if shape == "triangle":  # apex up, base at the bottom of the box
        depth = _YY - y0
        return (depth > 0) & (depth < size) & (np.abs(_XX - cx) <= depth / 2 + 0.25)
    raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")


def _sizes(n_objects: int) -> tuple[int, ...]:
    """The object sizes (px, multiples of ``GRID``) a layout of ``n_objects`` draws from."""
    return {1: (8, 12, 16), 2: (8, 12)}.get(n_objects, (8,))


def _separated(a, b) -> bool:
    (ax, ay, asz), (bx, by, bsz) = a, b
    return (
        ax + asz + _MIN_GAP <= bx
        or bx + bsz + _MIN_GAP <= ax
        or ay + asz + _MIN_GAP <= by
        or by + bsz + _MIN_GAP <= ay
    )


def _relation_holds(a, b, relation: str) -> bool:
    (ax, ay, asz), (bx, by, bsz) = a, b
    if relation == "left of":
        return ax + asz + _MIN_GAP <= bx
    if relation == "right of":
        return bx + bsz + _MIN_GAP <= ax
    if relation == "above":
        return ay + asz + _MIN_GAP <= by
    if relation == "below":
        return by + bsz + _MIN_GAP <= ay
    raise ValueError(f"relation: expected one of {RELATIONS}, got {relation!r}")


def _layout(prompt: Prompt, rng: np.random.Generator) -> list[tuple[str, str, int, int, int]]:
    """``(shape, colour, x0, y0, size)`` per object: random sizes and places on the ``GRID``, boxes apart,
    relation kept."""
    objs = [(o.shape, o.color) for o in prompt.objects for _ in range(o.count)]
    sizes = _sizes(len(objs))
    for _ in range(10_000):
        boxes = []
        for _ in objs:
            size = sizes[int(rng.integers(0, len(sizes)))]
            x0, y0 = rng.integers(0, (IMAGE_SIZE - size) // GRID + 1, size=2) * GRID
            boxes.append((int(x0), int(y0), size))
        if not all(_separated(a, b) for a, b in itertools.combinations(boxes, 2)):
            continue
        if prompt.relation is not None and not _relation_holds(boxes[0], boxes[1], prompt.relation):
            continue
        colors = [c if c is not None else COLORS[int(rng.integers(0, len(COLORS)))] for _, c in objs]
        return [(s, c, *box) for (s, _), c, box in zip(objs, colors, boxes, strict=True)]
    raise RuntimeError(f"prompt: found no layout for {prompt.text!r} in 10000 tries")


def render(prompt: Prompt, rng: np.random.Generator) -> torch.Tensor:
    """One image ``[3, 32, 32]`` float32 in [-1, 1] that satisfies ``prompt``."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for shape, color, x0, y0, size in _layout(prompt, rng):
        img[_shape_mask(shape, x0, y0, size)] = PALETTE[color]
    return torch.from_numpy(img * 2.0 - 1.0).permute(2, 0, 1).contiguous()


def render_batch(prompts: list[Prompt], rng: np.random.Generator | int) -> torch.Tensor:
    """Images ``[B, 3, 32, 32]`` float32 in [-1, 1], one per prompt; ``rng`` a Generator or an int seed."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return torch.stack([render(p, rng) for p in prompts])
