"""Each mistake is charged once, to the function whose own code is wrong (tools/GRADING.md, "Each mistake charged
once"), in both organisations of real submissions: everything stored in __init__ (the reference), and only alpha_t
and alpha-bar_t stored with the rest computed where it is used (tools/alt_solutions/posterior_in_p_sample.py).

Judged in-process against the reference at small T (the rule does not depend on T), like local pytest.
"""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import mutation_test  # noqa: E402
from test_mutation import _alternative_source, _failing_checks, _module  # noqa: E402

PARAMS = {"T": {"small": 12, "large": 30}, "mid": {"small": 5, "large": 17}, "seed": 11}
DEVICE = "schedule_follows_module_to_device"
SCHEDULE_GROUPS = ("schedule_alpha_bar", "schedule_posterior")
# the real submissions' bugs (issue 15), in both organisations (but sample's, which reads no schedule)
REAL_BUGS = ["p_sample_x0_hat_plus_noise", "p_sample_missing_multiplication", "p_sample_noise_like_one_argument",
             "p_sample_extract_four_arguments", "q_sample_first_t_for_batch", "q_sample_extract_four_arguments",
             "sample_reads_model_device"]
# those whose q_sample or p_sample raise on the meta device also fail the device check, which runs them there (not
# excused, on purpose: GRADING.md); indexing with t[0] raises there too (a 0-d index calls .item(), which meta
# tensors cannot do)
RAISE_ON_META = {name + suffix for name in ("p_sample_missing_multiplication", "p_sample_noise_like_one_argument",
                                            "p_sample_extract_four_arguments", "q_sample_extract_four_arguments")
                 for suffix in ("", "_on_the_fly")} | {"q_sample_first_t_for_batch_on_the_fly"}

def _mutant(name):
    return next(m for m in mutation_test.MUTANTS if m.name == name)


def _source(*edits, base=None):
    source = mutation_test.reference_source() if base is None else base
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    return source


def _lost(source, name):
    """{function: points lost} and the failing checks, at PARAMS."""
    import test_diffusion as td

    failing = _failing_checks(_module(name, source), PARAMS, lambda c: True)
    checks = {c.name: c.function for c in td.CHECKS}
    lost = {}
    for check in failing:
        function = checks[check]
        lost[function] = lost.get(function, 0) + td.POINTS[function] / sum(f == function for f in checks.values())
    return lost, set(failing)


def test_the_on_the_fly_alternative_is_the_catalogue_organisation():
    """The *_on_the_fly mutants are bugs of tools/alt_solutions/posterior_in_p_sample.py (which scores 100 in
    tests/test_mutation.py), not of some other code."""
    def code(text):
        return [line for line in text[text.index("import math"):].splitlines() if "SOLUTION" not in line]

    organisation = mutation_test.apply(mutation_test.reference_source(), mutation_test.Mutant("o", "p_sample",
                                                                                              mutation_test.ON_THE_FLY))
    assert code(organisation) == code(_alternative_source("posterior_in_p_sample"))


@pytest.mark.parametrize("name", [bug + suffix for bug in REAL_BUGS for suffix in ("", "_on_the_fly")
                                  if not (bug.startswith("sample") and suffix)])
def test_a_real_mistake_costs_only_its_own_function(name):
    mutant = _mutant(name)
    lost, failing = _lost(mutation_test.apply(mutation_test.reference_source(), mutant), name)
    assert lost.get(mutant.function, 0) > 0, failing
    assert not [c for c in failing if c.startswith(SCHEDULE_GROUPS)], failing  # never the schedule's groups
    others = {c for c in failing if not c.startswith(mutant.function)}
    assert others == ({DEVICE} if name in RAISE_ON_META else set()), failing


def test_raising_on_purpose_never_beats_the_honest_mistake():
    """On-the-fly p_sample with a wrong step (x_0 estimate + noise): raising where the schedule's readings call
    it (batch of 1 or 2, one pixel), or everywhere, scores no more than the honest wrong code."""
    honest = mutation_test.apply(mutation_test.reference_source(), _mutant("p_sample_x0_hat_plus_noise_on_the_fly"))
    start = "        alpha_t = extract(self.alphas, t, x.shape)\n"
    raise_in_schedule_probe = _source((start, "        if x.numel() <= 2:\n            raise ValueError('no')\n" + start),
                                      base=honest)
    raise_always = _source((start, "        raise ValueError('no')\n" + start), base=honest)
    honest_loss = sum(_lost(honest, "honest")[0].values())
    for name, source in (("raise_in_schedule_probe", raise_in_schedule_probe), ("raise_always", raise_always)):
        assert sum(_lost(source, name)[0].values()) >= honest_loss - 1e-9, name


def test_unimplemented_code_earns_no_schedule_points():
    """A correct alpha-bar earns its groups; the posterior groups need code that computes the posterior: a
    p_sample still raising NotImplementedError (the TODO) does not."""
    todo = "        raise NotImplementedError('TODO: implement Diffusion.p_sample')\n"
    organisation = _alternative_source("posterior_in_p_sample")
    start = "        alpha_t = extract(self.alphas, t, x.shape)\n"
    source = _source((start, todo + start), base=organisation)
    _, failing = _lost(source, "todo_p_sample")
    posterior_groups = {f"schedule_posterior_{g}-{s}_T" for g in ("variance", "mean") for s in ("small", "large")}
    assert {c for c in failing if c.startswith("schedule_")} == posterior_groups, failing
    # an __init__ that stores nothing, with functions that raise: no schedule point
    nothing = _source(('        self.register_buffer("alphas", alphas.to(torch.float32))\n'
                       '        self.register_buffer("alphas_cumprod", torch.cumprod(alphas, dim=0).to(torch.float32))\n',
                       ""), base=organisation)
    lost, _ = _lost(nothing, "stores_nothing")
    assert abs(lost.get("schedule", 0) - 15) < 1e-9, lost


def test_two_mistakes_are_charged_twice():
    """A wrong alpha-bar in __init__ and a wrong p_sample, in the on-the-fly organisation: both lose."""
    wrong_schedule = ("    return torch.clip(alphas, 0.001, 1.0)", "    return alphas")  # no clip (eq. 14)
    both = _source(wrong_schedule, base=mutation_test.apply(mutation_test.reference_source(),
                                                           _mutant("p_sample_x0_hat_plus_noise_on_the_fly")))
    lost, failing = _lost(both, "two_mistakes")
    assert lost.get("p_sample", 0) > 0 and [c for c in failing if c.startswith("schedule_alpha_bar")], failing


# schedule mutants no schedule group fails locally, before this rule as after it: the right values in the wrong place
# (not buffers) or dtype (float64), or a wrong mean coefficient beside stored values the group accepts (it matches
# by value under any name, and alpha_bar_{t-1} stands for the x_0 coefficient); on Gradescope the re-judging
# blames the last two by the reference's buffer names
VALUES_RIGHT_ELSEWHERE = ("schedule_not_buffers", "schedule_float64_buffers", "schedule_posterior_coefs_swapped",
                          "schedule_coef_x0_alpha_bar_t")


def test_every_schedule_mutant_still_costs_the_schedule():
    """The schedule bugs of the catalogue (no clip, off by one, linear betas, ...) still fail a schedule group."""
    for mutant in mutation_test.MUTANTS:
        if mutant.function != "schedule" or mutant.name in VALUES_RIGHT_ELSEWHERE:
            continue
        module = _module(mutant.name, mutation_test.apply(mutation_test.reference_source(), mutant))
        failing = _failing_checks(module, PARAMS, lambda c: c.name.startswith(SCHEDULE_GROUPS))
        assert failing, mutant.name
