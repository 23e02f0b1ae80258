"""The GPU diagnostics in bench/diag run their case on CPU too (so they do not rot between GPU sessions)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from bench.diag import flux_sdpa_nan


def test_flux_sdpa_case_runs_on_cpu_and_reports_finite_gradients():
    got = flux_sdpa_nan.run_case("flux-tiny", [SDPBackend.MATH], True, device="cpu")
    assert got["nonfinite_grads"] == 0 and got["of"] > 0 and not got["out_nan"]
    assert got["sdpa_calls"] >= 2 and got["sdpa_call_0"]["dtype"] == "torch.bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_diagnostics_refuse_to_run_without_cuda(capsys):
    from bench.diag import rollout_capture, train_step_overhead

    assert flux_sdpa_nan.main([]) == 2
    assert rollout_capture.main() == 2
    assert train_step_overhead.main() == 2
    assert capsys.readouterr().err.count("needs a CUDA device") == 3


def test_dispatch_overhead_measures_both_paths():
    from bench.diag import dispatch_overhead

    got = dispatch_overhead.measure(n=50)
    assert set(got) == {f"{p}_{t}" for p in ("dispatcher", "eager", "body") for t in ("grad", "no_grad")}
    assert all(v > 0 for v in got.values())
