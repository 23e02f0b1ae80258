"""Every bench CLI with ``--json`` checks that path before any work: a mistyped directory used to surface
only when the results were written, at the end of the run (``bench.sampler_gap`` with a ``WriteError``
traceback)."""

from __future__ import annotations

import importlib

import pytest

CLIS = [
    ("bench.paired_eval", ["RUN"]),
    ("bench.sampler_gap", ["RUN"]),
    ("bench.soft_verifier_probe", ["--data", "DATA"]),
    ("bench.nabla_gfn_grad_share", []),
    ("bench.x0hat_probe", []),
    ("bench.noise_ascent_probe", []),
    ("bench.bench_reward_backprop_memory", []),
    ("bench.bench_preference_memory", []),
]


@pytest.mark.parametrize("module, args", CLIS, ids=[m for m, _ in CLIS])
def test_json_in_a_missing_directory_is_refused_first(tmp_path, capsys, module, args):
    main = importlib.import_module(module).main
    target = tmp_path / "missing" / "out.json"
    with pytest.raises(SystemExit) as e:
        main([*(a if a.startswith("--") else str(tmp_path / a) for a in args), "--json", str(target)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--json: expected a file path in an existing directory, got {str(target)!r}" in err
    assert not target.parent.exists()


def test_json_that_is_a_directory_is_refused(tmp_path, capsys):
    from bench._common import check_json_path

    with pytest.raises(SystemExit):
        check_json_path(tmp_path)
    assert "(a directory)" in capsys.readouterr().err
    check_json_path(tmp_path / "fine.json")  # a new file in an existing directory passes
