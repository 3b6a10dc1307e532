"""Helpers for tests that grade submissions with the built autograder.zip in a simulated Gradescope folder.

The simulation is the real thing run locally: run_autograder with AUTOGRADER_ROOT (the /autograder stand-in)
and AUTOGRADER_PYTHON (the interpreter). When the tests run as root, the grader runs the submission as a
throwaway unprivileged uid, which needs an interpreter that such a uid can execute: the first of
$AUTOGRADER_TEST_PYTHON, this interpreter, /tmp/venv-cpu/bin/python that can import torch and pytest as that
uid (in the grader's private mount namespace where the machine allows one: there the interpreter's folders are
exposed even if they sit under /root). When the tests are not root, the grader can only run in its development mode (GRADER_ALLOW_SAME_USER=1,
no isolation): the functional tests still run, the attack tests are skipped (they need the isolation).
"""
import functools
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import make_autograder  # noqa: E402
import make_handout  # noqa: E402
import mutation_test  # noqa: E402

REFERENCE = open(os.path.join(REPO, "diffusion.py")).read()
BARE_HANDOUT = make_handout.strip_solutions(REFERENCE)[0]


def mutant(*names):
    source = REFERENCE
    for name in names:
        source = mutation_test.apply(source, next(m for m in mutation_test.MUTANTS if m.name == name))
    return source


def _runs_unprivileged(python):
    """Whether the grader could run `python` as an unprivileged uid (inside its private mount namespace, where the
    machine allows one, the interpreter's folders are exposed, so even one under /root may do)."""
    import autograder_runner

    uid = 1_999_999
    visible = None
    if autograder_runner.can_hide_filesystem():
        visible = sorted({os.path.dirname(os.path.dirname(os.path.abspath(python))),
                          os.path.dirname(os.path.dirname(os.path.realpath(python)))} - {"/"})
    try:
        proc = subprocess.run([python, "-I", "-c", "import torch, pytest"], capture_output=True, timeout=300, cwd="/",
                              env={"PATH": "/usr/bin:/bin", "HOME": "/"},
                              preexec_fn=autograder_runner.make_sandbox(8 << 30, uid, visible))
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


@functools.lru_cache(maxsize=None)
def environment():
    """(python, mode): mode 'isolated' (root, unprivileged uid works), 'same-user' (not root) or 'none'."""
    if os.geteuid() != 0:
        return sys.executable, "same-user"
    for python in (os.environ.get("AUTOGRADER_TEST_PYTHON"), sys.executable, "/tmp/venv-cpu/bin/python"):
        if python and os.path.exists(python) and _runs_unprivileged(python):
            return python, "isolated"
    return sys.executable, "none"


def build(path):
    return make_autograder.build(str(path))


def grade(zip_path, root, files, env=None, python=None, timeout=400, cgroup=None):
    """Unpack the zip into root/source, put `files` ({relative path: text or ('symlink', target)}) into
    root/submission, run run_autograder (inside the cgroup whose cgroup.procs files `cgroup` lists, if given);
    returns (completed process, results.json as a dict)."""
    default_python, mode = environment()
    (root / "source").mkdir(parents=True)
    (root / "submission").mkdir()
    make_autograder.unpack(zip_path, root / "source")
    for rel, content in files.items():
        path = root / "submission" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple) and content[0] == "symlink":
            os.symlink(content[1], path)
        else:
            path.write_text(content)
    run_env = dict(os.environ, AUTOGRADER_ROOT=str(root), AUTOGRADER_PYTHON=python or default_python,
                   GRADER_MEMORY_MB=os.environ.get("GRADER_MEMORY_MB", "1500"), OMP_NUM_THREADS="1")
    if mode == "same-user":
        run_env["GRADER_ALLOW_SAME_USER"] = "1"
    run_env.update(env or {})
    def join_cgroup():
        for path in cgroup or ():
            with open(path, "w") as f:
                f.write(str(os.getpid()))

    proc = subprocess.run(["bash", str(root / "source" / "run_autograder")], capture_output=True, text=True,
                          timeout=timeout, env=run_env, preexec_fn=join_cgroup if cgroup else None)
    with open(root / "results" / "results.json") as f:
        return proc, json.load(f)


def visible(result):
    return [t for t in result["tests"] if t.get("visibility") != "hidden"]


def hidden(result):
    return "\n".join(t["output"] for t in result["tests"] if t.get("visibility") == "hidden")


def by_function(result):
    scores = {}
    for t in visible(result):
        function = t["name"].split(":")[0]
        got, most = scores.get(function, (0.0, 0.0))
        scores[function] = (got + t["score"], most + t["max_score"])
    return scores
