"""The autograder's trusted side (shipped in autograder.zip as trusted_judge.py; run by grader.py as root).

Never runs student code. Two commands, JSON in on stdin, JSON out on stdout:

  plan    draws this run's inputs from a secret seed (secrets module), lists the probe requests of every
          check, and runs them on the reference solution (reference/diffusion.py next to this file, in a folder
          only root can read): {"params", "per_check", "requests", "reference"}.
  judge   given the plan and the student's outputs (plain numbers), judges every check with the judges of
          test_diffusion.py and, for failing checks, looks for the known mistake (the mutant catalogue run on
          the same inputs, within a time budget): {"results": {check: [passed, message]}, "notes": [...]}.
          A failing q_sample or p_sample check is re-judged against the reference run with the schedule buffers the
          student's __init__ stored (same names as the reference's), so a schedule bug costs only the schedule.
"""
import json
import os
import random
import secrets
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "reference"), HERE]

import grading  # noqa: E402 - the checks' machinery (probes, comparison, runner)
import test_diffusion as td  # noqa: E402 - the graded checks; imports reference/diffusion.py as `diffusion`

HINT_BUDGET_S = float(os.environ.get("GRADER_HINT_BUDGET", "30"))


def plain(data):
    return json.loads(json.dumps(data))


def plan():
    fixed = os.environ.get("GRADER_FIXED_SEED")  # tests only (the grader notes say so); never set on Gradescope
    params = grading.draw_params(random.Random(int(fixed) if fixed else secrets.randbits(128)))
    per_check, distinct = grading.requests_of(td.CHECKS, params)
    reference = {key: plain(grading.run_request(td.diffusion, r)) for key, r in distinct.items()
                 if r["probe"] not in grading.NO_REFERENCE}
    return {"params": params, "per_check": per_check, "requests": distinct, "reference": reference}


def judge(data):
    params, per_check, reference = data["params"], data["per_check"], data["reference"]
    student, missing = data["student"], data.get("missing", {})
    results, failing, failing_all = {}, [], []
    for chk in td.CHECKS:
        keys = [grading.request_key(r) for r in per_check[chk.name]]
        lost = [missing[k] for k in keys if k in missing]
        if lost:
            results[chk.name] = [False, lost[0]]
            continue
        got = [student.get(k, {"error": "no output"}) for k in keys]
        ref = [reference.get(k, {}) for k in keys]
        results[chk.name] = list(grading.judge_check(chk, got, ref, params))
        if not results[chk.name][0]:
            failing_all.append((chk, got, ref))
        # known-mistake hints where the student produced numbers; the small-T checks suffice (a mistake shows there too)
        if not results[chk.name][0] and "large_T" not in chk.name and grading.primary_values(chk, got) is not None:
            failing.append((chk, got, ref))
    notes = []
    try:  # isolation of q_sample and p_sample from the schedule: autograder only (locally there is no reference to re-run)
        notes += on_own_schedule(results, failing_all, params, per_check, student)
    except Exception as exc:  # noqa: BLE001 - a courtesy; never lowers a score
        notes.append(f"own-schedule check of p_sample skipped: {type(exc).__name__}: {exc}")
    failing = [f for f in failing if not results[f[0].name][0]]
    if failing and HINT_BUDGET_S > 0:
        started = time.time()
        try:
            notes += hints(failing, params, per_check, reference, results, started + HINT_BUDGET_S)
        except Exception as exc:  # noqa: BLE001 - hints are a courtesy; grades never depend on them
            notes.append(f"known-mistake hints skipped: {type(exc).__name__}: {exc}")
        notes.append(f"known-mistake hints took {time.time() - started:.1f} s")
    return {"results": results, "notes": notes}


# which schedule group a reference buffer belongs to (see SCHEDULE_GROUPS in test_diffusion.py)
BUFFER_GROUPS = {"alphas_cumprod": "alpha_bar", "sqrt_alphas_cumprod": "alpha_bar",
                 "sqrt_one_minus_alphas_cumprod": "alpha_bar", "posterior_variance": "posterior_variance",
                 "alphas_cumprod_prev": "posterior_mean", "posterior_mean_coef_x0": "posterior_mean",
                 "posterior_mean_coef_xt": "posterior_mean"}


def own_schedule_module(stored, T):
    """(module, differing buffer names): the reference Diffusion with the schedule buffers the student's __init__
    stored under the reference's names, so that a q_sample / p_sample that is right for the student's own
    (wrong) schedule can be recognised. None if no stored buffer differs from the reference's, or if a differing
    one cannot be a schedule the functions run on (out of range, or a decoy beside the true values)."""
    import types

    import torch

    values = {}
    for s in stored if isinstance(stored, list) else []:
        if isinstance(s, dict) and isinstance(s.get("values"), list) and len(s["values"]) == T:
            v = grading.tensor_of({"shape": [T], "values": s["values"]})
            if v is not None and torch.isfinite(v).all():
                values[str(s.get("name"))] = v.float()
    reference = td.diffusion.Diffusion
    model = grading.TinyEps(1)
    buffers = {n: b.double() for n, b in reference(model, image_size=1, channels=1, timesteps=T).named_buffers()
               if not n.startswith("model.")}
    differing = [n for n in buffers if n in values and not grading.close_relative(values[n].double(), buffers[n])]
    if not differing:
        return None
    for name in differing:
        value = values[name].double()
        # every schedule quantity the reference stores is >= 0, and all but the posterior-mean coefficients are
        # <= 1: values outside are no schedule the functions could honestly run on (a decoy scaled or negated)
        if (value < 0).any() or (not name.startswith("posterior_mean_coef") and (value > 1).any()):
            return None
        # a decoy: the reference's values kept under another name while the reference's name holds something
        # else; the functions need not use the buffer under the reference's name, so no re-judging on it
        if any(other != name and grading.close_relative(values[other].double(), buffers[name]) for other in values):
            return None

    class OwnSchedule(reference):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for name in buffers:
                if name in values:
                    setattr(self, name, values[name].clone())

    return types.SimpleNamespace(Diffusion=OwnSchedule), differing


def on_own_schedule(results, failing_all, params, per_check, student):
    """Re-judge failing q_sample and p_sample checks against the reference run with the student's schedule
    buffers. Where that makes them pass, the schedule groups of the differing buffers fail instead (the bug is in
    __init__), so the bug costs the schedule's points, not q_sample's or p_sample's."""
    notes, modules, blamed = [], {}, {}
    size_of = {T: size for size, T in params["T"].items()}
    for chk, got, ref in failing_all:
        if chk.function not in ("q_sample", "p_sample") or results[chk.name][0]:
            continue
        requests = per_check[chk.name]
        T = requests[0]["args"]["T"]
        if T not in modules:
            stored = None
            for key, out in student.items():
                request = json.loads(key)
                if request.get("probe") == "schedule" and request["args"].get("T") == T and isinstance(out, dict):
                    stored = out.get("stored")
            modules[T] = own_schedule_module(stored, T) if stored else None
        if modules[T] is None:
            continue
        module, differing = modules[T]
        own_ref = [plain(grading.run_request(module, r)) for r in requests]
        passed, _ = grading.judge_check(chk, got, own_ref, params)
        if passed:
            results[chk.name] = [True, f"{chk.function} is right for the schedule your __init__ computes "
                                       f"({', '.join('self.' + n for n in differing)} differ from the reference's); "
                                       "the schedule checks count that."]
            notes.append(f"{chk.name}: passed on the student's own schedule ({', '.join(differing)} differ)")
            blamed.setdefault(T, set()).update(differing)
    for T, names in blamed.items():
        for name in sorted(names):
            group = BUFFER_GROUPS.get(name)
            check = f"schedule_{group}-{size_of.get(T)}_T"
            if group and check in results and results[check][0]:
                results[check] = [False, f"self.{name} differs from the reference's {name} (T={T}); your q_sample / "
                                         "p_sample use it as it is, so the mistake is counted here, in the schedule."]
                notes.append(f"{check}: failed, self.{name} differs")
    return notes


def hints(failing, params, per_check, reference, results, deadline):
    import importlib.util
    import tempfile

    import mutation_test as mutation_catalogue

    with open(os.path.join(HERE, "reference", "diffusion.py")) as f:
        source = f.read()
    functions = {chk.function for chk, _, _ in failing} | ({"schedule"} if any(c.function == "p_sample" for c, _, _ in failing) else set())
    mutants = []
    with tempfile.TemporaryDirectory() as folder:
        for i, m in enumerate(mutation_catalogue.MUTANTS):
            if m.function not in functions:
                continue
            path = os.path.join(folder, f"mutant_{i}.py")
            with open(path, "w") as f:
                f.write(mutation_catalogue.apply(source, m))
            spec = importlib.util.spec_from_file_location(f"mutant_{i}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            mutants.append((i, m.function, module))
        rows = grading.mistake_rows([c for c, _, _ in failing], params, reference, mutants, per_check, deadline)
    hint_texts = [m.hint for m in mutation_catalogue.MUTANTS]
    for chk, got, ref in failing:
        if chk.name in rows:
            results[chk.name] = list(grading.judge_check(chk, got, ref, params, rows[chk.name], hint_texts))
    return [] if time.time() < deadline else ["known-mistake hints stopped at their time budget"]


def main():
    command = sys.argv[1]
    data = json.loads(sys.stdin.read()) if command == "judge" else None
    out = plan() if command == "plan" else judge(data)
    sys.stdout.write(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
