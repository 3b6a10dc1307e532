"""pytest plugin that reports per-test outcomes to the autograder runner (tools/autograder_runner.py).

Loaded with `-p grading_plugin` in the process that runs the student's code. It reads a one-time token from
the pipe named by GRADING_NONCE_FD, removes both variables from os.environ before any test module (and so
any student code) is imported, and writes one JSON line per test, tagged with the token, to the pipe named by
GRADING_REPORT_FD. The runner ignores lines without the token and treats a test reported twice with
different outcomes as failed. See the runner's docstring for what this does and does not protect against.
"""
import json
import os

_state = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "graded(function): counts towards that function's points")
    report_fd = os.environ.pop("GRADING_REPORT_FD", None)
    nonce_fd = os.environ.pop("GRADING_NONCE_FD", None)
    if report_fd is None or nonce_fd is None:
        return
    with os.fdopen(int(nonce_fd), "r") as f:
        _state["nonce"] = f.read().strip()
    _state["out"] = os.fdopen(int(report_fd), "w", buffering=1)
    _state["tests"] = {}


def _emit(record):
    out = _state.get("out")
    if out is None:
        return
    record["nonce"] = _state["nonce"]
    try:
        out.write(json.dumps(record) + "\n")
        out.flush()
    except (OSError, ValueError):
        pass


def _text(report):
    try:
        text = report.longreprtext
    except Exception:  # noqa: BLE001
        text = str(report.longrepr)
    return text[-4000:]


def pytest_collectreport(report):
    if report.failed:
        _emit({"collect_error": _text(report)})


def pytest_runtest_logreport(report):
    if "tests" not in _state:
        return
    passed, output = _state["tests"].get(report.nodeid, (True, ""))
    if report.failed or (report.when == "call" and not report.passed):
        passed = False
        output = (output + "\n" + _text(report)).strip() if report.failed else (output + "\nskipped").strip()
    if report.when == "setup" and not report.passed and not report.failed:
        passed, output = False, "skipped"
    _state["tests"][report.nodeid] = (passed, output)
    if report.when == "teardown":
        _emit({"id": report.nodeid, "passed": passed, "output": output})
