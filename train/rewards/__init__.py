"""Rewards.  ``GenEvalMini``: the rule-based verifier of the embedded GenEval-mini benchmark."""

from train.rewards.geneval_mini import DetectedObject, GenEvalMini

__all__ = ["DetectedObject", "GenEvalMini"]
