"""The closed vocabulary of the embedded default model and its word-level tokenizer.

The embedded benchmark (``train.data.geneval_mini``) writes prompts from these words only; the names live
here, in ``models/``, because the prompt encoder needs them and ``models/`` must not import ``train/``.
A prompt is lower-cased, split on whitespace and mapped word by word; ``<bos>`` is prepended so that the
empty prompt (CFG's unconditional branch) is one token, and the rest is padded with ``<pad>``.
"""

from __future__ import annotations

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

PAD, BOS = "<pad>", "<bos>"
WORDS: tuple[str, ...] = (
    (PAD, BOS, "a", "and", "left", "right", "of", "above", "below")
    + NUMBERS
    + SHAPES
    + tuple(PLURALS[s] for s in SHAPES)
    + COLORS
)
WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(WORDS)}
PAD_ID, BOS_ID = WORD_TO_ID[PAD], WORD_TO_ID[BOS]


def tokenize(prompts: list[str], max_length: int) -> torch.Tensor:
    """Token ids ``[B, max_length]`` (int64): ``<bos>``, the words, then ``<pad>``.

    Raises ``ValueError`` naming the prompt for an unknown word or a prompt longer than ``max_length - 1``.
    """
    if isinstance(prompts, str):
        raise TypeError(f"prompts: expected a list of strings, got the string {prompts!r}")
    ids = torch.full((len(prompts), max_length), PAD_ID, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().split()
        if len(words) > max_length - 1:
            raise ValueError(
                f"prompts[{row}]: expected at most {max_length - 1} words, got {len(words)} in {prompt!r}"
            )
        unknown = [w for w in words if w not in WORD_TO_ID]
        if unknown:
            raise ValueError(
                f"prompts[{row}]: expected words from the embedded vocabulary {WORDS[2:]}, "
                f"got unknown {unknown} in {prompt!r}"
            )
        ids[row, 0] = BOS_ID
        for col, w in enumerate(words, start=1):
            ids[row, col] = WORD_TO_ID[w]
    return ids
