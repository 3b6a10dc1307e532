"""The autograder's trusted side (shipped in autograder.zip as trusted_judge.py; run by grader.py as root).

Never runs student code. Two commands, JSON in on stdin, JSON out on stdout:

  plan    draws this run's inputs from a secret seed (secrets module), lists the probe requests of every
          check, and runs them on the reference solution (reference/diffusion.py next to this file, in a folder
          only root can read): {"params", "per_check", "requests", "reference"}.
  judge   given the plan and the student's outputs (plain numbers), judges every check with the judges of
          test_diffusion.py and, for failing checks, looks for the known mistake (the mutant catalogue run on
          the same inputs, within a time budget): {"results": {check: [passed, message]}, "notes": [...]}.
          The student's outputs are first cut to the shape the probes give them (admitted), so the judge's time
          and memory do not grow with what the student's process sends. A failing q_sample or p_sample check is
          re-judged against the reference run with the schedule the student's __init__ stored, if that is a
          schedule (own_schedule), so an alpha_bar bug costs only the schedule.
"""
import itertools
import json
import os
import random
import secrets
import sys
import time

import torch

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


# What the judge accepts of the student's outputs (admitted): the probes never send more, so anything beyond is cut
# before judging, and the judge's time and memory do not grow with what the student's process sends.
MAX_TEXT = 3000  # characters of a string (an error message)
MAX_DEPTH = 8  # levels of nesting
MAX_KEYS = 32  # entries of a dict
MAX_STORED = 64  # tensors of a "stored" list (stored_vectors sends at most 64)


class TooLarge(Exception):
    pass


def size_of(data):
    """Items (dict entries, list items, scalars) in a probe output."""
    if isinstance(data, dict):
        return 1 + sum(size_of(v) for v in data.values())
    if isinstance(data, list):
        return 1 + sum(size_of(v) for v in data)
    return 1


def largest_tensor(data):
    if isinstance(data, dict):
        own = len(data["values"]) if "shape" in data and isinstance(data.get("values"), list) else 0
        return max([own] + [largest_tensor(v) for v in data.values()])
    return max([largest_tensor(v) for v in data] or [0]) if isinstance(data, list) else 0


def admitted(output, reference, T):
    """The student's output for one probe request, cut to the shape the probes give it: strings of at most
    MAX_TEXT characters, MAX_DEPTH levels, MAX_KEYS entries per dict, 3 T + 3 items per list (p_sample_loop's calls
    are the longest), a "stored" list of at most MAX_STORED tensors of T or T + 1 values, the values of a tensor
    only if it has at most 4 times as many as the reference's largest tensor for this request (at least 4096: a
    larger one has the wrong shape, which is judged without its values). In all at most 4 times the reference's
    output plus 64 (T + 2) + 20000 items (stored tensors, error records), else an error record."""
    budget = [4 * size_of(reference) + 64 * (T + 2) + 20_000]
    value_cap = max(4096, 4 * largest_tensor(reference))

    def spend(n):
        budget[0] -= n
        if budget[0] < 0:
            raise TooLarge

    def walk(data, depth, key=None):
        spend(1)
        if isinstance(data, str):
            return data[:MAX_TEXT]
        if data is None or isinstance(data, (bool, int, float)):
            return data
        if depth >= MAX_DEPTH:
            return None
        if isinstance(data, list):
            if key == "values":  # numbers only (tensor_of reads anything else as nan)
                spend(len(data))
                return [v if type(v) in (int, float) else None for v in data]
            if key == "stored":
                tensors = (s for s in data if isinstance(s, dict) and isinstance(s.get("values"), list)
                           and len(s["values"]) in (T, T + 1))
                data = list(itertools.islice(tensors, MAX_STORED))
            return [walk(v, depth + 1) for v in data[:3 * T + 3]]
        out = {}
        for k, v in list(data.items())[:MAX_KEYS]:
            if k == "values" and "shape" in data and isinstance(v, list) and len(v) > value_cap:
                continue
            out[str(k)[:64]] = walk(v, depth + 1, k)
        return out

    try:
        return walk(output, 0)
    except TooLarge:
        return {"error": f"This output could not be judged: your code sent more for this probe than the probes "
                         f"ever send (about {size_of(reference)} items are expected here)."}


def judge(data):
    params, per_check, reference = data["params"], data["per_check"], data["reference"]
    requests = {grading.request_key(r): r for rs in per_check.values() for r in rs}
    student = {key: admitted(out, reference.get(key, {}), requests[key]["args"]["T"])
               for key, out in data["student"].items() if key in requests}
    missing = {key: str(why)[:MAX_TEXT] for key, why in data.get("missing", {}).items()}
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


# which schedule group a reference buffer belongs to (see SCHEDULE_GROUPS in test_diffusion.py); alpha_bar is the
# cumulative product of alphas
BUFFER_GROUPS = {"alphas": "alpha_bar", "alphas_cumprod": "alpha_bar", "sqrt_alphas_cumprod": "alpha_bar",
                 "sqrt_one_minus_alphas_cumprod": "alpha_bar", "posterior_variance": "posterior_variance",
                 "alphas_cumprod_prev": "posterior_mean", "posterior_mean_coef_x0": "posterior_mean",
                 "posterior_mean_coef_xt": "posterior_mean"}
# the leading entry of a table of T+1 values that starts at step 0 (alpha_bar_0 = 1); read at code index t, such a
# table is one step off, the "T+1 tables" bug
STEP_0 = {"alphas_cumprod": 1.0, "sqrt_alphas_cumprod": 1.0, "sqrt_one_minus_alphas_cumprod": 0.0}
ALPHA_CLIP = 0.001  # eq. 14 clips alpha_t to [0.001, 1]; a cumulative product taken before the clip is a real bug


def implied_buffers(alphas, alphas_cumprod):
    """Every schedule buffer the reference stores, as per-step alphas and alpha_bar (float64, length T) imply it
    (eq. 13 and 18; tests/test_autograder_attacks.py checks that this reproduces the reference's buffers)."""
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    one_minus = 1 - alphas_cumprod
    return {"alphas": alphas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": one_minus.sqrt(),
            "posterior_mean_coef_x0": prev.sqrt() * (1 - alphas) / one_minus,
            "posterior_mean_coef_xt": alphas.sqrt() * (1 - prev) / one_minus,
            "posterior_variance": (1 - prev) / one_minus * (1 - alphas)}


def float32_tolerance(alphas, alphas_cumprod):
    """Relative tolerance, per step, between a schedule buffer computed from float32 alphas / alpha_bar and the
    value implied by them: a few float32 roundings (2**-24), magnified where the formulas subtract numbers near 1
    (1 - alpha_bar_t, 1 - alpha_t, 1 - alpha_bar_{t-1}), and one per step of the cumulative product. Measured on
    real schedule bugs (no offset s at T = 1100: 7.4e-3 at t = 1, where 1 - alpha_bar_1 = 2e-6), this bound holds
    with a margin of 2 or more; capped at 2e-2, so no buffer is more than 2 % from what its alpha_bar implies."""
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    near_one = 1 / (1 - alphas_cumprod) + 1 / (1 - alphas).clamp(min=1e-300) + torch.where(
        prev < 1, 1 / (1 - prev).clamp(min=1e-300), torch.zeros_like(prev))
    steps = torch.arange(1, len(alphas) + 1, dtype=torch.float64)
    return (4 * 2.0 ** -24 * (near_one + steps)).clamp(max=2e-2)


def own_schedule(stored, T):
    """What the student's __init__ stored under the reference's buffer names, if it is a schedule:
    ({name: float32 table to run the reference with}, [names that differ from the reference's]), else None.

    A schedule is ONE alpha_bar (the first stored of alphas_cumprod, sqrt_alphas_cumprod^2, the cumulative product
    of alphas, 1 - sqrt_one_minus_alphas_cumprod^2) that passes grading.alpha_bar_problem, alphas equal to
    alpha_bar_t / alpha_bar_{t-1} (or the clip's 0.001 where that ratio is below it), and every stored buffer equal
    to what these imply (implied_buffers, within float32_tolerance); values are cast to float32 first, as the
    reference runs on them. Buffers not stored are filled in from the same alpha_bar. Refused (None): anything
    else, and the reference's own values kept under another name while the reference's name holds something else
    (a decoy: the functions need not read the buffer under the reference's name)."""
    model = grading.TinyEps(1)
    reference = {n: b.double() for n, b in td.diffusion.Diffusion(model, image_size=1, channels=1,
                                                                    timesteps=T).named_buffers()
                 if not n.startswith("model.")}
    kept, tables = [], {}
    for s in stored if isinstance(stored, list) else []:
        v = grading.tensor_of({"shape": [len(s["values"])], "values": s["values"]}) if isinstance(s, dict) and isinstance(
            s.get("values"), list) and len(s["values"]) in (T, T + 1) else None
        if v is None:
            continue
        v = v.float()  # what the reference runs on: a 1e39 becomes inf here, and is refused below
        kept.append((s.get("name"), v.double()))
        if s.get("name") in reference:
            tables[s["name"]] = v
    if any(not torch.isfinite(v).all() for v in tables.values()):
        return None

    def read(name):  # the values extract(table, t) reads for t = 0..T-1
        return tables[name][:T].double()

    def steps(name):  # the values for steps 1..T: a T+1 table that starts at step 0 holds them from index 1
        v = tables[name].double()
        return v[1:] if len(v) == T + 1 and name in STEP_0 and abs(float(v[0]) - STEP_0[name]) <= 1e-6 else v[:T]

    differing = [n for n in tables if not grading.close_relative(read(n), reference[n])]
    if not differing:
        return None
    if any(grading.close_relative(w, reference[name]) for name in differing for other, v in kept if other != name
           for w in (v[:T], v[-T:])):
        return None  # a decoy
    sources = [("alphas_cumprod", lambda: steps("alphas_cumprod")),
               ("sqrt_alphas_cumprod", lambda: steps("sqrt_alphas_cumprod") ** 2),
               ("alphas", lambda: torch.cumprod(steps("alphas"), 0)),
               ("sqrt_one_minus_alphas_cumprod", lambda: 1 - steps("sqrt_one_minus_alphas_cumprod") ** 2)]
    alpha_bar = next((f() for name, f in sources if name in tables), reference["alphas_cumprod"])
    if grading.alpha_bar_problem(alpha_bar):
        return None
    ratio = alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    clipped = ratio.clamp(min=ALPHA_CLIP)
    options = [ratio, clipped]  # alphas not stored: unclipped or clipped, whichever the stored buffers imply
    if "alphas" in tables:
        alphas = steps("alphas")

        def near(target):
            return (alphas - target).abs() <= 1e-6 * target + 1e-12

        if not bool((near(ratio) | (ratio < ALPHA_CLIP) & near(clipped)).all()):
            return None
        options = [alphas]
    for alphas in options:
        implied = implied_buffers(alphas, alpha_bar)
        rtol = float32_tolerance(alphas, alpha_bar)
        if all(bool(((steps(n) - implied[n]).abs() <= rtol * implied[n].abs() + 1e-9).all()) for n in tables):
            fill = {n: v.float() for n, v in implied.items() if n not in tables}
            return {**fill, **tables}, differing
    return None


def own_schedule_module(tables):
    """The reference solution with the student's schedule (own_schedule's tables) in place of its own."""
    import types

    class OwnSchedule(td.diffusion.Diffusion):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for name, table in tables.items():
                setattr(self, name, table.clone())

    return types.SimpleNamespace(Diffusion=OwnSchedule)


def on_own_schedule(results, failing_all, params, per_check, student):
    """Re-judge failing q_sample and p_sample checks against the reference run with the student's schedule
    (own_schedule: only what is a schedule). Where that makes them pass, the schedule groups of the differing
    buffers fail instead (the bug is in __init__), so the bug costs the schedule's points, not q_sample's or
    p_sample's. Every table the reference then reads holds values in [0, 1.02] (what one alpha_bar implies, within
    float32_tolerance), so its outputs, and the tolerances scaled by them, are as large as the reference's own."""
    notes, schedules, blamed = [], {}, {}
    size_at = {T: size for size, T in params["T"].items()}
    for chk, got, ref in failing_all:
        if chk.function not in ("q_sample", "p_sample") or results[chk.name][0]:
            continue
        requests = per_check[chk.name]
        T = requests[0]["args"]["T"]
        if T not in schedules:
            record = student.get(grading.request_key(td.schedule_req(params, size_at[T])))
            schedules[T] = own_schedule(record.get("stored"), T) if isinstance(record, dict) else None
        if schedules[T] is None:
            continue
        tables, differing = schedules[T]
        own_ref = [plain(grading.run_request(own_schedule_module(tables), r)) for r in requests]
        passed, _ = grading.judge_check(chk, got, own_ref, params)
        if passed:
            results[chk.name] = [True, f"{chk.function} is right for the schedule your __init__ computes "
                                       f"({', '.join('self.' + n for n in differing)} differ from the reference's); "
                                       "the schedule checks count that."]
            notes.append(f"{chk.name}: passed on the student's own schedule ({', '.join(differing)} differ)")
            blamed.setdefault(T, set()).update(differing)
    for T, names in blamed.items():
        for name in sorted(names):
            group = BUFFER_GROUPS[name]
            check = f"schedule_{group}-{size_at[T]}_T"
            if results[check][0]:
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
            results[chk.name][1] = grading.with_known_mistakes(results[chk.name][1], chk, got, ref, rows[chk.name],
                                                               hint_texts)
    return [] if time.time() < deadline else ["known-mistake hints stopped at their time budget"]


def main():
    command = sys.argv[1]
    data = json.loads(sys.stdin.read()) if command == "judge" else None
    out = plan() if command == "plan" else judge(data)
    sys.stdout.write(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
