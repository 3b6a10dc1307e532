"""Build build/autograder.zip for Gradescope (instructors only).

    python tools/make_autograder.py                  # -> build/autograder.zip
    python tools/make_autograder.py --out /tmp/ag.zip

Zip layout (Gradescope's format, everything at the top level; Gradescope unpacks it into /autograder/source):
  setup.sh          installs CPU-only torch and pytest (versions pinned from requirements.txt)
  run_autograder    runs grader.py, which writes /autograder/results/results.json
  grader.py         tools/autograder_runner.py (see its docstring for the isolation and its limits)
  grading_plugin.py tools/grading_plugin.py (per-test outcomes to the runner)
  manifest.json     every graded test id with its function and max_score (POINTS split evenly per function)
  test_diffusion.py, test_fixtures/, unet.py

The test run needs well under 768 MB (CPU torch plus tiny tensors) and a few seconds on a CPU for a correct
submission; set the Gradescope autograder timeout to 10 minutes (the runner stops itself after 8).
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
# Gradescope setup: CPU-only PyTorch and the test tools (no GPU on Gradescope; keeps memory well under 768 MB).
set -euo pipefail
if ! command -v pip3 >/dev/null; then
    apt-get update && apt-get install -y python3 python3-pip
fi
pip3 install --no-cache-dir "torch=={torch}" --index-url https://download.pytorch.org/whl/cpu
pip3 install --no-cache-dir "numpy{numpy}" "pytest{pytest}" "pytest-timeout{pytest_timeout}"
"""


def requirement(name, default):
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            m = re.match(rf"\s*{re.escape(name)}\s*([=<>!~][^#\s]*(?:,[^#\s]*)*)", line)
            if m:
                return m.group(1)
    return default


def collect_manifest():
    """Graded test ids of test_diffusion.py with their function and max_score."""
    code = r"""
import json, sys, pytest
class C:
    def __init__(self): self.items = []
    def pytest_collection_modifyitems(self, items):
        for item in items:
            m = item.get_closest_marker("graded")
            if m is not None:
                self.items.append((item.nodeid, m.args[0]))
c = C()
rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "test_diffusion.py"], plugins=[c])
import test_diffusion
print("MANIFEST" + json.dumps({"items": c.items, "points": test_diffusion.POINTS}))
sys.exit(rc)
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
                            pytest=requirement("pytest", ">=8.0"), pytest_timeout=requirement("pytest-timeout", ">=2.3"))

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
        add_file(z, "tools/grading_plugin.py", "grading_plugin.py")
        add_file(z, "test_diffusion.py", "test_diffusion.py")
        add_file(z, "unet.py", "unet.py")
        for name in sorted(os.listdir(os.path.join(ROOT, "test_fixtures"))):
            add_file(z, os.path.join("test_fixtures", name), f"test_fixtures/{name}")
        add_text(z, "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "autograder.zip"))
    args = parser.parse_args(argv)
    manifest = build(args.out)
    print(f"{args.out}: {len(manifest['tests'])} graded tests, {sum(manifest['points'].values())} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
