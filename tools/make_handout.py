"""Build the student handout from this repository (instructors only).

    python tools/make_handout.py                      # -> build/handout/ and build/handout.zip
    python tools/make_handout.py --data data/train    # also bundle a data folder (as handout/data/train)
    python tools/make_handout.py --out /tmp/h --zip /tmp/h.zip

What goes in:
  * diffusion.py with every `# BEGIN SOLUTION` ... `# END SOLUTION` region replaced by a TODO stub that
    raises NotImplementedError naming the method and the handout equation to implement;
  * the other student files, unchanged, where they exist (STUDENT_FILES);
  * test_diffusion.py (the graded checks), grading.py (their machinery), conftest.py (prints the score) and
    test_fixtures/ (the reference values);
  * a pytest.ini of its own that only collects test_diffusion.py;
  * README.md rendered for students (render_readme): README.md is one source with two renderings. In it,
      <!-- instructors-only --> ... <!-- /instructors-only -->   is left out of the handout (whole lines or
                                                             inside a line, e.g. part of a table cell);
      a line holding <!-- instructors-only line -->           is left out (a table row, which a comment line
                                                             would cut in two);
      <!-- students-only: TEXT -->                            shows TEXT in the handout only (in the master
                                                             it is a comment; TEXT may span lines).
Instructor-only material (tests/, tools/ with solutions, fixture scripts and mutants, bench/, .ci/) is left out:
only the files listed below are copied.
"""
import argparse
import os
import re
import shutil
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUDENT_FILES = [
    "unet.py", "trainer.py", "utils.py", "main.py", "test_diffusion.py", "grading.py", "conftest.py",
    "requirements.txt", "run_in_colab.ipynb", "run_in_kaggle.ipynb", "README.md", "data/README.md",
    "data/prepare_afhq.py",
]
STUDENT_FOLDERS = ["kit", "test_fixtures", "docs"]  # kit: the trainer's machinery; docs: the figures README.md shows
REQUIRED = ["diffusion.py", "unet.py", "test_diffusion.py", "grading.py", "conftest.py", "test_fixtures"]
RENDERED = {"README.md": "render_readme"}  # copied, then rewritten for students

# no `timeout =`: pytest-timeout is not in the student's requirements.txt (an unknown option would warn)
HANDOUT_PYTEST_INI = """[pytest]
testpaths = test_diffusion.py
addopts = -ra
filterwarnings =
    ignore::DeprecationWarning
"""

# where each method's TODO points the student
POINTERS = {
    "__init__": "the schedule buffers: cosine schedule eq. 12-14, q(x_t | x_0) coefficients eq. 13, "
                "posterior mean and variance eq. 18",
    "q_sample": "eq. 13",
    "p_losses": "Algorithm 1 (L1 loss on the noise)",
    "forward": "Algorithm 1: draw t uniformly from 0..T-1, then p_losses",
    "p_sample": "Algorithm 2, x_0 estimate eq. 19, posterior mean and variance eq. 18",
    "p_sample_loop": "Algorithm 2",
    "sample": "Algorithm 2",
}
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
DOC_NOTE = re.compile(r"Regions between `# BEGIN SOLUTION` and `# END SOLUTION`.*?replaces each with a TODO\.", re.S)
HANDOUT_DOC_NOTE = ("Your work: the TODOs below (each raises NotImplementedError until you implement it).\n"
                    "Check them with `pytest test_diffusion.py`.")


def strip_solutions(source):
    """Replace each solution region with a NotImplementedError stub; returns (new source, [method names])."""
    source = DOC_NOTE.sub(HANDOUT_DOC_NOTE, source)
    lines = source.splitlines(keepends=True)
    out, methods, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != BEGIN:
            if END in line or BEGIN in line:
                raise ValueError(f"diffusion.py line {i + 1}: stray solution marker: {line.strip()}")
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        method = next((m.group(1) for prev in reversed(out) if (m := re.match(r"\s*def (\w+)\(", prev))), None)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == END), None)
        if end is None:
            raise ValueError(f"diffusion.py line {i + 1}: {BEGIN} without {END}")
        name = f"Diffusion.{method}"
        pointer = POINTERS.get(method, "see the handout")
        out.append(f"{indent}# TODO: implement {name} ({pointer}).\n")
        out.append(f'{indent}raise NotImplementedError("TODO: implement {name} in diffusion.py (handout: {pointer})")\n')
        methods.append(method)
        i = end + 1
    stripped = "".join(out)
    compile(stripped, "diffusion.py", "exec")
    if BEGIN in stripped or END in stripped:
        raise ValueError("solution markers left in the stripped diffusion.py")
    return stripped, methods


INSTRUCTORS_ONLY = re.compile(r"^[ \t]*<!-- instructors-only -->[ \t]*\n(.*?)^[ \t]*<!-- /instructors-only -->[ \t]*\n"
                              r"|<!-- instructors-only -->(.*?)<!-- /instructors-only -->", re.S | re.M)
INSTRUCTORS_ONLY_LINE = re.compile(r"^.*<!-- instructors-only line -->.*\n?", re.M)
STUDENTS_ONLY = re.compile(r"<!-- students-only:[ \t]*\n?(.*?)\s*-->", re.S)


def render_readme(text):
    """The student handout's README from the master README (markers: see the module docstring)."""
    text = INSTRUCTORS_ONLY.sub("", text)
    text = INSTRUCTORS_ONLY_LINE.sub("", text)
    text = STUDENTS_ONLY.sub(lambda m: m.group(1), text)
    for marker in ("instructors-only", "students-only"):
        if marker in text:
            line = text[: text.index(marker)].count("\n") + 1
            raise ValueError(f"README.md: unmatched {marker} marker (line {line} of the rendered handout README)")
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def build(out_dir, zip_path, data=None):
    for item in REQUIRED:
        if not os.path.exists(os.path.join(ROOT, item)):
            raise SystemExit(f"missing {item}: cannot build the handout")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    with open(os.path.join(ROOT, "diffusion.py")) as f:
        stripped, methods = strip_solutions(f.read())
    with open(os.path.join(out_dir, "diffusion.py"), "w") as f:
        f.write(stripped)
    for item in STUDENT_FILES:
        src = os.path.join(ROOT, item)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(out_dir, item)) or out_dir, exist_ok=True)
            shutil.copy2(src, os.path.join(out_dir, item))
    for folder in STUDENT_FOLDERS:
        shutil.copytree(os.path.join(ROOT, folder), os.path.join(out_dir, folder),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with open(os.path.join(out_dir, "pytest.ini"), "w") as f:
        f.write(HANDOUT_PYTEST_INI)
    for item, renderer in RENDERED.items():
        path = os.path.join(out_dir, item)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = globals()[renderer](f.read())
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if data:
        rel = os.path.relpath(os.path.abspath(data), ROOT)
        target = os.path.join(out_dir, rel if not rel.startswith("..") else os.path.join("data", os.path.basename(data)))
        shutil.copytree(data, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if zip_path:
        os.makedirs(os.path.dirname(os.path.abspath(zip_path)), exist_ok=True)
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
            for folder, _, files in os.walk(out_dir):
                for name in sorted(files):
                    path = os.path.join(folder, name)
                    z.write(path, os.path.join("handout", os.path.relpath(path, out_dir)))
    return methods


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "handout"))
    parser.add_argument("--zip", default=os.path.join(ROOT, "build", "handout.zip"), help="'' for no zip")
    parser.add_argument("--data", help="a data folder to bundle (e.g. data/train)")
    args = parser.parse_args(argv)
    methods = build(args.out, args.zip, args.data)
    print(f"handout: {args.out} ({len(methods)} TODOs: {', '.join(methods)})" + (f"; zip: {args.zip}" if args.zip else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
