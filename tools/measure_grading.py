"""Time and peak memory of one simulated Gradescope run (instructors only).

    python tools/measure_grading.py --zip build/autograder.zip --python /tmp/venv-cpu/bin/python [--submission diffusion.py]

Unpacks the zip into a fresh AUTOGRADER_ROOT, grades the submission (default: the reference diffusion.py) with
run_autograder, and samples every 50 ms the resident memory summed over the whole process tree (the runner, the
trusted processes, the student's processes). Run it as root, as Gradescope does.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from autograder_runner import rss_of  # noqa: E402  (resident memory summed over processes, as the grader's watchdog)
from make_autograder import unpack  # noqa: E402


def tree(pid):
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", default=os.path.join(ROOT, "build", "autograder.zip"))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--submission", default=os.path.join(ROOT, "diffusion.py"))
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="measure-")
    try:
        os.makedirs(os.path.join(root, "submission"))
        unpack(args.zip, os.path.join(root, "source"))
        shutil.copy(args.submission, os.path.join(root, "submission", "diffusion.py"))
        env = dict(os.environ, AUTOGRADER_ROOT=root, AUTOGRADER_PYTHON=args.python, OMP_NUM_THREADS="1")
        start = time.time()
        proc = subprocess.Popen(["bash", os.path.join(root, "source", "run_autograder")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, rss_of(tree(proc.pid)))
            time.sleep(0.05)
        elapsed = time.time() - start
        output = proc.stdout.read().decode(errors="replace").strip().splitlines()
        print(f"{output[-1] if output else '(no output)'}; {elapsed:.1f} s; peak RSS of the process tree "
              f"{peak / 2 ** 20:.0f} MB; python {args.python}")
        with open(os.path.join(root, "results", "results.json")) as f:
            notes = [t["output"] for t in json.load(f)["tests"] if t.get("visibility") == "hidden"]
        for line in "\n".join(notes).splitlines():  # the sandbox the run had, and the student side's memory
            if line.startswith(("memory limit", "peak memory", "cgroup", "namespaces", "plan:", "probes:")):
                print("  " + line)
        return proc.returncode
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
