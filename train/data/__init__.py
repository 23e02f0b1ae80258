"""Training and evaluation data: the embedded GenEval-mini benchmark (prompts and renderer)."""

from train.data.geneval_mini import (
    COLORS,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    PALETTE,
    RELATIONS,
    SHAPES,
    TASKS,
    ObjectSpec,
    Prompt,
    all_prompts,
    parse_prompt,
    render,
    render_batch,
    sample_prompts,
    split_prompts,
    test_prompts,
    train_prompts,
)

__all__ = [
    "COLORS", "HELDOUT_PAIRS", "IMAGE_SIZE", "PALETTE", "RELATIONS", "SHAPES", "TASKS",
    "ObjectSpec", "Prompt", "all_prompts", "parse_prompt", "render", "render_batch", "sample_prompts",
    "split_prompts", "test_prompts", "train_prompts",
]
