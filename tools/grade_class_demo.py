"""End-to-end check and measurement of tools/grade_class.py on a generated class (instructors; not run by CI).

    python tools/grade_class_demo.py [--out /tmp/demo_class_graded] [--jobs 2] [--memory-mb 400]

Builds a class in OUT/class, one folder per "student": the reference, every tools/alt_solutions/*.py, every
mutant of tools/mutation_test.py, a renamed copy of an independently written alternative solution (identifiers,
buffer names, comments and docstrings changed), the red team's dishonest submissions
(tests/test_autograder_attacks.py) and broken ones (syntax error, import error, the bare handout, a binary file,
two files for one student). Grades it with grade_class.py (the autograder zip's code path) into OUT, then
checks the report against what went in:
  * known mistakes: each hint's count in the report equals the number of students built with that mistake
    (a mutant student carries its mutant, a dishonest one the three mutants of its wrong math), up to the
    cases printed with their reason;
  * copies: the renamed copy is paired with its original and with nothing else, and no two of the independently
    written correct solutions (the reference, float32_algorithm2, float64_plain_indexing, lucidrains_style) are.
Prints seconds per student and peak memory (grades.csv has them per student). Exit 1 if a check fails.
As root it needs an interpreter an unprivileged uid can run (--python; see tools/GRADING.md).
"""
import argparse
import csv
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tokenize

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import grade_class  # noqa: E402
import make_handout  # noqa: E402
import mutation_test  # noqa: E402

REFERENCE = open(os.path.join(REPO, "diffusion.py")).read()
INDEPENDENT = ["reference", "alt_float32_algorithm2", "alt_float64_plain_indexing", "alt_lucidrains_style"]
COPIED = "alt_lucidrains_style"
# a student's renaming of lucidrains_style: locals, buffer names (also as register_buffer strings), helper methods
RENAMES = {"betas": "beta_t", "alphas": "alpha_t", "ac": "abar", "ac_prev": "abar_prev", "buf": "keep", "var": "v",
           "sqrt_ac": "root_abar", "sqrt_1m_ac": "root_one_minus_abar", "sqrt_recip_ac": "inv_root_abar",
           "sqrt_recipm1_ac": "inv_root_abar_m1", "post_logvar_clipped": "log_sigma2", "post_c1": "coef_x0",
           "post_c2": "coef_xt", "predict_start_from_noise": "x0_from_eps", "q_posterior": "posterior",
           "x_start": "x0_hat", "logvar": "log_var", "nonzero_mask": "keep_noise", "model_out": "predicted", "b": "n"}
WRONG_MATH = ["q_sample_minus_noise", "p_losses_mse", "p_sample_x0_divides_by_alpha"]  # the red team's base


def renamed_copy(source, renames):
    """`source` with identifiers (and strings equal to one, e.g. buffer names) renamed, every comment reworded and
    every docstring replaced: what a student who copies and disguises a file does."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        text = tok.string
        if tok.type == tokenize.NAME:
            text = renames.get(text, text)
        elif tok.type == tokenize.COMMENT:
            text = "# my own note: " + text.lstrip("# ")[::-1]
        elif tok.type == tokenize.STRING and text[1:-1] in renames:
            text = text[0] + renames[text[1:-1]] + text[-1]
        elif tok.type == tokenize.STRING and text.startswith('"""'):
            text = '"""Written by me."""'
        out.append((tok.type, text))  # positions dropped: the names' lengths changed
    return tokenize.untokenize(out)


def attacks():
    """{name: source} of the red team's dishonest submissions (their placeholders filled as a class would see)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import test_autograder_attacks as red

    fill = {"{root}": "/autograder", "{tag}": "demo", "{fixture}": "{}"}
    names = ["VISIBLE_EXPECTED", "PATCH_THE_JUDGE", "FORGE_REPORTS", "OUTLIVE", "RESOURCE_ATTACKS", "FLOOD",
             "DECOY_SCHEDULE"]
    sources = {"red_honest_wrong_math": red.WRONG_MATH}
    for name in names:
        text = getattr(red, name)
        for key, value in fill.items():
            text = text.replace(key, value)
        sources["red_" + name.lower()] = text
    return sources


def mutant_source(*names):
    source = REFERENCE
    for name in names:
        source = mutation_test.apply(source, next(m for m in mutation_test.MUTANTS if m.name == name))
    return source


def make_class(folder, mutants=None, alternatives=True, red_team=True, broken=True):
    """Writes the class into `folder`; returns {student: [mutant names it carries]}."""
    files, carries = {"reference/diffusion.py": REFERENCE}, {"reference": []}
    if alternatives:
        for path in sorted(glob.glob(os.path.join(HERE, "alt_solutions", "*.py"))):
            student = "alt_" + os.path.basename(path)[:-3]
            files[f"{student}/diffusion.py"], carries[student] = open(path).read(), []
        files["copy_of_lucidrains/hw3/diffusion.py"] = renamed_copy(files[f"{COPIED}/diffusion.py"], RENAMES)
        carries["copy_of_lucidrains"] = []
    for m in mutation_test.MUTANTS if mutants is None else [m for m in mutation_test.MUTANTS if m.name in mutants]:
        files[f"mutant_{m.name}/diffusion.py"], carries[f"mutant_{m.name}"] = mutant_source(m.name), [m.name]
    if red_team:
        for student, source in attacks().items():
            files[f"{student}/diffusion.py"], carries[student] = source, list(WRONG_MATH)
    if broken:
        files["broken_syntax/diffusion.py"] = REFERENCE.replace("def q_sample(self, x_0, t, noise):", "def q_sample()")
        files["broken_import/diffusion.py"] = "import einops_of_my_own\n" + REFERENCE
        files["broken_bare_handout/diffusion.py"] = make_handout.strip_solutions(REFERENCE)[0]
        files["broken_binary/diffusion.py"] = b"PK\x03\x04" + os.urandom(64)
        files["broken_two_files/diffusion.py"] = REFERENCE
        files["broken_two_files/old/diffusion.py"] = REFERENCE
        carries.update({s: [] for s in ("broken_syntax", "broken_import", "broken_bare_handout", "broken_binary",
                                        "broken_two_files")})
    for rel, content in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode())
    return carries


def mistake_counts(report_text):
    """{hint: students} from report.md's known-mistakes table."""
    section = report_text.split("## Known mistakes", 1)[1].split("\n## ", 1)[0]
    return {m.group(2).replace("\\|", "|"): int(m.group(1))
            for m in re.finditer(r"^\| (\d+) \| [^|]* \| [^|]* \| (.*?) \| ", section, re.M)}


def check_mistakes(out, report_text, carries, rows):
    """(problems, notes): the report's known-mistake counts against the mutants put in, read from each student's
    results.json. A hint's count must be the students carrying that mutant who show it plus the look-alikes
    (other students whose output equals that mutant's on the graded inputs). A carrier not shown its hint must
    still lose points: some judges explain a mistake in their own words, and some attacks break the function."""
    outputs = {}
    for student, row in rows.items():
        if row["status"] == "graded":
            with open(os.path.join(out, "students", student, "results.json")) as f:
                outputs[student] = "\n".join(t["output"] for t in json.load(f)["tests"] if t["visibility"] == "visible")
    reported, problems, own_words, lookalikes, recognised = mistake_counts(report_text), [], [], [], 0
    for m in mutation_test.MUTANTS:
        carriers = {s for s, names in carries.items() if m.name in names and s in outputs}
        showing = {s for s in outputs if m.hint in outputs[s]}
        recognised += len(carriers & showing)
        lookalikes += [f"{m.name}: {', '.join(sorted(showing - carriers))}"] * bool(showing - carriers)
        for student in carriers - showing:
            own_words.append(f"{student} ({m.name})")
            if float(rows[student]["total"]) >= 100 - 1e-6:
                problems.append(f"{student} carries {m.name} but lost no points")
        if reported.get(m.hint, 0) != len(showing):
            problems.append(f"{m.name}: the report counts {reported.get(m.hint, 0)}, the results show {len(showing)}")
    carried = sum(len(names) for s, names in carries.items() if s in outputs)
    notes = [f"{recognised} of {carried} mistakes put in are recognised by their hint; explained by the judges in "
             f"their own words (no catalogue match): {', '.join(own_words) or 'none'}",
             f"look-alikes (a student's output equals another catalogue mistake's on the graded inputs): "
             f"{'; '.join(lookalikes) or 'none'}"]
    return problems, notes


def check_copies(pairs):
    flagged = {frozenset((a, b)) for a, b in pairs}
    problems = [f"renamed copy not paired with {COPIED}"] * (frozenset(("copy_of_lucidrains", COPIED)) not in flagged)
    problems += [f"renamed copy also paired with {other}" for pair in flagged if "copy_of_lucidrains" in pair
                 for other in pair - {"copy_of_lucidrains", COPIED}]
    problems += [f"independent correct solutions paired: {a}, {b}" for i, a in enumerate(INDEPENDENT)
                 for b in INDEPENDENT[i + 1:] if frozenset((a, b)) in flagged]
    return problems


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/demo_class_graded", help="(default: %(default)s; emptied first)")
    parser.add_argument("--resume", action="store_true", help="keep OUT and its cache: re-check a finished run")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="(default: %(default)s)")
    parser.add_argument("--python", default=sys.executable, help="(default: %(default)s)")
    parser.add_argument("--memory-mb", type=int, default=400,
                        help="above the interpreter's own memory, as the runner's (default: %(default)s)")
    parser.add_argument("--probe-timeout", type=float, default=20.0,
                        help="per probe; Gradescope's is 60 s, the red team's infinite loop waits it out "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.resume:
        shutil.rmtree(args.out, ignore_errors=True)
    folder = os.path.join(args.out, "class")
    carries = make_class(folder)
    print(f"{len(carries)} students in {folder}; uptime before: {uptime()}")
    started = time.time()
    grade_class.main([folder, "--out", args.out, "--jobs", str(args.jobs), "--python", args.python,
                      "--memory-mb", str(args.memory_mb), "--probe-timeout", str(args.probe_timeout)])
    print(f"uptime after: {uptime()}")
    with open(os.path.join(args.out, "grades.csv")) as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    with open(os.path.join(args.out, "report.md")) as f:
        report_text = f.read()
    run = [r for r in rows.values() if r["seconds"] and r["status"] == "graded"]
    seconds, cpu, peaks = (sorted(float(r[column]) for r in run) for column in ("seconds", "cpu_seconds", "peak_mb"))
    print(f"graded through the runner: {len(run)} files, {args.jobs} at a time, in {time.time() - started:.0f} s; per "
          f"file: wall median {seconds[len(seconds) // 2]:.1f} s (mean {sum(seconds) / len(seconds):.1f}, max "
          f"{seconds[-1]:.1f}), CPU median {cpu[len(cpu) // 2]:.1f} s (mean {sum(cpu) / len(cpu):.1f}, max "
          f"{cpu[-1]:.1f}); peak memory of one grading's process tree: median {peaks[len(peaks) // 2]:.0f} MB, max "
          f"{peaks[-1]:.0f} MB")
    sources = {s: open(os.path.join(folder, r["file"]), "rb").read()
               for s, r in rows.items() if r["status"] != "bad input"}
    pairs = [(a, b) for _, _, a, b in grade_class.similar_pairs(sources, make_handout.strip_solutions(REFERENCE)[0])[0]]
    problems, notes = check_mistakes(args.out, report_text, carries, rows)
    problems += check_copies(pairs)
    print("\n".join(notes))
    if rows["copy_of_lucidrains"]["total"] != rows[COPIED]["total"]:
        problems.append(f"the renamed copy scores {rows['copy_of_lucidrains']['total']}, "
                        f"its original {rows[COPIED]['total']}")
    print("\n".join(["checks:"] + (problems or ["all passed"])))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
