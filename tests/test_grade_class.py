"""tools/grade_class.py: a whole class graded with the autograder zip, and the class report.

Fast tests run the tool with a fake grade function (input validation, zip-slip, bad input per student, resuming,
a crashing grading) and the copy detector on real solutions; one small class goes through the real runner.
The full check on a class of 81 (every mutant, the alternative solutions, the red team): tools/grade_class_demo.py.
"""
import csv
import json
import os
import re
import time
import zipfile

import pytest

from autograder_sim import REFERENCE, REPO, environment, mutant

import grade_class  # noqa: E402 - tools/ is on sys.path (autograder_sim)
import grade_class_demo  # noqa: E402
import make_handout  # noqa: E402

MANIFEST = {"points": {"schedule": 50, "q_sample": 50}, "tests": [{"id": "a", "function": "schedule", "max_score": 50},
                                                                  {"id": "b", "function": "q_sample", "max_score": 50}]}
HINT = "The noise term has the wrong sign: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 13)."


def fake_zip(path):
    """The two files grade_class reads from the autograder zip; the same bytes each time, as make_autograder's."""
    with zipfile.ZipFile(path, "w") as z:
        for name, text in (("manifest.json", json.dumps(MANIFEST)), ("reference/diffusion.py", REFERENCE)):
            z.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), text)
    return str(path)


class FakeGrader:
    """Grades like the runner's results.json: a source holding BUG fails q_sample with a known-mistake hint, CRASH
    makes the grading raise. Counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, source):
        self.calls += 1
        if b"CRASH" in source:
            raise RuntimeError("the runner fell over")
        bug = b"BUG" in source
        tests = [{"name": "schedule: a", "score": 50, "max_score": 50, "output": "passed", "visibility": "visible"},
                 {"name": "q_sample: b", "score": 0 if bug else 50, "max_score": 50, "visibility": "visible",
                  "output": f"wrong\n  This output matches a known mistake:\n    - {HINT}" if bug else "passed"},
                 {"name": "grader notes (instructors only)", "score": 0, "max_score": 0, "visibility": "hidden",
                  "output": "submission mentions: pytest, subprocess, test_diffusion\nstudent process ran as uid "
                            "1234567 (throwaway, unprivileged)\nleftover processes: 2" if bug else
                            "submission mentions: pytest, test_diffusion\nstudent process ran as uid 1234567 "
                            "(throwaway, unprivileged)"}]
        return grade_class.Graded(result={"score": 50.0 if bug else 100.0, "output": "", "tests": tests},
                                  seconds=1.5, peak_mb=300)


def write(folder, files):
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def run(tmp_path, submissions, grader=None, extra=()):
    out = tmp_path / "out"
    grader = grader or FakeGrader()
    grade_class.main([str(submissions), "--out", str(out), "--zip", fake_zip(tmp_path / "ag.zip"), "--no-progress",
                      *extra], grade=grader)
    with open(out / "grades.csv") as f:
        return {r["student"]: r for r in csv.DictReader(f)}, (out / "report.md").read_text(), grader


def test_each_student_is_graded_and_bad_input_is_marked_while_the_rest_go_on(tmp_path):
    notebook = json.dumps({"cells": [], "metadata": {}, "nbformat": 4})
    folder = write(tmp_path / "class", {
        "ann/diffusion.py": REFERENCE, "ben/hw/deep/diffusion.py": REFERENCE + "\n# BUG\n",
        "cat/diffusion.py": REFERENCE + "\n# CRASH\n", "dan/diffusion.py": b"\x89PNG\r\n\x1a\n" + bytes(40),
        "eve/diffusion.py": REFERENCE, "eve/old/diffusion.py": REFERENCE, "fay/diffusion.py": notebook,
        "gus/diffusion_v2.py": REFERENCE, "hal/diffusion.py": "x = 'caf\xe9'\n".encode("latin-1"),
        "index.html": "an LMS's index page", ".hidden/diffusion.py": REFERENCE, "ivy/__MACOSX/diffusion.py": "junk"})
    os.symlink("/etc/passwd", folder / "ivy" / "diffusion.py")
    (folder / "jon").mkdir()
    rows, report, grader = run(tmp_path, folder)
    assert set(rows) == {"ann", "ben", "cat", "dan", "eve", "fay", "gus", "hal", "ivy", "jon"}
    assert (rows["ann"]["status"], rows["ann"]["total"], rows["ann"]["q_sample"]) == ("graded", "100.0", "50")
    assert (rows["ben"]["status"], rows["ben"]["total"]) == ("graded", "50.0")
    assert rows["ben"]["file"] == "ben/hw/deep/diffusion.py"
    assert rows["cat"]["status"] == "grader crashed" and "the runner fell over" in rows["cat"]["reason"]
    assert rows["dan"]["status"] == "bad input" and "a PNG image, not Python source" in rows["dan"]["reason"]
    assert rows["eve"]["status"] == "bad input" and "2 files named diffusion.py" in rows["eve"]["reason"]
    assert "Jupyter notebook" in rows["fay"]["reason"]
    assert rows["gus"]["reason"] == "no diffusion.py (found: diffusion_v2.py)"
    assert rows["hal"]["status"] == "graded"  # not UTF-8 but text: the runner decides (a syntax error there)
    assert rows["ivy"]["status"] == "bad input" and "symbolic link" in rows["ivy"]["reason"]
    assert rows["jon"]["reason"] == "no diffusion.py (found: nothing)"
    assert grader.calls == 4  # the reference check (ann's file too: one content, one grading), ben, cat, hal
    assert json.loads((tmp_path / "out" / "students" / "ben" / "results.json").read_text())["score"] == 50.0
    assert not (tmp_path / "out" / "students" / "cat").exists()
    assert f"| 1 | q_sample | eq. 13 | {HINT} | ben |" in report
    # the handout's own docstring mentions pytest and test_diffusion: only what the student added is a warning
    assert "| ben | `submission mentions: subprocess; leftover processes: 2` |" in report
    assert "| ann |" not in report.split("## Hidden-note warnings")[1].split("## ")[0]
    assert "| 1 | q_sample: b | ben |" in report  # checks failed most often
    assert "| sandbox: throwaway uid, no mount namespace (sees world-readable files); no other namespace | 3 |" in report
    assert (tmp_path / "out" / "report.png").stat().st_size > 20000 and "](report.png)" in report


def test_a_rerun_grades_only_new_or_changed_files_and_retries_crashes(tmp_path):
    folder = write(tmp_path / "class", {"ann/diffusion.py": REFERENCE + "#a", "ben/diffusion.py": REFERENCE + "#b",
                                        "cat/diffusion.py": REFERENCE + "# CRASH"})
    _, _, first = run(tmp_path, folder)
    assert first.calls == 4  # the reference check and three students
    _, _, second = run(tmp_path, folder)
    assert second.calls == 1  # only the crash again
    write(folder, {"ben/diffusion.py": REFERENCE + "# BUG", "dan/diffusion.py": REFERENCE + "#d"})
    rows, _, third = run(tmp_path, folder)
    assert third.calls == 3 and rows["ben"]["total"] == "50.0"
    _, _, other_limits = run(tmp_path, folder, extra=["--memory-mb", "700"])
    assert other_limits.calls == 5  # the limits are part of the key: everything again


@pytest.mark.parametrize("files,message", [
    ({}, "holds no student folders"),
    ({"notes.txt": "hi"}, "holds no student folders"),
    ({"diffusion.py": REFERENCE}, "holds a diffusion.py at its top level"),
    ({"ann/notes.txt": "hi", "ben/diffusion.py": b"%PDF-1.4"}, "none of the 2 student folders"),
])
def test_a_class_with_nothing_to_grade_is_refused_before_anything_is_written(tmp_path, files, message):
    folder = write(tmp_path / "class", files)
    folder.mkdir(exist_ok=True)
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, folder)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["class/../../evil/diffusion.py", "/tmp/evil/diffusion.py", "C:/evil/diffusion.py",
                                   "class\\..\\..\\diffusion.py", "symlink"])
def test_a_zip_with_paths_outside_its_folder_is_refused_whole(tmp_path, entry):
    path = tmp_path / "export.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("class/ann/diffusion.py", REFERENCE)
        if entry == "symlink":
            info = zipfile.ZipInfo("class/ben/diffusion.py")
            info.external_attr = (0o120777 << 16)
            z.writestr(info, "/etc/passwd")
        else:
            z.writestr(entry, "print('escaped')")
    with pytest.raises(SystemExit, match="points outside its folder|symbolic link"):
        run(tmp_path, path)
    assert not (tmp_path / "out").exists()


def test_a_zipped_class_folder_is_graded_like_the_folder(tmp_path):
    path = tmp_path / "export.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("class/", "")
        z.writestr("class/ann/diffusion.py", REFERENCE)
        z.writestr("class/ben/hw/diffusion.py", REFERENCE + "# BUG")
        z.writestr("class/cat/", "")
        z.writestr("__MACOSX/class/ann/._diffusion.py", "junk")
    rows, _, _ = run(tmp_path, path)
    assert {s: r["total"] for s, r in rows.items()} == {"ann": "100.0", "ben": "50.0", "cat": ""}
    assert rows["cat"]["reason"] == "no diffusion.py (found: nothing)"


def test_other_bad_arguments_are_refused(tmp_path):
    folder = write(tmp_path / "class", {"ann/diffusion.py": REFERENCE})
    with pytest.raises(SystemExit, match="does not exist"):
        grade_class.main([str(tmp_path / "nope"), "--no-progress"], grade=FakeGrader())
    with pytest.raises(SystemExit, match="is inside"):
        grade_class.main([str(folder), "--out", str(folder / "graded")], grade=FakeGrader())
    with pytest.raises(SystemExit, match="is not a zip"):
        grade_class.main([str(folder), "--zip", str(folder / "ann" / "diffusion.py")], grade=FakeGrader())


def test_a_broken_setup_stops_the_class_and_caches_nothing(tmp_path):
    folder = write(tmp_path / "class", {f"s{i}/diffusion.py": REFERENCE + f"#{i}" for i in range(6)})
    broken = FakeGrader()

    def broken_setup(source):  # every file loses points, the reference too; a student's grading takes a while
        time.sleep(0.5 * (source != REFERENCE.encode()))
        return broken(source + b"BUG")

    with pytest.raises(SystemExit, match="reference solution scores 50.0 .* the class was not graded"):
        run(tmp_path, folder, grader=broken_setup, extra=["--jobs", "2"])
    assert broken.calls < 7  # the reference, and what had started beside it; the rest was cancelled
    assert not (tmp_path / "out" / "grades.csv").exists()
    _, _, fixed = run(tmp_path, folder)
    assert fixed.calls == 7  # nothing graded with the broken setup was kept


def test_the_copy_detector_pairs_a_renamed_copy_and_not_distinct_solutions():
    alts = os.path.join(REPO, "tools", "alt_solutions")
    sources = {name: open(os.path.join(alts, name + ".py")).read()
               for name in ("float32_algorithm2", "float64_plain_indexing", "lucidrains_style")}
    sources["reference"] = REFERENCE
    sources["renamed_lucidrains"] = grade_class_demo.renamed_copy(sources["lucidrains_style"], grade_class_demo.RENAMES)
    renames = {"alphas_cumprod": "abar", "register": "keep", "x_0": "x0", "img": "picture", "b": "n"}
    sources["renamed_reference"] = grade_class_demo.renamed_copy(REFERENCE, renames)
    head, methods = sources["float32_algorithm2"].split("class Diffusion(nn.Module):\n")
    methods = re.split(r"(?=\n    (?:@torch\.no_grad\(\)\n    )?def )", methods)
    sources["reordered_float32"] = head + "class Diffusion(nn.Module):\n" + methods[0] + "".join(methods[:0:-1])
    sources["bare_handout"] = make_handout.strip_solutions(REFERENCE)[0]
    sources["bare_handout_too"] = sources["bare_handout"].replace("# TODO", "# todo!")
    assert sources["renamed_lucidrains"] != sources["lucidrains_style"]
    pairs, skipped = grade_class.similar_pairs({k: v.encode() for k, v in sources.items()}, sources["bare_handout"])
    assert {(a, b) for _, _, a, b in pairs} == {("lucidrains_style", "renamed_lucidrains"),
                                                ("reference", "renamed_reference"),
                                                ("float32_algorithm2", "reordered_float32")}, pairs
    assert all(similarity > 0.95 for similarity, *_ in pairs) and skipped == []
    # without removing the handout's skeleton, every pair of correct solutions shares its fingerprints
    unfiltered, _ = grade_class.similar_pairs({k: v.encode() for k, v in sources.items()}, "")
    assert len(unfiltered) > len(pairs)


def test_a_small_class_through_the_real_runner(tmp_path):
    python, mode = environment()
    if mode == "none":
        pytest.skip("running as root, but no interpreter that an unprivileged uid can run (set AUTOGRADER_TEST_PYTHON)")
    folder = write(tmp_path / "class", {
        "ann/diffusion.py": REFERENCE, "ben/hw/diffusion.py": mutant("q_sample_swapped"),
        "cat/diffusion.py": REFERENCE.replace("def q_sample(self, x_0, t, noise):", "def q_sample(self)"),
        "dan/diffusion.py": b"PK\x03\x04" + bytes(30)})
    out = tmp_path / "out"
    argv = [str(folder), "--out", str(out), "--python", python, "--jobs", "2", "--no-progress",
            "--memory-mb", os.environ.get("GRADER_MEMORY_MB", "1500")] + ["--allow-same-user"] * (mode == "same-user")
    grade_class.main(argv)
    with open(out / "grades.csv") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    report = (out / "report.md").read_text()
    assert float(rows["ann"]["total"]) == pytest.approx(100, abs=1e-3)
    assert float(rows["ben"]["q_sample"]) < 15 and float(rows["ben"]["total"]) == pytest.approx(
        85 + float(rows["ben"]["q_sample"]), abs=1e-3)
    assert float(rows["ben"]["seconds"]) > 0 and float(rows["ben"]["peak_mb"]) > 100
    assert rows["cat"]["status"] == "not run" and rows["cat"]["reason"].startswith("syntax error: diffusion.py has a")
    assert rows["dan"]["status"] == "bad input"
    hint = next(m.hint for m in grade_class_demo.mutation_test.MUTANTS if m.name == "q_sample_swapped")
    assert f"| 1 | q_sample | eq. 13 | {hint} | ben |" in report
    if mode == "isolated":
        assert rows["ben"]["contained"].startswith("sandbox: throwaway uid")
    assert json.loads((out / "students" / "ben" / "results.json").read_text())["score"] == float(rows["ben"]["total"])
    grade_class.main(argv + ["--zip", str(out / "autograder.zip")])  # resumes: nothing graded again
    assert "this run graded 0 files" in (out / "report.md").read_text()
