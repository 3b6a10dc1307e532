"""tools/make_autograder.py: autograder.zip in Gradescope's layout, graded in a simulated /autograder folder.

Full score for the reference and for the alternative correct solutions, a single-function bug costs only that
function's points (one mutant per function), zero with a clear message for the bare handout and for broken
submissions (missing file, syntax error, crash at import), and an infinite loop only costs the checks it hangs.
Attacks on the grader: tests/test_autograder_attacks.py.
"""
import concurrent.futures
import os

import pytest

from autograder_sim import (BARE_HANDOUT, REFERENCE, REPO, build, by_function, environment, grade, hidden, mutant,
                            visible)

import make_autograder  # noqa: E402 - tools/ is on sys.path (autograder_sim)

# one mutant per function: its bug lives in that function only
SINGLE_FUNCTION_BUGS = {
    "schedule": "schedule_variance_missing_beta",
    "q_sample": "q_sample_swapped",
    "p_losses": "p_losses_mse",
    "forward": "forward_never_draws_last",
    "p_sample": "p_sample_no_clamp",
    "p_sample_loop": "loop_ascending",
    "sample": "sample_unnormalize_twice",
}
ALT_DIR = os.path.join(REPO, "tools", "alt_solutions")
CASES = {
    "reference_in_subfolder": ({"hw/diffusion.py": REFERENCE, "hw/notes.txt": "hi"}, {}),
    "bare_handout": ({"diffusion.py": BARE_HANDOUT}, {}),
    "missing_file": ({"diffusion_v2.py": REFERENCE}, {}),
    "syntax_error": ({"diffusion.py": REFERENCE.replace("def q_sample(self, x_0, t, noise):", "def q_sample(self, x_0, t, noise)")}, {}),
    "crash_at_import": ({"diffusion.py": "import os\nos._exit(3)\n" + REFERENCE}, {}),
    "error_at_import": ({"diffusion.py": "raise RuntimeError('boom at import')\n" + REFERENCE}, {}),
    "hangs_in_sample": ({"diffusion.py": REFERENCE.replace(
        "        was_training = self.model.training\n", "        while True:\n            pass\n")},
        {"GRADER_PROBE_TIMEOUT": "10"}),
}
for _function, _name in SINGLE_FUNCTION_BUGS.items():
    CASES[f"bug_in_{_function}"] = ({"diffusion.py": mutant(_name)}, {})
CASES["bug_in_schedule_storage"] = ({"diffusion.py": mutant("schedule_not_buffers")}, {})  # plain, unmoved attributes
# the rewrites that exercise the fairness rules (all of tools/alt_solutions/ pass locally: tests/test_mutation.py)
FAIRNESS_ALTERNATIVES = ["model_parameters_device", "plain_attributes_apply", "plain_attributes_moved_in_methods",
                         "noise_at_every_step"]
for _path in [os.path.join(ALT_DIR, n + ".py") for n in FAIRNESS_ALTERNATIVES]:
    CASES["alt_" + os.path.basename(_path)[:-3]] = ({"diffusion.py": open(_path).read()}, {})


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    if environment()[1] == "none":
        pytest.skip("running as root, but no interpreter that an unprivileged uid can run (set AUTOGRADER_TEST_PYTHON)")
    base = tmp_path_factory.mktemp("autograder")
    zip_path = base / "autograder.zip"
    manifest = build(zip_path)

    def run(name):
        files, env = CASES[name]
        return name, grade(zip_path, base / name, files, env)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(run, CASES))
    return manifest, results


def test_zip_layout(tmp_path):
    import zipfile

    manifest = make_autograder.build(str(tmp_path / "ag.zip"))
    with zipfile.ZipFile(tmp_path / "ag.zip") as z:
        names = set(z.namelist())
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in z.infolist()}
        setup = z.read("setup.sh").decode()
    assert {"setup.sh", "run_autograder", "grader.py", "trusted_judge.py", "probe_worker.py", "manifest.json",
            "test_diffusion.py", "reference/diffusion.py", "mutation_test.py"} <= names
    assert not any(n.startswith(("tools/", "tests/", "test_fixtures")) or "alt_solutions" in n for n in names)
    assert modes["run_autograder"] & 0o111 and modes["setup.sh"] & 0o111
    assert "download.pytorch.org/whl/cpu" in setup and "pytest-timeout" in setup
    assert abs(sum(t["max_score"] for t in manifest["tests"]) - 100) < 1e-9
    assert len(manifest["tests"]) == 41


def test_reference_and_alternative_solutions_get_full_score(graded):
    manifest, results = graded
    names = ["reference_in_subfolder"] + [n for n in CASES if n.startswith("alt_")]
    assert len(names) == 1 + len(FAIRNESS_ALTERNATIVES)
    for name in names:
        proc, result = results[name]
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert abs(result["score"] - 100) < 1e-3, (name, result["output"], [t["output"][:400] for t in visible(result)
                                                                           if t["score"] < t["max_score"]])
        tests = visible(result)
        assert len(tests) == len(manifest["tests"])
        assert all({"name", "score", "max_score", "output", "visibility"} <= set(t) for t in result["tests"])
    if environment()[1] == "isolated":
        assert "throwaway, unprivileged" in hidden(results["reference_in_subfolder"][1])


@pytest.mark.parametrize("function", list(SINGLE_FUNCTION_BUGS) + ["schedule_storage"])
def test_a_single_function_bug_costs_only_that_function(graded, function):
    _, results = graded
    _, result = results[f"bug_in_{function}"]
    if function == "schedule_storage":
        scores = by_function(result)
        assert scores["schedule"][0] < scores["schedule"][1] and all(
            abs(got - most) < 1e-6 for f, (got, most) in scores.items() if f != "schedule"), scores
        assert any("register_buffer" in t["output"] for t in visible(result) if t["score"] < t["max_score"])
        return
    scores = by_function(result)
    for f, (got, most) in scores.items():
        if f == function:
            assert got < most - 1e-6, (function, scores)
        else:
            assert abs(got - most) < 1e-6, (function, f, scores, [t["output"][:500] for t in visible(result)
                                                                   if t["score"] < t["max_score"]])
    hint = next(m.hint for m in __import__("mutation_test").MUTANTS if m.name == SINGLE_FUNCTION_BUGS[function])
    failed = [t for t in visible(result) if t["score"] < t["max_score"]]
    if function not in ("forward", "p_sample_loop"):  # those explain the mistake in their own words
        assert any(hint in t["output"] for t in failed), [t["output"][:400] for t in failed]


@pytest.mark.parametrize("name,message", [
    ("bare_handout", "not implemented yet"),
    ("missing_file", "No diffusion.py found in your submission (found: diffusion_v2.py)"),
    ("syntax_error", "syntax error at line"),
    ("crash_at_import", "exit code 3"),
    ("error_at_import", "boom at import"),
])
def test_broken_submissions_get_zero_with_a_clear_message(graded, name, message):
    _, results = graded
    proc, result = results[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["score"] == 0, result["output"]
    assert all(t["score"] == 0 for t in result["tests"])
    assert all(message in t["output"] for t in visible(result)), [t["output"][:300] for t in visible(result)][:3]


def test_infinite_loop_costs_only_the_checks_it_hangs(graded):
    _, results = graded
    _, result = results["hangs_in_sample"]
    scores = by_function(result)
    assert scores["sample"][0] == 0
    assert all("longer than 10 s" in t["output"] for t in visible(result) if t["name"].startswith("sample:"))
    assert abs(result["score"] - 90) < 1e-3, result["output"]
