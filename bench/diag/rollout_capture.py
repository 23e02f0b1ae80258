"""Print the traceback of any CUDA-graph capture failure in one GRPO iteration (bf16 LoRA test's setting).

    python -m bench.diag.rollout_capture          # on a GPU machine (diffusers carried, see bench.gpu_check)

The rollout engine falls back to eager with a one-line warning when a capture fails; this prints where.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

import engine.graphs
import kernels


class _LoudWarnings:
    @staticmethod
    def warn(message, *args, **kwargs):
        print("CAPTURE FAILURE:", message, "\n", traceback.format_exc(), flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.diag.rollout_capture: needs a CUDA device", file=sys.stderr)
        return 2
    from tests.train import test_bf16_lora as case

    engine.graphs.warnings = _LoudWarnings  # the capture's except block calls warnings.warn
    case.use_embedded_default(pytest.MonkeyPatch())
    trainer = case._trainer("grpo", Path(tempfile.mkdtemp()), "cuda")
    with kernels.use_backend("auto"):
        trainer.train_iteration(1)
    print("GRPO iteration done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
