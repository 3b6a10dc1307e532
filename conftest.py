"""Prints your homework score after `pytest test_diffusion.py`.

Tests marked `@pytest.mark.graded("<function>")` count towards that function's points (POINTS in
test_diffusion.py); a function's points are split evenly over its tests. Other tests are not graded.
A check that fails only because a function still raises NotImplementedError is shown as one short line
(status TODO), and the summary lists each function still to implement once.
"""
import pytest

_OUTCOMES = {}  # nodeid -> (function, passed)
_POINTS = {}
_TODOS = {}  # TODO text -> number of checks it blocks
TODO_PREFIX = "not implemented yet: "


def pytest_configure(config):
    config.addinivalue_line("markers", "graded(function): the test counts towards that function's points (see POINTS)")
    if not config.pluginmanager.hasplugin("timeout"):
        # pytest-timeout is a developer tool (requirements-dev.txt): without it the checks' timeout marks do
        # nothing, and must not warn (PytestUnknownMarkWarning) on every student's run
        config.addinivalue_line("markers", "timeout(seconds): a time limit, applied where pytest-timeout is installed")


def _todo(report):
    text = getattr(report, "longreprtext", "") or ""
    return text.strip()[len(TODO_PREFIX):] if report.failed and text.strip().startswith(TODO_PREFIX) else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    mark = item.get_closest_marker("graded")
    if mark is not None:
        _POINTS.update(getattr(item.module, "POINTS", {}))
        function, passed = _OUTCOMES.get(item.nodeid, (mark.args[0], False))
        if report.when in ("setup", "call"):
            passed = report.passed
        elif not report.passed:  # a failing teardown
            passed = False
        _OUTCOMES[item.nodeid] = (function, passed)
    todo = _todo(report)
    if todo is not None:
        _TODOS[todo] = _TODOS.get(todo, 0) + 1
    return report


def pytest_report_teststatus(report, config):
    if _todo(report) is not None:
        return "todo", "T", "TODO"  # still a failure (exit code 1, junit); not repeated in the failures section
    return None


def score_table(outcomes, points):
    """[(function, passed, total, score, max)] and the total, from {nodeid: (function, passed)}."""
    rows, total = [], 0.0
    for function, max_points in points.items():
        results = [passed for f, passed in outcomes.values() if f == function]
        if not results:
            continue
        score = max_points * sum(results) / len(results)
        rows.append((function, sum(results), len(results), score, max_points))
        total += score
    return rows, total


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if _TODOS:
        tr.section("not implemented yet")
        for todo, n in _TODOS.items():
            tr.write_line(f"  {todo}  ({n} check{'s' if n != 1 else ''})")
    if not _OUTCOMES or not _POINTS:
        return
    rows, total = score_table(_OUTCOMES, _POINTS)
    tr.section("homework score (POINTS in test_diffusion.py)")
    for function, passed, n, score, max_points in rows:
        tr.write_line(f"  {function:<14} {passed:>2}/{n:<2} tests   {score:6.2f} / {max_points}")
    tr.write_line(f"  {'total':<14} {'':>11}   {total:6.2f} / {sum(r[4] for r in rows)}")
