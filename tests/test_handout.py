"""tools/make_handout.py: what the handout holds, and how it behaves for a student.

On the built handout: `pytest test_diffusion.py` collects and fails every graded test with the
not-implemented message (score 0, no crash); `python main.py --smoke` stops asking for the TODOs; with the
reference diffusion.py put back, every test passes (full marks).
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile
import xml.etree.ElementTree as ET

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import make_handout  # noqa: E402

N_TESTS = 41


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    make_handout.build(str(out / "handout"), str(out / "handout.zip"))
    return out / "handout", out / "handout.zip"


def run_pytest(folder, tmp_path):
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}"],
                          cwd=folder, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    cases = ET.parse(junit).getroot().iter("testcase") if junit.exists() else []
    results = {}
    for case in cases:
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        results[case.get("name")] = None if failure is None else (failure.get("message", "") + (failure.text or ""))
    return proc, results


def test_handout_contents(handout):
    folder, zip_path = handout
    for name in ["diffusion.py", "unet.py", "test_diffusion.py", "conftest.py", "pytest.ini", "requirements.txt",
                 "test_fixtures/reference_outputs.json"]:
        assert (folder / name).is_file(), name
    for name in ["tests", "tools", "bench", ".ci", "build", ".git"]:
        assert not (folder / name).exists(), name
    for name in make_handout.STUDENT_FILES:  # unchanged copies of whatever exists
        if os.path.isfile(os.path.join(REPO, name)):
            with open(os.path.join(REPO, name), "rb") as a, open(folder / name, "rb") as b:
                assert a.read() == b.read(), name
    assert "testpaths = test_diffusion.py" in (folder / "pytest.ini").read_text()
    with zipfile.ZipFile(zip_path) as z:
        zipped = {n[len("handout/"):] for n in z.namelist()}
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert zipped == on_disk


def test_diffusion_py_is_stripped(handout):
    folder, _ = handout
    text = (folder / "diffusion.py").read_text()
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    for solution_line in ["torch.cumprod(alphas", "posterior_mean_coef_x0", "F.l1_loss", "reversed(range(",
                          "torch.randint(", "x_0.clamp(-1.0, 1.0)", "self.noise_like(shape, device)"]:
        assert solution_line not in text, solution_line
    stubs = re.findall(r'raise NotImplementedError\("TODO: implement Diffusion\.(\w+) in diffusion\.py \(handout: ([^)]*)',
                       text)
    assert sorted(m for m, _ in stubs) == sorted(
        ["__init__", "q_sample", "p_losses", "forward", "p_sample", "p_sample_loop", "sample"])
    assert all(re.search(r"eq\.|Algorithm", pointer) for _, pointer in stubs)
    # everything outside the solution regions is unchanged
    reference = open(os.path.join(REPO, "diffusion.py")).read()
    for helper in ["def extract(", "def cosine_schedule(", "def normalize_to_neg_one_to_one(", "def noise_like("]:
        assert helper in text and helper in reference


def test_bare_handout_scores_zero_without_crashing(handout, tmp_path):
    folder, _ = handout
    proc, results = run_pytest(folder, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]  # tests failed; 2-4 would be a collection/usage/internal error
    assert len(results) == N_TESTS, output[-3000:]
    for name, failure in results.items():
        assert failure is not None, f"{name} passed on the bare handout"
        assert "not implemented yet" in failure and "TODO: implement Diffusion." in failure, (name, failure[:500])
    assert re.search(r"total\s+0\.00 / 100", output), output[-2000:]
    # compact: no chained tracebacks, each check one progress letter, each unimplemented function one line
    assert "During handling" not in output and "Traceback" not in output, output[-3000:]
    assert len(output.splitlines()) <= 40, output
    todo_lines = [line for line in output.splitlines() if line.strip().startswith("TODO: implement Diffusion.")]
    functions = [re.search(r"Diffusion\.(\w+)", line).group(1) for line in todo_lines]
    assert len(functions) == len(set(functions)) and "__init__" in functions, todo_lines
    assert re.search(r"\b41 todo\b", output), output[-500:]


def test_handout_with_reference_gets_full_marks(handout, tmp_path):
    folder, _ = handout
    full = tmp_path / "solved"
    shutil.copytree(folder, full)
    shutil.copy(os.path.join(REPO, "diffusion.py"), full / "diffusion.py")
    proc, results = run_pytest(full, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert len(results) == N_TESTS and all(v is None for v in results.values())
    assert re.search(r"total\s+100\.00 / 100", output), output[-2000:]


def test_smoke_run_asks_for_the_todos(handout, tmp_path):
    folder, _ = handout
    if not (folder / "main.py").exists():
        pytest.skip("main.py is not in the repository yet")
    work = tmp_path / "smoke"
    shutil.copytree(folder, work)
    proc = subprocess.run([sys.executable, "main.py", "--smoke"], cwd=work, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, WANDB_MODE="disabled"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    assert "implement the TODOs in diffusion.py" in output, output[-2000:]
    assert "Traceback" not in output, output[-2000:]
