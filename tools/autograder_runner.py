"""Gradescope grading runner: grades a submitted diffusion.py into results/results.json.

Shipped in autograder.zip as grader.py (tools/make_autograder.py builds the zip) and started by
run_autograder:

    python3 grader.py --root /autograder        # reads submission/, writes results/results.json

How it grades:
  1. Finds diffusion.py in <root>/submission (also inside a subfolder, the shallowest wins). None: every test
     scores 0 and the output lists what was submitted. A syntax error is reported the same way, with its line,
     without running anything.
  2. Copies it with the grader's own test_diffusion.py, fixtures, unet.py and grading_plugin.py into a fresh
     private temporary folder and runs pytest there in a separate process (its own session / process group,
     a scrubbed environment, HOME and TMPDIR inside that folder), with a per-test timeout (pytest-timeout,
     DIFFUSION_TEST_TIMEOUT) and a wall-clock limit for the whole run (--time-limit); past it, the whole process
     group is killed.
  3. When the runner is root (as on Gradescope) and the unprivileged user `nobody` can run Python, the
     test process runs as `nobody`: it cannot write the results folder or read the grader's files.
  4. The test process reports each test through grading_plugin.py over an inherited pipe, tagged with a
     random token that the runner sends over a second pipe, which the plugin reads and closes before any
     student code is imported. The runner scores only the test ids in manifest.json (made at build time),
     ignores untagged lines, fails a test reported twice with different outcomes, and gives 0 to tests that
     never reported (time limit, crash, import error), saying why.
  5. Scores come from manifest.json (POINTS of test_diffusion.py split evenly over each function's tests); the
     runner writes results.json itself, after the test process is gone, replacing any file found there.

What this protects against: infinite loops and very slow code (per-test timeout, then the wall-clock
limit), crashes and os._exit in student code (tests that did not report get 0 with a reason), a missing file,
syntax and import errors (clear 0), a submission that writes results.json or prints fake results (its writes are
overwritten or, as `nobody`, refused; its stdout is not parsed), a submission that writes lines into the report
pipe without the token (ignored).
What it does not: the student's code shares a Python process with the tests, so a submission written to attack
the grader from inside (monkeypatching the tests, pytest or the plugin, or digging the token out of memory)
could fake outcomes. No in-process check can rule that out; the runner flags such code (mentions of the
tests, pytest, the plugin, sys.modules, gc, frames, /proc, results.json, ...) in a hidden result for the
instructor, and Gradescope keeps every submission for review.
"""
import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GRADER_FILES = ["test_diffusion.py", "test_fixtures", "unet.py", "grading_plugin.py"]
SUSPICIOUS = {  # shown to instructors only; mentions are not proof of anything
    "test_diffusion": r"test_diffusion", "pytest": r"\bpytest\b", "grading_plugin": r"grading_plugin",
    "sys.modules": r"sys\.modules", "gc": r"\bgc\b", "_getframe": r"_getframe", "inspect": r"\binspect\b",
    "/proc": r"/proc", "results.json": r"results\.json", "GRADING_": r"GRADING_", "os.environ": r"os\.environ",
    "builtins": r"\bbuiltins\b", "ctypes": r"\bctypes\b", "os._exit": r"os\._exit", "subprocess": r"\bsubprocess\b",
    "sys.settrace": r"sys\.settrace", "atexit": r"\batexit\b", "os.write": r"os\.write",
}


def find_submission(folder):
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        if "diffusion.py" in files:
            found.append(os.path.join(parent, "diffusion.py"))
    found.sort(key=lambda p: (p.count(os.sep), p))
    return found[0] if found else None


def listing(folder, limit=20):
    names = []
    for parent, _, files in os.walk(folder):
        names += [os.path.relpath(os.path.join(parent, f), folder) for f in files]
    names.sort()
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "") if names else "(nothing)"


def _can_run_as_nobody(python):
    if os.name != "posix" or os.geteuid() != 0:
        return None
    try:
        import pwd

        user = pwd.getpwnam("nobody")
    except (ImportError, KeyError):
        return None
    try:
        probe = subprocess.run([python, "-c", "import pytest, torch"], preexec_fn=_drop_to(user), capture_output=True,
                               timeout=120, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp"})
    except (OSError, subprocess.SubprocessError):
        return None
    return user if probe.returncode == 0 else None


def _drop_to(user):
    def drop():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return drop


def run_tests(work, python, time_limit, test_timeout, user):
    """Runs pytest on `work` in a child process; returns (records by test id, collect errors, note)."""
    report_r, report_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    nonce = secrets.token_hex(16)
    os.write(nonce_w, nonce.encode())
    os.close(nonce_w)
    home = os.path.join(work, ".home")
    os.makedirs(home, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": work, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
        "DIFFUSION_TEST_TIMEOUT": str(test_timeout),
        "GRADING_REPORT_FD": str(report_w), "GRADING_NONCE_FD": str(nonce_r),
    }
    if user is not None:
        for parent, dirs, files in os.walk(work):
            os.chmod(parent, 0o755)
            for f in files:
                os.chmod(os.path.join(parent, f), 0o644)
        os.chown(home, user.pw_uid, user.pw_gid)
    cmd = [python, "-m", "pytest", "-p", "grading_plugin", "-p", "no:cacheprovider", "-q", "--tb=short",
           "-c", os.path.join(work, "pytest.ini"), "--rootdir", work, "test_diffusion.py"]
    log_path = os.path.join(os.path.dirname(work), "pytest_output.txt")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                pass_fds=(report_w, nonce_r), start_new_session=True,
                                preexec_fn=_drop_to(user) if user is not None else None)
    os.close(report_w)
    os.close(nonce_r)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(os.fdopen(report_r, "r", errors="replace")), daemon=True)
    reader.start()
    note = ""
    try:
        proc.wait(timeout=time_limit)
    except subprocess.TimeoutExpired:
        note = f"the test run reached the time limit of {time_limit:.0f} s and was stopped"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also any processes the submission started
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    reader.join(timeout=10)
    if not note and proc.returncode not in (0, 1):
        note = f"the test process ended with exit code {proc.returncode} before every test had reported"
    records, conflicts, collect_errors = {}, set(), []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("nonce") != nonce:
            continue
        if "collect_error" in record:
            collect_errors.append(str(record["collect_error"]))
            continue
        test_id = str(record.get("id"))
        entry = (bool(record.get("passed") is True), str(record.get("output", "")))
        if test_id in records and records[test_id][0] != entry[0]:
            conflicts.add(test_id)
        records[test_id] = entry
    for test_id in conflicts:
        records[test_id] = (False, "this test reported conflicting outcomes; it counts as failed.")
    with open(log_path, errors="replace") as f:
        log_text = f.read()
    return records, collect_errors, note, log_text


def grade(root, python=sys.executable, time_limit=480.0, test_timeout=60.0):
    with open(os.path.join(HERE, "manifest.json")) as f:
        manifest = json.load(f)
    results_path = os.path.join(root, "results", "results.json")
    os.makedirs(os.path.dirname(results_path), exist_ok=True)
    if os.path.exists(results_path):
        os.remove(results_path)
    submission_dir = os.path.join(root, "submission")
    records, general, hidden = {}, "", []
    submitted = find_submission(submission_dir) if os.path.isdir(submission_dir) else None
    if submitted is None:
        general = ("No diffusion.py found in your submission (found: " + listing(submission_dir) + "). "
                   "Upload your diffusion.py (the file itself, or a zip containing it).")
    else:
        with open(submitted, "rb") as f:
            source = f.read()
        try:
            compile(source, "diffusion.py", "exec")
        except SyntaxError as exc:
            general = (f"diffusion.py has a syntax error at line {exc.lineno}: {exc.msg}"
                       + (f"\n    {exc.text.rstrip()}" if exc.text else "") + "\nNothing could be run.")
        except ValueError as exc:
            general = f"diffusion.py could not be read as Python source: {exc}"
        if not general:
            text = source.decode("utf-8", errors="replace")
            flagged = sorted(label for label, pattern in SUSPICIOUS.items() if re.search(pattern, text))
            if flagged:
                hidden.append("submission mentions: " + ", ".join(flagged))
            with tempfile.TemporaryDirectory(prefix="grade-") as parent:
                os.chmod(parent, 0o755)
                work = os.path.join(parent, "work")
                os.makedirs(work)
                for item in GRADER_FILES:
                    src = os.path.join(HERE, item)
                    if os.path.isdir(src):
                        shutil.copytree(src, os.path.join(work, item))
                    else:
                        shutil.copy(src, work)
                with open(os.path.join(work, "diffusion.py"), "wb") as f:
                    f.write(source)
                with open(os.path.join(work, "pytest.ini"), "w") as f:
                    f.write("[pytest]\naddopts = -p no:cacheprovider\n")
                user = _can_run_as_nobody(python)
                hidden.append("test process ran as " + ("nobody" if user else "the grader's user"))
                records, collect_errors, note, log = run_tests(work, python, time_limit, test_timeout, user)
                hidden.append("pytest output (tail):\n" + log[-3000:])
            if collect_errors:
                general = ("The tests could not import your diffusion.py:\n" + collect_errors[0][-2500:])
            elif note and len(records) < len(manifest["tests"]):
                general = f"Not every test ran: {note}."
    tests, total = [], 0.0
    for test in manifest["tests"]:
        passed, output = records.get(test["id"], (False, None))
        if output is None:
            output = general or "This test did not report a result (the test process stopped early)."
        score = test["max_score"] if passed else 0.0
        total += score
        tests.append({"name": f"{test['function']}: {test['id'].split('::')[-1]}", "score": round(score, 4),
                      "max_score": round(test["max_score"], 4), "output": output or "passed",
                      "visibility": "visible"})
    tests.append({"name": "grader notes (instructors only)", "score": 0, "max_score": 0,
                  "output": "\n".join(hidden) or "-", "visibility": "hidden"})
    summary = "\n".join(f"{function}: {sum(t['score'] for t in tests if t['name'].startswith(function + ':')):.2f} / {points}"
                        for function, points in manifest["points"].items())
    result = {"score": round(total, 4), "output": (general + "\n\n" if general else "") + summary,
              "visibility": "visible", "stdout_visibility": "hidden", "tests": tests}
    with open(results_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.environ.get("AUTOGRADER_ROOT", "/autograder"))
    parser.add_argument("--python", default=sys.executable, help="interpreter for the test process")
    parser.add_argument("--time-limit", type=float, default=float(os.environ.get("GRADER_TIME_LIMIT", "480")))
    parser.add_argument("--test-timeout", type=float, default=float(os.environ.get("GRADER_TEST_TIMEOUT", "60")))
    args = parser.parse_args(argv)
    try:
        result = grade(args.root, args.python, args.time_limit, args.test_timeout)
    except Exception as exc:  # noqa: BLE001 - never leave Gradescope without a results file
        import traceback

        result = {"score": 0, "output": f"The grader itself failed ({type(exc).__name__}: {exc}); please tell the "
                                        "course staff. Your submission was not graded.", "tests": [],
                  "stdout_visibility": "hidden"}
        os.makedirs(os.path.join(args.root, "results"), exist_ok=True)
        with open(os.path.join(args.root, "results", "results.json"), "w") as f:
            json.dump(result, f)
        traceback.print_exc()
        return 1
    print(f"score {result['score']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
