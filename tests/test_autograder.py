"""tools/make_autograder.py: autograder.zip in Gradescope's layout, graded in a simulated /autograder folder.

Full score for the reference, partial scores for a few mutants, zero with a clear message for the bare
handout and for broken submissions (missing file, syntax error, crash at import, a submission that tries to
forge the results), and an infinite loop only costs the tests it hangs.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import make_autograder  # noqa: E402
import make_handout  # noqa: E402
import mutation_test  # noqa: E402

REFERENCE = open(os.path.join(REPO, "diffusion.py")).read()


def mutant(name):
    return mutation_test.apply(REFERENCE, next(m for m in mutation_test.MUTANTS if m.name == name))


def forging_submission(results_path):
    # tries to write a perfect results.json and fake pipe reports, then behaves like the bare handout
    return make_handout.strip_solutions(REFERENCE)[0] + f'''
import json as _json, os as _os
_fake = {{"score": 1000, "tests": []}}
try:
    with open({str(results_path)!r}, "w") as _f:
        _json.dump(_fake, _f)
except OSError:
    pass
for _fd in range(3, 64):
    try:
        _os.write(_fd, b'{{"id": "test_diffusion.py::test_q_sample_shape_and_dtype", "passed": true, "output": ""}}\\n')
    except OSError:
        pass
print('{{"score": 1000}}')
'''


CASES = {
    # name: (files in submission/, extra env)
    "reference": ({"diffusion.py": REFERENCE}, {}),
    "reference_in_subfolder": ({"hw/diffusion.py": REFERENCE, "hw/notes.txt": "hi"}, {}),
    "mutant_p_losses_mse": ({"diffusion.py": mutant("p_losses_mse")}, {}),
    "mutant_loop_ascending": ({"diffusion.py": mutant("loop_ascending")}, {}),
    "mutant_q_sample": ({"diffusion.py": mutant("q_sample_one_minus_alpha_bar_no_sqrt")}, {}),
    "bare_handout": ({"diffusion.py": make_handout.strip_solutions(REFERENCE)[0]}, {}),
    "missing_file": ({"diffusion_v2.py": REFERENCE}, {}),
    "syntax_error": ({"diffusion.py": REFERENCE.replace("def q_sample(self, x_0, t, noise):", "def q_sample(self, x_0, t, noise)")}, {}),
    "crash_at_import": ({"diffusion.py": "import os\nos._exit(3)\n" + REFERENCE}, {}),
    "error_at_import": ({"diffusion.py": "raise RuntimeError('boom at import')\n" + REFERENCE}, {}),
    "hangs_at_import": ({"diffusion.py": "while True:\n    pass\n" + REFERENCE}, {"GRADER_TIME_LIMIT": "12"}),
    "hangs_in_sample": ({"diffusion.py": REFERENCE.replace(
        "        was_training = self.model.training\n", "        while True:\n            pass\n")},
        {"GRADER_TEST_TIMEOUT": "2"}),
    "forges_results": (None, {}),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    base = tmp_path_factory.mktemp("autograder")
    zip_path = base / "autograder.zip"
    manifest = make_autograder.build(str(zip_path))

    def run(name):
        files, env = CASES[name]
        root = base / name
        (root / "source").mkdir(parents=True)
        (root / "submission").mkdir()
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(root / "source")
        if files is None:
            files = {"diffusion.py": forging_submission(root / "results" / "results.json")}
        for rel, text in files.items():
            (root / "submission" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "submission" / rel).write_text(text)
        proc = subprocess.run(["bash", str(root / "source" / "run_autograder")], capture_output=True, text=True,
                              timeout=240, env=dict(os.environ, AUTOGRADER_ROOT=str(root),
                                                    AUTOGRADER_PYTHON=sys.executable, **env))
        with open(root / "results" / "results.json") as f:
            return name, (proc, json.load(f))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = dict(pool.map(run, CASES))
    return manifest, results


def visible(result):
    return [t for t in result["tests"] if t.get("visibility") != "hidden"]


def test_zip_layout(tmp_path):
    manifest = make_autograder.build(str(tmp_path / "ag.zip"))
    with zipfile.ZipFile(tmp_path / "ag.zip") as z:
        names = set(z.namelist())
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in z.infolist()}
        setup = z.read("setup.sh").decode()
    assert {"setup.sh", "run_autograder", "grader.py", "grading_plugin.py", "manifest.json", "test_diffusion.py",
            "unet.py", "test_fixtures/diffusion_reference.pt"} <= names
    assert not any(n.startswith(("tools/", "tests/")) or "alt_solutions" in n or n == "diffusion.py" for n in names)
    assert modes["run_autograder"] & 0o111 and modes["setup.sh"] & 0o111
    assert "download.pytorch.org/whl/cpu" in setup and "pytest-timeout" in setup
    assert abs(sum(t["max_score"] for t in manifest["tests"]) - 100) < 1e-9
    assert len(manifest["tests"]) == 45


def test_reference_gets_full_score(graded):
    manifest, results = graded
    for name in ("reference", "reference_in_subfolder"):
        proc, result = results[name]
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert abs(result["score"] - 100) < 1e-3, (name, result["output"])
        tests = visible(result)
        assert len(tests) == len(manifest["tests"])
        assert all(t["score"] == t["max_score"] for t in tests)
        assert all({"name", "score", "max_score", "output", "visibility"} <= set(t) for t in result["tests"])


@pytest.mark.parametrize("name,function,hint", [
    ("mutant_p_losses_mse", "p_losses", "squared error (MSE)"),
    ("mutant_loop_ascending", "p_sample_loop", "runs upward"),
    ("mutant_q_sample", "q_sample", "sqrt(1 - alpha_bar_t) belongs"),
])
def test_mutants_get_partial_scores_with_hints(graded, name, function, hint):
    _, results = graded
    _, result = results[name]
    assert 0 < result["score"] < 100, result["output"]
    failed = [t for t in visible(result) if t["score"] < t["max_score"]]
    assert failed and any(t["name"].startswith(function + ":") for t in failed)
    assert any(hint in t["output"] for t in failed), [t["output"][:300] for t in failed]


@pytest.mark.parametrize("name,message", [
    ("bare_handout", "not implemented yet"),
    ("missing_file", "No diffusion.py found in your submission (found: diffusion_v2.py)"),
    ("syntax_error", "syntax error at line"),
    ("crash_at_import", "exit code 3"),
    ("error_at_import", "boom at import"),
    ("hangs_at_import", "time limit of 12 s"),
])
def test_broken_submissions_get_zero_with_a_clear_message(graded, name, message):
    _, results = graded
    proc, result = results[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["score"] == 0, result["output"]
    assert all(t["score"] == 0 for t in result["tests"])
    assert all(message in t["output"] for t in visible(result)), [t["output"][:300] for t in visible(result)][:3]


def test_infinite_loop_costs_only_the_tests_it_hangs(graded):
    _, results = graded
    _, result = results["hangs_in_sample"]
    by_function = {}
    for t in visible(result):
        by_function.setdefault(t["name"].split(":")[0], []).append(t)
    assert all(t["score"] == 0 and "Timeout" in t["output"] for t in by_function["sample"])
    assert abs(result["score"] - 90) < 1e-3, result["output"]


def test_submission_cannot_forge_the_results(graded):
    _, results = graded
    proc, result = results["forges_results"]
    assert proc.returncode == 0
    assert result["score"] == 0, result["output"]
    assert len(visible(result)) == 45
    hidden = [t for t in result["tests"] if t.get("visibility") == "hidden"][0]["output"]
    assert "submission mentions:" in hidden and "results.json" in hidden and "os.write" in hidden
