"""The embedded default model: a tiny SD3-style pixel-space text-to-image flow model that runs on a CPU.

``load_default(device=None, dtype=None) -> EmbeddedDefault`` loads the shipped checkpoint
(``default.safetensors`` + ``default.json``; ``pretrain.json`` records the command that made it).
"""

from models.embedded.model import (
    DEFAULT_DIR,
    TRANSFORMER_CONFIG,
    EmbeddedConfig,
    EmbeddedDefault,
    PromptEncoder,
    load_default,
)
from models.embedded.vocab import COLORS, NUMBERS, RELATIONS, SHAPES, WORDS, tokenize

__all__ = [
    "DEFAULT_DIR", "TRANSFORMER_CONFIG", "EmbeddedConfig", "EmbeddedDefault", "PromptEncoder", "load_default",
    "COLORS", "NUMBERS", "RELATIONS", "SHAPES", "WORDS", "tokenize",
]
