"""GenEval-mini: renderer determinism, prompt coverage and split, verifier on right and wrong images."""

import numpy as np
import pytest
import torch

from train.data import (
    COLORS,
    HELDOUT_BAGS,
    PALETTE,
    SHAPES,
    TASKS,
    ObjectSpec,
    Prompt,
    all_prompts,
    bag,
    parse_prompt,
    render,
    render_batch,
    sample_prompts,
    split_prompts,
)
from train.data import test_prompts as heldout_prompts
from train.rewards import GenEvalMini


def _paint(objects, size=32):
    """An image with the given ``(shape, colour, x0, y0, side)`` objects, by the renderer's own masks."""
    from train.data.geneval_mini import _shape_mask

    img = np.zeros((size, size, 3), np.float32)
    for shape, color, x0, y0, side in objects:
        img[_shape_mask(shape, x0, y0, side)] = PALETTE[color]
    return torch.from_numpy(img * 2 - 1).permute(2, 0, 1)[None]


def test_render_is_deterministic_and_in_range():
    prompts = sample_prompts(24, np.random.default_rng(0))
    a, b = render_batch(prompts, 7), render_batch(prompts, 7)
    c = render_batch(prompts, 8)
    assert a.shape == (24, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() == -1 and a.max() == 1
    assert sample_prompts(24, np.random.default_rng(0)) == prompts


def test_sample_prompts_of_a_task_subset():
    """``tasks`` restricts the draw to those task types (each drawn); the full tuple is the default draw."""
    sub = ("counting", "position")
    prompts = sample_prompts(200, np.random.default_rng(1), tasks=sub)
    assert {p.task for p in prompts} == set(sub)
    held = {p.text for p in split_prompts("test")["position"]}
    assert not any(p.text in held for p in prompts if p.task == "position")
    assert sample_prompts(50, np.random.default_rng(2), tasks=TASKS) == sample_prompts(
        50, np.random.default_rng(2)
    )
    with pytest.raises(ValueError, match="tasks: expected task types among"):
        sample_prompts(4, np.random.default_rng(0), tasks=("shapes",))


def test_layouts_sit_on_the_grid():
    """Box corners and sizes are multiples of GRID, boxes at least one cell apart, inside the image."""
    from train.data.geneval_mini import GRID, _layout

    rng = np.random.default_rng(3)
    for prompt in sample_prompts(300, rng):
        objs = _layout(prompt, rng)
        assert len(objs) == sum(o.count for o in prompt.objects)
        for _, _, x0, y0, size in objs:
            assert x0 % GRID == 0 and y0 % GRID == 0 and size % GRID == 0 and size >= 2 * GRID
            assert 0 <= x0 and x0 + size <= 32 and 0 <= y0 and y0 + size <= 32
        for i, (_, _, ax, ay, asz) in enumerate(objs):
            for _, _, bx, by, bsz in objs[i + 1 :]:
                apart_x = ax + asz + GRID <= bx or bx + bsz + GRID <= ax
                apart_y = ay + asz + GRID <= by or by + bsz + GRID <= ay
                assert apart_x or apart_y


def test_prompt_coverage():
    prompts = all_prompts()
    assert tuple(prompts) == TASKS
    texts = [p.text for ps in prompts.values() for p in ps]
    assert len(texts) == len(set(texts))
    assert "a red circle left of a blue square" in texts and "three triangles" in texts
    assert "a circle and a square" in texts and "a green square" in texts
    for t in texts:
        assert parse_prompt(t).text == t
    seen_pairs = {(o.color, o.shape) for p in prompts["colors"] for o in p.objects}
    assert seen_pairs == {(c, s) for c in COLORS for s in SHAPES}
    assert {p.objects[0].count for p in prompts["counting"]} == {1, 2, 3, 4}
    assert {p.relation for p in prompts["position"]} == {"left of", "right of", "above", "below"}


def test_split_holds_out_compositions():
    train, test = split_prompts("train"), split_prompts("test")
    for task in ("position", "color_attr"):
        tr, te = {p.text for p in train[task]}, {p.text for p in test[task]}
        assert tr and te and not tr & te
        assert {bag(p) for p in train[task]}.isdisjoint(HELDOUT_BAGS)
        assert {bag(p) for p in test[task]} == HELDOUT_BAGS
        assert len(te) * 2 == len(tr)  # 6 of the 18 bags, every binding and order of each
        # every colour-shape pair is still seen inside a train two-object prompt
        assert {(o.color, o.shape) for p in train[task] for o in p.objects} == {
            (c, s) for c in COLORS for s in SHAPES
        }
    # each colour pair is held out once, each shape pair twice
    assert sorted(len(c) for c, _ in HELDOUT_BAGS) == [2] * 6
    assert len({c for c, _ in HELDOUT_BAGS}) == 6 and len({s for _, s in HELDOUT_BAGS}) == 3
    fixed = heldout_prompts(16)
    assert fixed == heldout_prompts(16) and len(fixed) == 16 * len(TASKS)
    assert [p.task for p in fixed] == [t for t in TASKS for _ in range(16)]
    with pytest.raises(ValueError, match="split"):
        split_prompts("val")


def test_verifier_scores_ground_truth_about_one():
    verifier = GenEvalMini()
    for split in ("train", "test"):
        prompts = sample_prompts(600, np.random.default_rng(3), split)
        images = render_batch(prompts, 11)
        scores = verifier.score(images, prompts)
        summary = verifier.summarize(scores["strict"], prompts)
        assert set(summary) == {"score", *TASKS}
        for task in TASKS:
            assert summary[task] >= 0.97, (split, summary)
        assert scores["partial"].mean() >= 0.98


def test_verifier_rejects_wrong_images():
    v = GenEvalMini()
    rng = np.random.default_rng(5)
    red_circle_left = Prompt(
        "position", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of"
    )
    green_square = Prompt("colors", (ObjectSpec("square", "green"),))
    cases = [
        (green_square, _paint([("square", "red", 10, 10, 10)])),  # wrong colour
        (green_square, _paint([("circle", "green", 10, 10, 10)])),  # wrong shape
        (
            Prompt("counting", (ObjectSpec("triangle", None, 3),)),
            _paint([("triangle", "red", 2, 2, 9), ("triangle", "blue", 18, 2, 9)]),
        ),  # count
        (
            Prompt("single_object", (ObjectSpec("circle"),)),
            _paint([("circle", "red", 2, 2, 10), ("square", "blue", 18, 18, 10)]),
        ),  # an extra object
        (red_circle_left, _paint([("circle", "red", 20, 10, 9), ("square", "blue", 2, 10, 9)])),  # position
        (
            Prompt("color_attr", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue"))),
            _paint([("circle", "blue", 2, 10, 9), ("square", "red", 20, 10, 9)]),
        ),  # swapped attributes
        (
            Prompt("two_object", (ObjectSpec("circle"), ObjectSpec("square"))),
            _paint([("circle", "red", 2, 10, 9), ("triangle", "red", 20, 10, 9)]),
        ),  # wrong second object
    ]
    prompts = [p for p, _ in cases]
    scores = v.score(torch.cat([img for _, img in cases]), prompts)
    assert scores["strict"].sum() == 0, scores
    assert (scores["partial"] < 1).all()
    # the same prompts with the right picture pass
    right = render_batch(prompts, rng)
    assert v.score(right, prompts)["strict"].sum() == len(prompts)

    prompts = sample_prompts(64, rng)
    blank = -torch.ones(64, 3, 32, 32)
    gray = torch.zeros(64, 3, 32, 32)
    noise = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    uniform = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for wrong in (blank, gray, noise, uniform):
        assert v.score(wrong, prompts)["strict"].sum() == 0


def test_verifier_render_roundtrip_per_shape():
    v = GenEvalMini()
    rng = np.random.default_rng(9)
    for shape in SHAPES:
        for color in COLORS:
            p = Prompt("colors", (ObjectSpec(shape, color),))
            for _ in range(5):
                (obj,) = v.detect(render(p, rng)[None])[0]
                assert (obj.shape, obj.color) == (shape, color)


def test_verifier_bad_arguments():
    v = GenEvalMini()
    with pytest.raises(ValueError, match="images"):
        v.score(torch.zeros(2, 1, 32, 32), ["a circle", "a square"])
    with pytest.raises(ValueError, match="prompts"):
        v.score(torch.zeros(2, 3, 32, 32), ["a circle"])
    with pytest.raises(ValueError, match="text"):
        v.score(torch.zeros(1, 3, 32, 32), ["a purple circle"])


def test_structure_targets_per_word():
    """Each word of an object's noun phrase carries (shape, colour, count - 1, role); the rest is ignored."""
    from train.data import STRUCTURE_FIELDS, structure_targets
    from train.data.geneval_mini import ROLES

    assert list(STRUCTURE_FIELDS) == ["shape", "color", "count", "role"]
    red_circle, blue_square = ObjectSpec("circle", "red"), ObjectSpec("square", "blue")
    p = Prompt("position", (red_circle, blue_square), "right of")  # <bos> a red circle right of a blue square
    t = structure_targets([p], 10)[0]
    ignore = [-100] * 4
    first = [SHAPES.index("circle"), 1 + COLORS.index("red"), 0, ROLES.index("right")]
    second = [SHAPES.index("square"), 1 + COLORS.index("blue"), 0, ROLES.index("left")]
    assert t.tolist() == [ignore, first, first, first, ignore, ignore, second, second, second, ignore]
    three = structure_targets([parse_prompt("three triangles")], 4)[0]
    assert three.tolist() == [ignore, [2, 0, 2, 0], [2, 0, 2, 0], ignore]
    attr = structure_targets([parse_prompt("a red circle and a blue square")], 10)[0]
    assert attr[:, 3].tolist() == [-100, 0, 0, 0, -100, 0, 0, 0, -100, -100]  # no role without a relation
    every = [q for ps in all_prompts().values() for q in ps]
    assert structure_targets(every, 10).shape == (len(every), 10, 4)
    with pytest.raises(ValueError, match="at most 5 words"):
        structure_targets([p], 6)
