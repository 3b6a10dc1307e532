"""Build build/autograder.zip for Gradescope (instructors only).

    python tools/make_autograder.py                  # -> build/autograder.zip
    python tools/make_autograder.py --out /tmp/ag.zip

Zip layout (Gradescope's format, everything at the top level; Gradescope unpacks it into /autograder/source):
  setup.sh              installs CPU-only torch, pytest and tqdm (versions pinned from requirements.txt)
  run_autograder        runs grader.py, which writes /autograder/results/results.json
  grader.py             tools/autograder_runner.py (the orchestration, the sandbox; see its docstring)
  trusted_judge.py      tools/grading_trusted.py (draws the secret inputs, runs the reference, judges; root only)
  probe_worker.py       tools/grading_worker.py (the only process that runs student code, unprivileged)
  test_diffusion.py     the graded checks and their judges (the same file students run locally)
  grading.py            the checks' machinery: probes, stand-ins, comparison, runner (also the students')
  reference/diffusion.py the reference solution (root-only at grading time)
  mutation_test.py      the mutant catalogue (known-mistake hints)
  manifest.json         every graded check with its function and max_score (POINTS split evenly per function)
No fixture: the autograder computes the reference's outputs for fresh inputs each run.

Grading the reference takes about 7 s and about 340 MB for the whole process tree with the CPU build of
torch; set the Gradescope autograder timeout to 10 minutes (the runner writes results.json within 9, whatever
the submission does).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope entry point: grade submission/diffusion.py into results/results.json.
# AUTOGRADER_ROOT and AUTOGRADER_PYTHON exist for local simulation (tests/test_autograder.py).
ROOT="${AUTOGRADER_ROOT:-/autograder}"
PYTHON="${AUTOGRADER_PYTHON:-python3}"
cd "$ROOT/source" || exit 1
exec "$PYTHON" grader.py --root "$ROOT" --python "$PYTHON"
"""

SETUP_SH = """#!/usr/bin/env bash
# Gradescope setup: CPU-only PyTorch, the test tools, and tqdm (students wrap their sampling loop in it). No GPU on
# Gradescope; keeps memory well under 768 MB. The course's other packages are stand-ins there (probe_worker.py).
set -euo pipefail
if ! command -v pip3 >/dev/null; then
    apt-get update && apt-get install -y python3 python3-pip
fi
pip3 install --no-cache-dir "torch=={torch}" --index-url https://download.pytorch.org/whl/cpu
pip3 install --no-cache-dir "numpy{numpy}" "pytest{pytest}" "pytest-timeout{pytest_timeout}" "tqdm{tqdm}"
"""


def requirement(name, default):
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            m = re.match(rf"\s*{re.escape(name)}\s*([=<>!~][^#\s]*(?:,[^#\s]*)*)", line)
            if m:
                return m.group(1)
    return default


def collect_manifest():
    """Graded checks of test_diffusion.py with their function and max_score."""
    code = r"""
import json, test_diffusion
print("MANIFEST" + json.dumps({"items": [(c.name, c.function) for c in test_diffusion.CHECKS],
                               "points": test_diffusion.POINTS}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("MANIFEST")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"collecting test_diffusion.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(line[len("MANIFEST"):])
    points = data["points"]
    counts = {f: sum(1 for _, g in data["items"] if g == f) for f in points}
    tests = [{"id": test_id, "function": f, "max_score": points[f] / counts[f]} for test_id, f in data["items"]]
    missing = [f for f, n in counts.items() if n == 0]
    if missing:
        raise SystemExit(f"functions with points but no tests: {missing}")
    return {"points": points, "tests": tests}


def build(out):
    manifest = collect_manifest()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    setup = SETUP_SH.format(torch=requirement("torch", "==2.14.1").lstrip("="), numpy=requirement("numpy", ""),
                            pytest=requirement("pytest", ">=8.0"), pytest_timeout=requirement("pytest-timeout", ">=2.3"),
                            tqdm=requirement("tqdm", ">=4.66"))

    def add_text(z, name, text, mode=0o644):
        info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
        info.external_attr = (0o100000 | mode) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, text)

    def add_file(z, src, name):
        with open(os.path.join(ROOT, src), "rb") as f:
            add_text(z, name, f.read())

    with zipfile.ZipFile(out, "w") as z:
        add_text(z, "setup.sh", setup, 0o755)
        add_text(z, "run_autograder", RUN_AUTOGRADER, 0o755)
        add_file(z, "tools/autograder_runner.py", "grader.py")
        add_file(z, "tools/grading_trusted.py", "trusted_judge.py")
        add_file(z, "tools/grading_worker.py", "probe_worker.py")
        add_file(z, "tools/mutation_test.py", "mutation_test.py")
        add_file(z, "test_diffusion.py", "test_diffusion.py")
        add_file(z, "grading.py", "grading.py")
        add_file(z, "diffusion.py", "reference/diffusion.py")
        add_text(z, "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def unpack(zip_path, folder):
    """Unpack the zip into `folder` as Gradescope does into /autograder/source (with each file's mode)."""
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(folder)
        for info in z.infolist():
            os.chmod(os.path.join(folder, info.filename), (info.external_attr >> 16) & 0o777 or 0o644)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "autograder.zip"))
    args = parser.parse_args(argv)
    manifest = build(args.out)
    print(f"{args.out}: {len(manifest['tests'])} graded tests, {sum(manifest['points'].values())} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
