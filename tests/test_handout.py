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
from conftest import HANG_GUARD_S  # noqa: E402

N_TESTS = 43


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    make_handout.build(str(out / "handout"), str(out / "handout.zip"))
    return out / "handout", out / "handout.zip"


def run_pytest(folder, tmp_path, *options):
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}", *options],
                          cwd=folder, capture_output=True, text=True, timeout=HANG_GUARD_S,
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
    for name in ["diffusion.py", "unet.py", "test_diffusion.py", "grading.py", "conftest.py", "pytest.ini",
                 "requirements.txt", "test_fixtures/reference_outputs.json"]:
        assert (folder / name).is_file(), name
    for name in ["tests", "tools", "bench", ".ci", "build", ".git"]:
        assert not (folder / name).exists(), name
    for name in make_handout.STUDENT_FILES:  # unchanged copies of whatever exists (README.md: rendered, below)
        if os.path.isfile(os.path.join(REPO, name)) and name not in make_handout.RENDERED:
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
    assert re.search(r"\b43 todo\b", output), output[-500:]


def test_handout_with_reference_gets_full_marks(handout, tmp_path):
    folder, _ = handout
    full = tmp_path / "solved"
    shutil.copytree(folder, full)
    shutil.copy(os.path.join(REPO, "diffusion.py"), full / "diffusion.py")
    # as a student runs it: pytest-timeout (requirements-dev.txt only) is not installed
    proc, results = run_pytest(full, tmp_path, "-p", "no:timeout")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Warning" not in output, output[-3000:]  # e.g. PytestUnknownMarkWarning for the checks' timeout marks
    assert len(results) == N_TESTS and all(v is None for v in results.values())
    assert re.search(r"total\s+100\.00 / 100", output), output[-2000:]


def test_smoke_run_asks_for_the_todos(handout, tmp_path):
    folder, _ = handout
    if not (folder / "main.py").exists():
        pytest.skip("main.py is not in the repository yet")
    work = tmp_path / "smoke"
    shutil.copytree(folder, work)
    proc = subprocess.run([sys.executable, "main.py", "--smoke"], cwd=work, capture_output=True, text=True,
                          timeout=HANG_GUARD_S,
                          env=dict(os.environ, WANDB_MODE="disabled"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    assert "implement the TODOs in diffusion.py" in output, output[-2000:]
    assert "Traceback" not in output, output[-2000:]


# ------------------------------------------------------------------------------------------------ the student README

# Text that only makes sense in the instructors' master copy: none of it may reach the handout's READMEs.
INSTRUCTOR_ONLY_PHRASES = [
    "master copy", "full solution", "BEGIN SOLUTION", "END SOLUTION", "BEGIN/END SOLUTION", "Grading (instructors)",
    "tests/", "tools/", "bench/", ".ci/", "../shared", "requirements-dev", "make_handout",
    "make_autograder", "mutation", "alt_solutions", "GRADING.md", "RESULTS.md", "instructors-only", "students-only",
    "<!--",
]
# What a student has to be told.
STUDENT_INSTRUCTIONS = [
    "Implement the TODOs in `diffusion.py`", "pytest test_diffusion.py", "python main.py", "run_in_colab.ipynb",
    "run_in_kaggle.ipynb", "handout.zip", "7.1", "7.2", "7.3", "7.4", "7.5", "loss.png", "fid.png",
    "forward_diffusion.png", "backward_diffusion.png", "download.pytorch.org/whl/cpu",
]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"  # [text](target), ![alt](target)
                  r"|^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)"  # [ref]: target
                  r"|<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"", re.M)  # <img src="..."> <a href="...">


def relative_links(text):
    targets = [next(t for t in m.groups() if t) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^(?:[a-z][a-z0-9+.-]*:|#)", t, re.I)]


@pytest.mark.parametrize("readme", ["README.md", "data/README.md"])
def test_handout_readmes_have_no_dead_links_and_no_instructor_text(handout, readme):
    folder, _ = handout
    text = (folder / readme).read_text(encoding="utf-8")
    for phrase in INSTRUCTOR_ONLY_PHRASES:
        assert phrase not in text, f"handout {readme} says {phrase!r}: mark that part instructors-only in {readme}"
    links = relative_links(text)
    if readme == "README.md":
        assert any(link.startswith("data/README.md") for link in links)  # the check below sees the links
    base = (folder / readme).parent
    for link in links:
        target = (base / link.split("#")[0]).resolve()
        assert target.is_relative_to(folder.resolve()) and target.exists(), (
            f"handout {readme} links to {link!r}, which is not in the handout")


def test_handout_readme_tells_the_student_what_to_do(handout):
    folder, _ = handout
    text = (folder / "README.md").read_text(encoding="utf-8")
    for instruction in STUDENT_INSTRUCTIONS:
        assert instruction in text, f"the handout README does not say {instruction!r}"
    # the Files table's diffusion.py row, in its student form
    assert re.search(r"^\| `diffusion.py` \| the student's file[^\n|]*\(your TODOs\) \|", text, re.M)


def test_master_readme_keeps_the_instructor_text_and_hides_the_student_text():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        master = f.read()
    assert "master copy" in master and "## Grading (instructors)" in master
    shown = re.sub(r"<!--.*?-->", "", master, flags=re.S)  # what a Markdown viewer shows of the master
    assert "## Your homework" not in shown and "(your TODOs)" not in shown
    assert "## Your homework" in make_handout.render_readme(master)


def test_render_readme_markers():
    render = make_handout.render_readme
    text = ("Intro.\n\n<!-- instructors-only -->\nfor instructors\n<!-- /instructors-only -->\n<!-- students-only:\n"
            "## For students\n-->\n\n| a | b<!-- instructors-only --> (secret)<!-- /instructors-only --> |\n"
            "| tools/ | x <!-- instructors-only line --> |\nEnd <!-- students-only: here --> now.\n")
    assert render(text) == "Intro.\n\n## For students\n\n| a | b |\nEnd here now.\n"
    for broken in ["a <!-- instructors-only --> b", "<!-- students-only: never closed", "x <!-- /instructors-only -->"]:
        with pytest.raises(ValueError, match="unmatched"):
            render(broken)


def test_no_development_paths_anywhere_in_the_handout(handout):
    folder, _ = handout
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".md", ".ipynb", ".txt", ".ini"):
            assert "../shared" not in path.read_text(encoding="utf-8"), f"{path.relative_to(folder)} names ../shared"
