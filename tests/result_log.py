"""A result log that survives a time limit: with IDD_OPS_TEST_LOG=PATH, pytest appends one JSON
line per test result to PATH as each test finishes, and one line with the number of tests
collected. tools/gpu_check.sh's test stages run under a time limit; when it stops pytest, junit
and the end-of-run summary are never written, but this log still names every test that ran, how
long it took and how each failure ended. tools/gpu_check_summary.py reads it.

Lines: {"collected": N}; {"test": node id, "outcome": "passed" | "failed" | "error" | "skipped"
| "xfailed" | "xpassed",
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


# Read once and taken out of the environment: the pytest runs that tests start in child processes
# keep out of this log. xdist's workers write nothing (their reports reach the controller).
_PATH = None if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.pop("IDD_OPS_TEST_LOG", None) or None
_collected_written = False


def _append(record):
    if _PATH:
        with open(_PATH, "a") as f:  # one write per line, closed at once: a killed run keeps it
            f.write(json.dumps(record) + "\n")


def _message(report):
    lines = report.longreprtext.rstrip().splitlines()
    return "\n".join(lines[-MESSAGE_LINES:])[-MESSAGE_CHARS:]


def _outcome(report):
    if report.when != "call" and report.failed:
        return "error"  # a fixture's setup or teardown
    if hasattr(report, "wasxfail"):  # a known failure (pytest.mark.xfail, conftest's table)
        return "xfailed" if report.skipped else "xpassed"
    return report.outcome


def pytest_runtest_logreport(report):
    if report.when == "call" or report.failed or report.skipped:
        record = {"test": report.nodeid, "outcome": _outcome(report), "seconds": round(report.duration, 3),
                  "at": round(time.monotonic() - _START, 1)}
        if report.failed:
            record["message"] = _message(report)
        _append(record)


def _collected(count):
    global _collected_written
    if not _collected_written:
        _collected_written = True
        _append({"collected": count})


def pytest_collection_finish(session):  # without xdist
    _collected(len(session.items))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):  # the controller, once per worker: the same ids
    _collected(len(ids))
