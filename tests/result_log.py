"""A result log that survives a time limit: with IDD_OPS_TEST_LOG=PATH, pytest appends one JSON
line per test result to PATH as each test finishes, and one line with the number of tests
collected. tools/gpu_check.sh's test stages run under a time limit; when it stops pytest, junit
and the end-of-run summary are never written, but this log still names every test that ran, how
long it took and how each failure ended. tools/gpu_check_summary.py reads it.

Lines: {"collected": N}; {"test": node id, "outcome": "passed" | "failed" | "error" | "skipped",
"seconds": call time, "at": seconds since pytest started when the result came in (beside
"seconds": how much the tests overlapped, how long a worker waited), "message": the end of a
failure's report (failures and errors only)}.
Under pytest-xdist only the controller writes (every worker's reports reach it).
"""
import json
import os
import time

import pytest

MESSAGE_LINES = 12
MESSAGE_CHARS = 1500
_START = time.monotonic()


def _path():
    return None if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("IDD_OPS_TEST_LOG") or None


def _append(record):
    path = _path()
    if path:
        with open(path, "a") as f:  # one write per line, closed at once: a killed run keeps it
            f.write(json.dumps(record) + "\n")


def _message(report):
    lines = report.longreprtext.rstrip().splitlines()
    return "\n".join(lines[-MESSAGE_LINES:])[-MESSAGE_CHARS:]


def pytest_runtest_logreport(report):
    if report.when == "call" or report.failed or report.skipped:
        if report.when != "call" and report.failed:
            outcome = "error"  # a fixture's setup or teardown
        else:
            outcome = report.outcome
        record = {"test": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3),
                  "at": round(time.monotonic() - _START, 1)}
        if report.failed:
            record["message"] = _message(report)
        _append(record)


def pytest_collection_finish(session):  # without xdist
    _append({"collected": len(session.items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):  # the controller, once per worker: the same ids
    path = _path()
    if path and not (os.path.exists(path) and '"collected"' in open(path).read(4096)):
        _append({"collected": len(ids)})
