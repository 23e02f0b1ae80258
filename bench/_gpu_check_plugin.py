"""pytest plugin of ``bench.gpu_check``: one JSON line per test event, written as it happens.

Loaded with ``-p bench._gpu_check_plugin``; writes to the file named by ``NFT_CHECK_STREAM`` (nothing without
it).  A line is flushed when a test starts and when each of its phases reports, so when the check stops a
test file at its time limit, the tests that finished keep their outcome and the test that was running is
known (``start`` without a ``report``).  Lines:

* ``{"event": "collected", "nodeids"}`` -- the tests selected to run, once collection is done
* ``{"event": "start", "nodeid"}``
* ``{"event": "report", "nodeid", "when", "outcome", "duration", "message"}`` -- every failed or skipped phase
  and every ``call`` phase;
* ``{"event": "collect_error", "nodeid", "message"}``
* ``{"event": "finish", "exitstatus"}``
"""

from __future__ import annotations

import json
import os
import time

MESSAGE_CHARS = 2000


def _write(payload: dict) -> None:
    path = os.environ.get("NFT_CHECK_STREAM")
    if not path:
        return
    payload["time"] = round(time.time(), 3)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(payload) + "\n")
        f.flush()


def _message(report) -> str:
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])[:MESSAGE_CHARS]
    text = getattr(report, "longreprtext", "") or ""
    if len(text) > MESSAGE_CHARS:  # keep the end: the assertion and the line that failed
        text = "..." + text[-MESSAGE_CHARS:]
    return text


def pytest_collection_finish(session):
    _write({"event": "collected", "nodeids": [item.nodeid for item in session.items]})


def pytest_runtest_logstart(nodeid, location):
    _write({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report):
    if report.when != "call" and report.outcome == "passed":
        return
    _write(
        {
            "event": "report",
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "duration": round(report.duration, 4),
            "message": "" if report.outcome == "passed" else _message(report),
        }
    )


def pytest_collectreport(report):
    if report.failed:
        _write({"event": "collect_error", "nodeid": report.nodeid, "message": _message(report)})


def pytest_sessionfinish(session, exitstatus):
    _write({"event": "finish", "exitstatus": int(exitstatus)})
