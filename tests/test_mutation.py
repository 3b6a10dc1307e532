"""The graded tests catch every mutant in the catalogue, and every correct implementation passes them.

Runs tools/mutation_test.py (about a minute on two cores). Also checks the catalogue itself: at least 30
mutants, unique names, each applies to the reference diffusion.py exactly once and still compiles.
"""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import mutation_test  # noqa: E402


def test_catalogue_is_well_formed():
    names = [m.name for m in mutation_test.MUTANTS]
    assert len(names) >= 30
    assert len(set(names)) == len(names)
    source = mutation_test.reference_source()
    functions = set()
    for m in mutation_test.MUTANTS:
        mutated = mutation_test.apply(source, m)  # raises unless each `old` occurs exactly once
        assert mutated != source, m.name
        compile(mutated, f"{m.name}.py", "exec")
        assert m.hint, m.name
        functions.add(m.function)
    assert functions == {"schedule", "q_sample", "p_losses", "forward", "p_sample", "p_sample_loop", "sample"}


def test_alternative_solutions_exist():
    names = [name for name, _ in mutation_test.correct_implementations()]
    assert len(names) >= 8  # the reference + 7 rewrites
    for fairness in ("model_parameters_device", "plain_attributes_apply", "plain_attributes_moved_in_methods",
                     "noise_at_every_step"):
        assert any(fairness in n for n in names), fairness


@pytest.mark.timeout(400)
def test_every_mutant_is_killed_and_correct_implementations_pass():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "mutation_test.py"), "--jobs", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=390)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    n = len(mutation_test.MUTANTS)
    assert f"mutation score: {n}/{n} mutants killed" in proc.stdout


def _module(name, source):
    import types

    module = types.ModuleType(name)
    exec(compile(source, f"{name}.py", "exec"), module.__dict__)
    return module


def _alternative_source(name):
    with open(os.path.join(REPO, "tools", "alt_solutions", name + ".py")) as f:
        return f.read()


_REFERENCE_OUTPUTS = {}  # request key -> the reference's probe output, shared by the tests below


def _failing_checks(module, params, keep):
    """{check name: message} of the graded checks `keep(check)` selects that `module` fails at `params`, judged
    in-process against the reference (tests/conftest.py puts the repository on sys.path)."""
    import diffusion as reference
    import grading
    import test_diffusion as td

    failing = {}
    for chk in td.CHECKS:
        if keep(chk):
            requests = chk.requests(params)
            expected = [_REFERENCE_OUTPUTS.setdefault(grading.request_key(r), grading.run_request(reference, r))
                        for r in requests]
            passed, message = chk.judge([grading.run_request(module, r) for r in requests], expected, params)
            if not passed:
                failing[chk.name] = message
    return failing


# Secret draws (T large, seed) at which a float32 schedule, as correct as a float64 one, came out more than 1e-3
# from the reference at t_index 1 (4 of 150 random draws): the p_sample checks must pass there, as at any draw.
FLOAT32_HARD_DRAWS = [(1082, 208262283477808), (1088, 33501588962945), (1069, 9211151464943), (988, 50816704242858)]


def test_a_float32_schedule_passes_the_p_sample_checks_at_secret_draws():
    import random

    import grading
    import test_diffusion as td

    float32 = _module("float32_algorithm2", _alternative_source("float32_algorithm2"))
    draws = [{"T": {"small": 50, "large": T}, "mid": {"small": 25, "large": 2}, "seed": seed}
             for T, seed in FLOAT32_HARD_DRAWS] + [grading.draw_params(random.Random(k)) for k in range(6)]
    names = ("p_sample_matches_reference-large_T", "p_sample_mean_at_every_step-large_T")
    assert sum(c.name.startswith(names) for c in td.CHECKS) == 5
    failed = []
    for params in draws:
        failing = _failing_checks(float32, params, lambda c: c.name.startswith(names))
        failed += [(params["T"]["large"], params["seed"], name, message[:300]) for name, message in failing.items()]
    assert not failed, failed


# Noise from torch's generator instead of self.noise_like, written the ways real submissions write it.
RANDN_VARIANTS = {
    "p_sample": [
        [("return mean + sigma * self.noise_like(x.shape, x.device)", "return mean + sigma * torch.randn(x.shape, device=x.device)")],
        [("return mean + sigma * self.noise_like(x.shape, x.device)", "return mean + sigma * torch.randn_like(x)")],
        [("        if t_index == 0:\n            return mean  #",
          "        z = torch.randn_like(x)  # drawn at every step, also the last\n"
          "        if t_index == 0:\n            return mean + 0 * z  #"),
         ("return mean + sigma * self.noise_like(x.shape, x.device)", "return mean + sigma * z")],
    ],
    "p_sample_float32_schedule": [  # the noise term then carries the float32 rounding of sigma_t
        [("* self.noise_like(x.shape, device=x.device)", "* torch.randn_like(x)")],
    ],
    "sample": [
        [("img = self.noise_like(shape, device)", "img = torch.randn(shape, device=device)")],
        [("img = self.noise_like(shape, device)", "img = torch.randn(*shape).to(device)")],
    ],
}


@pytest.mark.parametrize("function,k", [(f, k) for f, edits in RANDN_VARIANTS.items() for k in range(len(edits))])
def test_noise_from_torch_randn_costs_only_the_noise_like_check(function, k):
    """Right math with the noise from torch.randn loses the one check that says where the noise must come from,
    not the value checks (they are judged on what torch.randn gives after the grader's seed)."""
    import grading

    source = (_alternative_source("float32_algorithm2") if function == "p_sample_float32_schedule"
              else mutation_test.reference_source())
    for old, new in RANDN_VARIANTS[function][k]:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    variant = _module(f"randn_{function}_{k}", source)
    function = function.replace("_float32_schedule", "")
    expected_failure = {"p_sample": "p_sample_noise_comes_from_noise_like",
                        "sample": "sample_draws_start_with_noise_like"}[function]
    for params in (grading.LOCAL_PARAMS, {"T": {"small": 70, "large": 800}, "mid": {"small": 3, "large": 2}, "seed": 5}):
        # p_sample_loop's checks run p_sample as a stand-in or its own chain: only the function's own checks
        failed = list(_failing_checks(variant, params, lambda c: c.function == function))
        assert failed == [expected_failure], (params["T"], failed)


@pytest.mark.parametrize("error", ["mean = mean + 3e-4", "mean = mean * (1 + 8e-4)"])
def test_noise_from_torch_randn_excuses_no_math_error(error):
    """A small error of the posterior mean scores no more with its noise from torch.randn than with noise_like:
    the torch.randn route allows what the noise_like route allows (a red team's mean 8e-4 off once scored 98.5
    with torch.randn against 93.8)."""
    import random

    import grading

    source = mutation_test.reference_source()
    last_step = "        if t_index == 0:\n            return mean  #"
    assert source.count(last_step) == 1
    source = source.replace(last_step, f"        {error}\n{last_step}")
    for params in (grading.LOCAL_PARAMS, grading.draw_params(random.Random(1))):
        failing = {}
        for label, edit in (("noise_like", None), ("randn", ("self.noise_like(x.shape, x.device)", "torch.randn_like(x)"))):
            variant = _module(f"off_{label}", source.replace(*edit) if edit else source)
            failing[label] = set(_failing_checks(variant, params, lambda c: c.function == "p_sample"))
        assert len(failing["noise_like"]) >= 3 and len(failing["randn"]) >= len(failing["noise_like"]), failing


def test_the_float32_allowance_is_finite_and_small_at_every_step():
    """schedule_rtol widens the p_sample checks only where float32 rounding is magnified; everywhere else it
    stays the plain 1e-3 (a hole there would pass wrong math)."""
    import torch

    import grading

    for T in (20, 120, 600, 1100):
        rtol = grading.schedule_rtol(T)
        assert bool(torch.isfinite(rtol).all()) and float(rtol.max()) < 6e-3 and float(rtol.median()) < 1.2e-3, T
