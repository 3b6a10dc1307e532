"""tools/make_autograder.py: autograder.zip in Gradescope's layout, graded in a simulated /autograder folder.

Full score for the reference and for the alternative correct solutions, a single-function bug costs only that
function's points (one mutant per function), zero with a clear message for the bare handout and for broken
submissions (missing file, syntax error, crash at import), and an infinite loop only costs the checks it hangs.
Attacks on the grader: tests/test_autograder_attacks.py.
"""
import concurrent.futures
import os
import sys

import pytest

from autograder_sim import (BARE_HANDOUT, REFERENCE, REPO, build, by_function, environment, grade, hidden, mutant,
                            visible)

import make_autograder  # noqa: E402 - tools/ is on sys.path (autograder_sim)

# one mutant per function: its bug lives in that function only
SINGLE_FUNCTION_BUGS = {
    "schedule": "schedule_unclipped",  # an alpha_bar bug; a formula bug in a posterior buffer also costs p_sample (GRADING.md)
    "q_sample": "q_sample_swapped",
    "p_losses": "p_losses_mse",
    "forward": "forward_never_draws_last",
    "p_sample": "p_sample_no_clamp",
    "p_sample_loop": "loop_ascending",
    "sample": "sample_unnormalize_twice",
}
ALT_DIR = os.path.join(REPO, "tools", "alt_solutions")
CASES = {
    # graded with the interpreter running these tests (the kit's venv: the CUDA build of torch), where the other
    # cases may use a Gradescope-like one with the CPU wheel (.ci/run sets AUTOGRADER_TEST_PYTHON): 100 with both
    "reference_in_subfolder": ({"hw/diffusion.py": REFERENCE, "hw/notes.txt": "hi"},
                               {"AUTOGRADER_PYTHON": sys.executable}),
    "bare_handout": ({"diffusion.py": BARE_HANDOUT}, {}),
    "missing_file": ({"diffusion_v2.py": REFERENCE}, {}),
    "syntax_error": ({"diffusion.py": REFERENCE.replace("def q_sample(self, x_0, t, noise):", "def q_sample(self, x_0, t, noise)")}, {}),
    "crash_at_import": ({"diffusion.py": "import os\nos._exit(3)\n" + REFERENCE}, {}),
    "error_at_import": ({"diffusion.py": "raise RuntimeError('boom at import')\n" + REFERENCE}, {}),
    "hangs_in_sample": ({"diffusion.py": REFERENCE.replace(
        "        was_training = self.model.training\n", "        while True:\n            pass\n")},
        {"GRADER_PROBE_TIMEOUT": "10"}),
}
# imports of the course's packages and the handout's files, which the grader does not have: stand-ins, full score
COURSE_IMPORTS = ("import wandb\nfrom tqdm import tqdm\nimport matplotlib.pyplot as plt\nfrom PIL import Image\n"
                  "from torchvision.utils import save_image\nimport scipy.stats\nfrom unet import Unet\n"
                  "from utils import *\n")
CASES["course_imports"] = ({"diffusion.py": COURSE_IMPORTS + REFERENCE.replace(
    "for t_index in reversed(range(self.num_timesteps)):",
    "for t_index in tqdm(reversed(range(self.num_timesteps)), total=self.num_timesteps):\n"
    "            wandb.log({'t': t_index})").replace(
    "    @torch.no_grad()\n    def sample(", "    @torch.no_grad()\n    @wandb.watch_this\n    def sample(")}, {})
CASES["unknown_module"] = ({"diffusion.py": "import einops_of_my_own\n" + REFERENCE}, {})
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
            "test_diffusion.py", "grading.py", "reference/diffusion.py", "mutation_test.py"} <= names
    assert not any(n.startswith(("tools/", "tests/", "test_fixtures")) or "alt_solutions" in n for n in names)
    assert modes["run_autograder"] & 0o111 and modes["setup.sh"] & 0o111
    assert "download.pytorch.org/whl/cpu" in setup and "pytest-timeout" in setup
    assert abs(sum(t["max_score"] for t in manifest["tests"]) - 100) < 1e-9
    assert len(manifest["tests"]) == 43


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


def test_imports_of_the_course_packages_and_files_cost_nothing(graded):
    _, results = graded
    proc, result = results["course_imports"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert abs(result["score"] - 100) < 1e-3, [t["output"][:400] for t in visible(result) if t["score"] < t["max_score"]]
    assert ("imports PIL, matplotlib, scipy, torchvision, unet, utils, wandb, which the grader does not have"
            in result["output"]), result["output"]


def test_stand_ins_cover_the_course_packages_and_the_handout_files(tmp_path):
    """Every package requirements.txt installs is on the grader (setup.sh) or a stand-in, and so is every file of
    the handout a diffusion.py could import."""
    import importlib.metadata
    import re
    import zipfile

    import grading_worker

    with open(os.path.join(REPO, "requirements.txt")) as f:
        wanted = [m.group(1) for line in f if (m := re.match(r"\s*([A-Za-z0-9_.-]+)", line))]
    make_autograder.build(str(tmp_path / "ag.zip"))
    with zipfile.ZipFile(tmp_path / "ag.zip") as z:
        setup = z.read("setup.sh").decode()
    on_grader = {name for name in wanted if f'"{name}' in setup}
    assert {"torch", "numpy", "pytest", "tqdm"} <= on_grader
    modules = importlib.metadata.packages_distributions()
    for name in set(wanted) - on_grader:
        provides = {m for m, dists in modules.items() if any(d.lower() == name.lower() for d in dists)}
        assert provides & grading_worker.STAND_INS, (name, provides)
    # the grader's own files are in the student's folder (grading.py is imported before the submission)
    handout = {n[:-3] for n in os.listdir(REPO) if n.endswith(".py")} - {"diffusion", "test_diffusion", "grading",
                                                                         "conftest"}
    assert handout | {"kit"} <= grading_worker.STAND_INS


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
    ("unknown_module", "diffusion.py must not need any other module"),
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
