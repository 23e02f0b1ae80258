"""Benchmark session hooks: print the kernel summary table and write ``bench/results/<device>.json``.

The results file is written when a GPU ran the suite, or when asked for (``NFT_BENCH_WRITE=1``, set by
``python -m bench.bench_kernels``; ``NFT_BENCH_RESULTS=path`` picks the file).  CPU quick runs inside the
ordinary test suite write nothing, so CI leaves the tree clean.
"""

from __future__ import annotations

import os


def pytest_sessionfinish(session, exitstatus):
    from bench import _common

    if not _common.RECORDS:
        return
    table = _common.summary_table()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if _common.has_cuda() or os.environ.get("NFT_BENCH_WRITE") == "1" or os.environ.get("NFT_BENCH_RESULTS"):
        path = _common.write_results()
        table += f"\nresults written to {path}"
    if reporter is not None:
        reporter.write_sep("-", "kernel benchmarks (per call)")
        reporter.write_line(table)
