"""Grade a whole class with the autograder, and report what the class got wrong (instructors only).

    python tools/grade_class.py SUBMISSIONS [--out DIR] [--jobs N] [--zip build/autograder.zip] [--python PY]

SUBMISSIONS is a folder holding one folder per student (the folder's name is the student), each with a
diffusion.py at any depth, or a zip of such a folder (an LMS export; a single wrapping folder is fine). Each file
is graded by the autograder zip's own entry point (grader.py --root over a Gradescope-like folder: source/ from
the zip, submission/, results/), i.e. the same sandbox, trusted judge and secret inputs as on Gradescope, N at a
time. As root the student's code runs in the sandbox (throwaway uid); without root this tool refuses unless
--allow-same-user is given (development only: no isolation), as the runner does.

The zip's reference solution is graded first, as a check of the setup (beside the first students): unless it
scores 100, the class is refused and nothing is cached. Results are cached in OUT/.cache by the file's content,
the zip's hash and the limits, so a re-run grades only new or changed files (and a file handed in twice is graded
once). tools/GRADING.md, "Grading a class", has the details; tools/grade_class_demo.py checks it end to end.

Writes to OUT (default: SUBMISSIONS with "_graded" appended):
  grades.csv                  student, file, status, total, points per graded function, seconds (wall and CPU) and
                              peak memory of the grading, containment, the reason when not graded
  students/<student>/results.json   what the student would see on Gradescope (plus the hidden notes)
  report.md, report.png       scores, per-function pass rates, known mistakes, submissions that could not run,
                              hidden-note warnings, suspiciously similar pairs (for a human to look at)
Bad input (a student with two diffusion.py files, a binary file named diffusion.py) marks that student and the
rest go on; a bad SUBMISSIONS (empty, a zip with paths outside its folder) is refused before anything is written.
"""
import argparse
import concurrent.futures
import contextlib
import csv
import hashlib
import io
import itertools
import json
import keyword
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
import zipfile
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import make_autograder  # noqa: E402
import make_handout  # noqa: E402
from autograder_runner import MARGIN_MB, MAX_SOURCE, SUSPICIOUS, read_source, rss_of  # noqa: E402
from measure_grading import tree  # noqa: E402  (a process and its descendants)

SKIPPED_DIRS = ("__MACOSX",)  # and hidden folders, as the runner's find_submission
BINARY_MAGIC = {b"PK\x03\x04": "a zip archive", b"%PDF": "a PDF", b"\x7fELF": "a program", b"\x89PNG": "a PNG image",
                b"\xd0\xcf\x11\xe0": "an Office document"}
MAX_ZIP_ENTRIES = 100_000
MISTAKE = re.compile(r"This output matches (?:a known mistake|one of these known mistakes):\n((?:    - .*\n?)+)")
EQUATION = re.compile(r"eq\. \d+(?:-\d+)?|Algorithm \d")
# the runner's hidden notes an instructor should look at (their wording: tools/autograder_runner.py). The student's
# output tail is part of the same text, so a student can add such lines, but only to their own row.
WARNING_NOTE = re.compile(r"^(submission mentions|leftover processes|processes besides the worker|probes stopped|"
                          r"flood|malformed protocol lines|unexpected protocol lines|refused|restart failed|WARNING|"
                          r"known-mistake hints (?:skipped|stopped)|file system: (?:hiding|the interpreter|no mount)|"
                          r"network: NOT isolated)", re.M)
# copy detector: k-grams of normalised tokens, winnowed (Schleimer, Wilkerson & Aiken 2003, as MOSS)
KGRAM, WINDOW = 12, 8
SIMILAR, MIN_SHARED = 0.5, 20  # flag a pair sharing >= half of the smaller file's fingerprints, and >= 20 of them


def refuse(message):
    raise SystemExit(f"grade_class.py: {message}")


# ------------------------------------------------------------------ the class: one diffusion.py per student
@dataclass
class Submission:
    student: str
    path: str = ""  # of the diffusion.py, relative to SUBMISSIONS
    source: bytes = None
    problem: str = ""  # bad input: why this student is not graded


def safe_parts(name, where):
    """A zip entry's path components; refuses the whole zip if the entry points outside its folder (zip-slip)."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts or "\0" in name:
        refuse(f"{where} holds the entry {name!r}, which points outside its folder; nothing was extracted or graded "
               "(re-export the zip, or unpack it yourself and check it)")
    return [p for p in parts if p not in ("", ".")]


def skipped(parts):
    return any(p.startswith(".") or p in SKIPPED_DIRS for p in parts)


def zip_files(path):
    """({relative path: reader() -> bytes}, {top-level folder}) of a zipped class; every entry is checked before
    anything is read, and nothing is extracted."""
    z = zipfile.ZipFile(path)
    infos = z.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        refuse(f"{path} holds {len(infos)} entries (limit {MAX_ZIP_ENTRIES}); is it the class's export?")
    entries = {}
    for info in infos:
        parts = safe_parts(info.filename, path)
        if stat.S_ISLNK(info.external_attr >> 16):
            refuse(f"{path} holds the symbolic link {info.filename!r}; nothing was graded (re-export it without links)")
        if parts and not skipped(parts[:-1]):
            entries["/".join(parts) + "/" * info.is_dir()] = info
    tops = {rel.split("/")[0] for rel in entries}
    top = tops.pop() if len(tops) == 1 else None
    if top and all("/" in rel for rel in entries) and f"{top}/diffusion.py" not in entries:
        entries = {rel.split("/", 1)[1]: info for rel, info in entries.items() if rel != top + "/"}  # the class folder
    folders = {rel.split("/")[0] for rel in entries if "/" in rel and not skipped(rel.split("/")[:1])}

    def reader(info):
        def read():
            if info.file_size > MAX_SOURCE:  # the runner's limit, checked before decompressing
                raise ValueError(f"diffusion.py is {info.file_size} bytes; the limit is {MAX_SOURCE} bytes")
            return z.read(info)
        return read

    return {rel: reader(info) for rel, info in entries.items() if not rel.endswith("/")}, folders


def folder_files(path):
    """({relative path: reader() -> bytes}, {top-level folder}) of a class folder; files are read as the runner
    reads them (no symlinks)."""
    folders = {entry.name for entry in os.scandir(path) if entry.is_dir() and not skipped([entry.name])}
    files = {}
    for parent, dirs, names in os.walk(path):  # does not follow symlinked folders
        dirs[:] = sorted(d for d in dirs if not skipped([d]))
        for name in names:
            full = os.path.join(parent, name)
            files[os.path.relpath(full, path).replace(os.sep, "/")] = lambda full=full: read_source(full)
    return files, folders


def not_python(data):
    """Why `data` cannot be a Python source file (a bad input, not a student's 0), or ''."""
    for magic, what in BINARY_MAGIC.items():
        if data.startswith(magic):
            return f"diffusion.py is {what}, not Python source"
    if b"\0" in data[:65536]:
        return "diffusion.py is a binary file (or UTF-16 text), not Python source"
    if data.lstrip().startswith(b"{"):
        try:
            if "cells" in json.loads(data):
                return "diffusion.py is a Jupyter notebook; export it as a .py file"
        except (ValueError, TypeError, RecursionError):
            pass
    return ""


def collect(submissions):
    """One Submission per student (the top-level folder under SUBMISSIONS); refuses a class with nothing to grade."""
    if not zipfile.is_zipfile(submissions) and not os.path.isdir(submissions):
        refuse(f"{submissions} is neither a folder nor a zip; give the folder (or zip) holding one folder per student")
    files, folders = zip_files(submissions) if zipfile.is_zipfile(submissions) else folder_files(submissions)
    if "diffusion.py" in files:
        refuse(f"{submissions} holds a diffusion.py at its top level; put each student's file in a folder named for "
               "the student")
    by_student = {student: [] for student in sorted(folders)}  # loose files at the top level are not students
    for rel in sorted(files):
        if "/" in rel:
            by_student[rel.split("/")[0]].append(rel)
    if not by_student:
        refuse(f"{submissions} holds no student folders; give the folder (or zip) holding one folder per student")
    out = []
    for student, rels in by_student.items():
        found = [rel for rel in rels if rel.rsplit("/", 1)[-1] == "diffusion.py"]
        sub = Submission(student, found[0] if found else "")
        if not found:
            names = [rel.split("/", 1)[1] for rel in rels]
            sub.problem = f"no diffusion.py (found: {', '.join(names[:5]) or 'nothing'}{' ...' * (len(names) > 5)})"
        elif len(found) > 1:
            sub.problem = f"{len(found)} files named diffusion.py ({', '.join(found[:4])}): keep the one to grade"
        else:
            try:
                sub.source = files[found[0]]()
                sub.problem = not_python(sub.source)
            except ValueError as exc:  # the runner's own reading rules: a regular file, no link, at most 1 MB
                sub.problem = str(exc)
        out.append(sub)
    if all(s.problem for s in out):
        refuse(f"none of the {len(out)} student folders of {submissions} holds a gradable diffusion.py "
               f"(first: {out[0].student}: {out[0].problem})")
    return out


# ------------------------------------------------------------------ grading one file with the autograder zip
@dataclass
class Graded:
    result: dict = None  # results.json
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # user + system time of the whole process tree (what a busy machine does not change)
    peak_mb: float = 0.0
    problem: str = ""  # the grader itself crashed or hung


STOP = threading.Event()  # set on Ctrl-C: running graders are killed


def grade_with_zip(source, zip_path, python, limits, allow_same_user):
    """Grade one diffusion.py the way Gradescope does: the zip unpacked into source/, the file in submission/, the
    zip's grader.py --root; peak memory of its whole process tree, sampled as tools/measure_grading.py does."""
    root = tempfile.mkdtemp(prefix="grade-class-")
    try:
        make_autograder.unpack(zip_path, os.path.join(root, "source"))
        os.makedirs(os.path.join(root, "submission"))
        with open(os.path.join(root, "submission", "diffusion.py"), "wb") as f:
            f.write(source)
        command = [python, "grader.py", "--root", root, "--python", python, "--time-limit", str(limits["time_limit"]),
                   "--probe-timeout", str(limits["probe_timeout"]), "--memory-mb", str(limits["memory_mb"])]
        if allow_same_user:
            command.append("--allow-same-user")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        deadline = limits["time_limit"] + 600  # plan and judge come on top of the student's time
        start, peak = time.time(), 0
        with open(os.path.join(root, "grader.log"), "w+b") as log:
            proc = subprocess.Popen(command, cwd=os.path.join(root, "source"), env=env, stdout=log, stderr=log,
                                    start_new_session=True)
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # usage: the grader and what it waited for
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    break
                peak = max(peak, rss_of(tree(proc.pid)))
                if STOP.is_set() or time.time() - start > deadline:  # a backstop: the runner has its own limits
                    for pid in tree(proc.pid):  # the grader, its trusted processes and the student's worker
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
            seconds = time.time() - start
            log.seek(max(0, log.seek(0, 2) - 2000))
            tail = log.read().decode(errors="replace").strip().splitlines()
        graded = Graded(seconds=round(seconds, 2), cpu_seconds=round(usage.ru_utime + usage.ru_stime, 2),
                        peak_mb=round(peak / 2 ** 20))
        try:
            with open(os.path.join(root, "results", "results.json")) as f:
                graded.result = json.load(f)
        except (OSError, ValueError):
            last = tail[-1] if tail else "no output"
            graded.problem = (f"the grader did not finish within {deadline:.0f} s" if seconds > deadline else
                              f"the grader crashed (exit code {proc.returncode}: {last[:300]})")
            return graded
        if proc.returncode != 0:  # the runner caught its own failure and wrote a 0 with the reason
            graded.problem = f"the grader failed (exit code {proc.returncode}): {graded.result.get('output', '')[:300]}"
        return graded
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ reading results.json
FAILURES = [  # (category, pattern in the runner's message when a submission could not run at all)
    ("syntax error", r"syntax error"), ("timeout", r"longer than|time limit"), ("memory", r"MB of memory"),
    ("import error", r"could not be imported"), ("refused", r"REFUSED"), ("grader failure", r"grader itself failed"),
    ("file", r"symbolic link|not a regular file|the limit is \d+ bytes"), ("output flood", r"more output than"),
]


def function_points(result, functions):
    return {f: round(sum(t["score"] for t in result["tests"] if t["name"].startswith(f + ":")), 2) for f in functions}


def visible_tests(result):
    return [t for t in result.get("tests", []) if t.get("visibility") != "hidden"]


def hidden_notes(result):
    return "\n".join(t["output"] for t in result.get("tests", []) if t.get("visibility") == "hidden")


def could_not_run(result):
    """(category, message) when the runner gave the same reason for every check (nothing of it ran), else None."""
    tests = visible_tests(result)
    outputs = {t["output"] for t in tests}
    if tests and len(outputs) == 1 and all(t["score"] == 0 for t in tests):
        message = outputs.pop()
    elif not tests:
        message = result.get("output", "")
    else:
        return None
    category = next((c for c, pattern in FAILURES if re.search(pattern, message)), "other")
    return category, message


def stopped_checks(result):
    """The reasons of the checks whose probe was stopped (timeout, memory, crash) while the others ran."""
    reasons = [re.sub(r"^(This check's probe stopped|Not run): ", "", t["output"]).split("\n")[0].rstrip(".")
               for t in visible_tests(result) if t["output"].startswith(("This check's probe stopped:", "Not run:"))]
    return sorted(set(reasons)), len(reasons)


def known_mistakes(result):
    """{(function, hint)} the judges matched ("This output matches a known mistake: ...")."""
    found = set()
    for t in visible_tests(result):
        for block in MISTAKE.findall(t["output"]):
            for line in block.splitlines():
                found.add((t["name"].split(":")[0], line.strip()[2:].strip()))
    return found


def containment(result):
    notes = hidden_notes(result)
    if "throwaway, unprivileged" in notes:
        namespaces = re.search(r"^namespaces: private (.*)$", notes, re.M)
        return ("sandbox: throwaway uid, " + ("private mount namespace" if "private mount namespace" in notes else
                                              "no mount namespace (sees world-readable files)")
                + (f"; private {namespaces.group(1)} namespaces" if namespaces else "; no other namespace"))
    if "--allow-same-user" in notes:
        return "same user as the grader (no isolation)"
    return "not run" if could_not_run(result) else "unknown (see the hidden notes)"


# ------------------------------------------------------------------ copy detector
def normalized_tokens(source):
    """Tokens with comments, docstrings and layout dropped, strings as S, and every identifier renamed by order of
    first appearance, counted afresh in each function (so consistent renaming, also within one function, changes
    nothing). Raises SyntaxError / tokenize.TokenError for what cannot be tokenized."""
    dropped = {tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in dropped]
    out, names, at_line_start = [], {}, True
    for i, tok in enumerate(tokens):
        starts_line, at_line_start = at_line_start, tok.type == tokenize.NEWLINE
        if tok.type == tokenize.NEWLINE:
            continue
        if tok.type == tokenize.STRING:
            if starts_line and (i + 1 == len(tokens) or tokens[i + 1].type == tokenize.NEWLINE):
                continue  # a docstring (or any string statement)
            out.append("S")
        elif tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
            if out and out[-1] == "def":
                names = {}
            out.append(f"v{names.setdefault(tok.string, len(names))}")
        else:
            out.append(tok.string)
    return out


def fingerprints(tokens):
    """Winnowing: the smallest hash of every window of WINDOW consecutive KGRAM-token hashes."""
    hashes = [int.from_bytes(hashlib.blake2b(" ".join(tokens[i:i + KGRAM]).encode(), digest_size=8).digest(), "big")
              for i in range(len(tokens) - KGRAM + 1)]
    return {min(hashes[i:i + WINDOW]) for i in range(max(0, len(hashes) - WINDOW + 1))}


def similar_pairs(sources, skeleton):
    """[(similarity, shared, a, b)] of the pairs at or above SIMILAR, most similar first, and the students whose
    file could not be tokenized. The skeleton's fingerprints (what every student starts from) are left out."""
    common = fingerprints(normalized_tokens(skeleton))
    prints, skipped = {}, []
    for student, source in sources.items():
        try:
            prints[student] = fingerprints(normalized_tokens(source.decode("utf-8"))) - common
        except (SyntaxError, tokenize.TokenError, UnicodeDecodeError):
            skipped.append(student)
    pairs = []
    for a, b in itertools.combinations(sorted(prints), 2):
        shared = len(prints[a] & prints[b])
        similarity = shared / max(1, min(len(prints[a]), len(prints[b])))
        if similarity >= SIMILAR and shared >= MIN_SHARED:
            pairs.append((round(similarity, 3), shared, a, b))
    return sorted(pairs, key=lambda p: (-p[0], p[2], p[3])), skipped


def groups_of(pairs):
    """Connected groups of students (union-find over the flagged pairs), largest first."""
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, _, a, b in pairs:
        parent[find(a)] = find(b)
    groups = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g))


# ------------------------------------------------------------------ grading the class
def zip_contents(zip_path):
    with zipfile.ZipFile(zip_path) as z:
        return json.loads(z.read("manifest.json")), z.read("reference/diffusion.py")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def load_cached(cache, key):
    try:
        with open(os.path.join(cache, key + ".json")) as f:
            return Graded(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def save_cached(cache, key, graded):
    write_atomic(os.path.join(cache, key + ".json"), json.dumps(graded.__dict__))


def grade_all(sources, grade, cache, jobs, check, progress=True):
    """({key: Graded} for every source ({key: bytes}; the first is the reference solution), how many were graded
    now): only what the cache lacks is graded (crashes are retried). check(graded) raises SystemExit when the
    reference's grading shows a broken setup: what has not started is cancelled, and nothing graded is cached."""
    from tqdm import tqdm

    STOP.clear()
    done = {key: g for key in sources if (g := load_cached(cache, key)) is not None}
    reference = next(iter(sources))
    checked = reference in done and check(done[reference]) is None
    todo = [key for key in sources if key not in done]  # the reference first
    unsaved = []
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool, \
            tqdm(total=len(todo), unit="file", desc="grading", disable=not progress or not todo) as bar:
        futures = {pool.submit(grade, sources[key]): key for key in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                key = futures[future]
                try:
                    done[key] = future.result()
                except Exception as exc:  # noqa: BLE001 - one student's grading must not stop the class
                    done[key] = Graded(problem=f"grading crashed ({type(exc).__name__}: {str(exc)[:300]})")
                if key == reference:
                    checked = check(done[key]) is None
                if not done[key].problem:
                    unsaved.append(key)
                while checked and unsaved:
                    key = unsaved.pop()
                    save_cached(cache, key, done[key])
                bar.update()
        except BaseException:  # a broken setup, Ctrl-C: cancel what has not started, stop what runs
            pool.shutdown(wait=False, cancel_futures=True)
            STOP.set()
            raise
    return done, len(todo)


@dataclass
class Row:
    """One student's line of grades.csv, and what the report says about them."""
    student: str
    file: str
    status: str  # graded / not run / bad input / grader crashed
    total: float = None
    points: dict = field(default_factory=dict)
    seconds: float = None
    cpu_seconds: float = None
    peak_mb: float = None
    contained: str = ""
    reason: str = ""
    mistakes: set = field(default_factory=set)
    warnings: list = field(default_factory=list)
    stopped: tuple = ((), 0)
    failed: set = field(default_factory=set)  # check names


def row_of(sub, graded, functions, handout_mentions=()):
    if sub.problem:
        return Row(sub.student, sub.path, "bad input", contained="not run", reason=sub.problem)
    timing = {"seconds": graded.seconds, "cpu_seconds": graded.cpu_seconds, "peak_mb": graded.peak_mb}
    if graded.problem:
        return Row(sub.student, sub.path, "grader crashed", contained="unknown", reason=graded.problem, **timing)
    result = graded.result
    failure = could_not_run(result)
    return Row(sub.student, sub.path, "not run" if failure else "graded", total=round(result["score"], 2),
               points=function_points(result, functions), **timing,
               contained=containment(result), reason=f"{failure[0]}: {failure[1]}" if failure else "",
               mistakes=known_mistakes(result), warnings=warnings_in(hidden_notes(result), handout_mentions),
               stopped=stopped_checks(result), failed=failed_checks(result))


def warnings_in(notes, handout_mentions=()):
    """The warning lines of the hidden notes; mentions the handout itself makes (in its docstrings) are left out."""
    out = []
    for line in notes.splitlines():
        if line.startswith("submission mentions: "):
            labels = [m for m in line.split(": ", 1)[1].split(", ") if m not in handout_mentions]
            line = "submission mentions: " + ", ".join(labels) if labels else ""
        if WARNING_NOTE.match(line):
            out.append(line)
    return out


def failed_checks(result):
    """Names of the checks that lost points, without the small/large T variant (one check, two runs)."""
    return {re.sub(r"-(small|large)_T\b.*", "", t["name"]) for t in visible_tests(result)
            if t["score"] < t["max_score"]}


def write_atomic(path, text):
    """Written whole or not at all (so an interrupted run leaves the previous file, or none)."""
    with open(path + ".tmp", "w", newline="") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_csv(path, rows, functions):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["student", "file", "status", "total", *functions, "seconds", "cpu_seconds", "peak_mb",
                     "contained", "reason"])
    for r in rows:
        writer.writerow([r.student, r.file, r.status, "" if r.total is None else r.total,
                         *[r.points.get(f, "") for f in functions],
                         *["" if v is None else v for v in (r.seconds, r.cpu_seconds, r.peak_mb)],
                         r.contained, r.reason.split("\n")[0][:300]])
    write_atomic(path, buffer.getvalue())


# ------------------------------------------------------------------ the report
def mistake_table(rows):
    """[(hint, functions whose checks showed it, equation, [students])], most frequent first."""
    students, functions = {}, {}
    for r in rows:
        for function, hint in r.mistakes:
            students.setdefault(hint, set()).add(r.student)
            functions.setdefault(hint, set()).add(function)
    table = [(hint, ", ".join(sorted(functions[hint])), ", ".join(EQUATION.findall(hint)) or "-", sorted(who))
             for hint, who in students.items()]
    return sorted(table, key=lambda m: (-len(m[3]), m[1], m[0]))


def plot_scores(ax, rows):
    totals = [r.total for r in rows if r.total is not None]
    ax.hist(totals, bins=range(0, 105, 5), color="#4c72b0", edgecolor="white")
    ax.set(xlabel="total score", ylabel="students", title=f"Scores ({len(totals)} graded)", xlim=(0, 100))
    ax.yaxis.get_major_locator().set_params(integer=True)


def plot_functions(ax, rows, manifest):
    graded = [r for r in rows if r.total is not None]
    functions = list(manifest["points"])
    rates = [100 * sum(1 for r in graded if r.points.get(f, 0) >= manifest["points"][f] - 1e-6) / max(1, len(graded))
             for f in functions]
    ax.barh(functions[::-1], rates[::-1], color="#55a868")
    for y, rate in enumerate(rates[::-1]):
        ax.text(min(rate, 88) + 1, y, f"{rate:.0f}%", va="center", fontsize=8)
    ax.set(xlabel="% of students with full points", title="Per function", xlim=(0, 100))


def plot_mistakes(ax, table, top=12):
    shown = table[:top][::-1]
    most = max([len(who) for *_, who in shown], default=1)
    ax.barh(range(len(shown)), [len(who) for *_, who in shown], color="#f2b5b5")
    for y, (hint, functions, eq, who) in enumerate(shown):  # the label over its bar: long hints need the width
        text = f"{functions} ({eq}): {hint}"
        ax.text(most * 0.005, y, f"{len(who)}   " + (text[:130] + " ..." if len(text) > 130 else text), va="center",
                fontsize=7)
    ax.set_yticks([])
    ax.set_xlim(0, most)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="students", title=f"Known mistakes the judges matched (top {len(shown)} of {len(table)})")


def write_figure(path, rows, manifest, table):
    """report.png: the score histogram, the per-function pass rates and the known mistakes, on one page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 7))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.2])
    plot_scores(fig.add_subplot(grid[0, 0]), rows)
    plot_functions(fig.add_subplot(grid[0, 1]), rows, manifest)
    plot_mistakes(fig.add_subplot(grid[1, :]), table)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def cell(text, limit=160, code=False):
    """One Markdown table cell; `code` for text the student controls (an import error, their output), which is then
    shown verbatim instead of rendered."""
    text = " ".join(str(text).split())
    text = (text[:limit] + " ..." if len(text) > limit else text).replace("|", "\\|")
    return "`" + text.replace("`", "'") + "`" if code and text else text


def md_table(header, rows):
    if not rows:
        return ["None.", ""]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                           for r in rows] + [""]


def report(rows, manifest, pairs, untokenized, info):
    graded = [r for r in rows if r.total is not None]
    totals = sorted(r.total for r in graded)
    table = mistake_table(rows)
    count = {status: sum(1 for r in rows if r.status == status)
             for status in ("not run", "bad input", "grader crashed")}
    lines = [f"# Class report: {info['submissions']}", "",
             f"{len(rows)} students: {len(graded)} graded (of which {count['not run']} could not run and score 0), "
             f"{count['bad input']} bad input, {count['grader crashed']} grader crashes. Grader: {info['zip']} "
             f"(sha256 {info['zip_sha'][:12]}), limits {info['limits']}, {info['jobs']} at a time; this run graded "
             f"{info['graded_now']} files in {info['wall']:.0f} s (the others came from the cache).", ""]
    if totals:
        wall, cpu = sorted(r.seconds or 0 for r in graded), sorted(r.cpu_seconds or 0 for r in graded)
        lines += [f"Mean {sum(totals) / len(totals):.1f}, median {totals[len(totals) // 2]:.1f}, "
                  f"{sum(1 for t in totals if t >= 100 - 1e-6)} at 100. Grading one file took a median of "
                  f"{wall[len(wall) // 2]:.1f} s (at most {wall[-1]:.1f} s) and {cpu[len(cpu) // 2]:.1f} s of CPU, "
                  f"with a peak of {max(r.peak_mb or 0 for r in graded):.0f} MB (its whole process tree).", ""]
    lines += ["## How each file was contained", ""]
    lines += md_table(["containment", "students"], [(how, sum(1 for r in rows if r.contained == how))
                                                    for how in sorted({r.contained for r in rows})])
    lines += ["## Scores", "", "![scores, pass rates per function, known mistakes](report.png)", ""]
    lines += md_table(["function", "points", "mean", "full points"], [
        (f, most, f"{sum(r.points.get(f, 0) for r in graded) / max(1, len(graded)):.2f}",
         f"{sum(1 for r in graded if r.points.get(f, 0) >= most - 1e-6)} of {len(graded)}")
        for f, most in manifest["points"].items()])
    lines += ["## Known mistakes the judges matched", "",
              "What the judges recognised in failing outputs (the mutant catalogue of tools/mutation_test.py run on "
              "the same inputs); one student may show several (the figure above shows the most frequent).", ""]
    lines += md_table(["students", "seen in", "equation", "mistake", "who"], [
        (len(students), function, eq, cell(hint, 300), cell(", ".join(students), 200))
        for hint, function, eq, students in table])
    failing = {}
    for r in rows:
        for name in r.failed if r.status == "graded" else ():
            failing.setdefault(name, []).append(r.student)
    lines += ["## Checks failed most often", "",
              "Every check that lost points, with how many students (of those whose code ran); the judges of forward "
              "and p_sample_loop explain mistakes in their own words (no known-mistake match), so those show here.", ""]
    lines += md_table(["students", "check", "who"], [(len(who), name, cell(", ".join(who), 200)) for name, who in
                                                     sorted(failing.items(), key=lambda kv: (-len(kv[1]), kv[0]))])
    lines += ["## Submissions that could not run", ""]
    lines += md_table(["student", "status", "reason"], [
        (cell(r.student, 60), r.status, cell(r.reason, 300, code=True)) if r.status != "graded" else
        (cell(r.student, 60), f"{r.stopped[1]} checks stopped", cell("; ".join(r.stopped[0]), 300, code=True))
        for r in rows if r.status != "graded" or r.stopped[1]])
    lines += ["## Hidden-note warnings", "",
              "From the grader's notes for instructors. Mentions of suspicious names are not proof of anything; those "
              f"the handout itself makes ({', '.join(sorted(info['handout_mentions'])) or 'none'}) are left out.", ""]
    lines += md_table(["student", "warnings"], [(cell(r.student, 60), cell("; ".join(r.warnings), 400, code=True))
                                                for r in rows if r.warnings])
    lines += ["## Suspiciously similar submissions", "",
              f"Measure: each file is tokenized with comments, docstrings and layout dropped, strings replaced by one "
              f"token and every identifier renamed by order of first appearance in each function (so renamed variables "
              f"and changed comments do not hide a copy); {KGRAM}-token k-grams are hashed and winnowed (window "
              f"{WINDOW}, as MOSS), and the fingerprints of the handout's skeleton (tools/make_handout.py applied to "
              f"the reference) are removed, so that what every student was given does not make correct solutions "
              f"alike. "
              f"Similarity = shared fingerprints / fingerprints of the smaller file; flagged at >= {SIMILAR} with at "
              f"least {MIN_SHARED} shared. **This flags pairs for a human to read, it is not a verdict**: students "
              f"may share a common source, the same hint from recitation, or start from the same published code.", ""]
    if untokenized:
        lines += [f"Not compared (could not be tokenized): {cell(', '.join(untokenized), 400)}.", ""]
    lines += [f"- {len(g)} files linked by similar pairs: {cell(', '.join(g), 600)}" for g in groups_of(pairs)] + [""]
    lines += md_table(["similarity", "shared", "student", "student"],
                      [(f"{sim:.2f}", shared, cell(a, 60), cell(b, 60)) for sim, shared, a, b in pairs[:60]])
    if len(pairs) > 60:
        lines.append(f"({len(pairs) - 60} more pairs, within the groups above.)")
    return "\n".join(lines) + "\n", table


# ------------------------------------------------------------------ main
def check_setup(graded, python):
    """Refuses the class unless the reference solution scored 100: else the interpreter, the limits or the zip is
    wrong, and every student's grade would be too."""
    if graded.problem or abs(graded.result["score"] - 100) > 1e-3:
        first = graded.problem or next((t["output"] for t in visible_tests(graded.result)
                                        if t["score"] < t["max_score"]), graded.result.get("output", ""))
        refuse(f"the zip's reference solution scores {'nothing' if graded.problem else graded.result['score']} with "
               f"--python {python}, so the setup is broken and the class was not graded (check --python and the "
               f"limits, e.g. --memory-mb, --time-limit): {cell(first, 300)}")


def write_outputs(out, subs, graded, manifest, skeleton, info):
    """grades.csv, students/*/results.json, report.md and report.png; `graded`: {student: Graded}."""
    functions = list(manifest["points"])
    mentions = {label for label, pattern in SUSPICIOUS.items() if re.search(pattern, skeleton)}
    rows = [row_of(s, graded.get(s.student), functions, mentions) for s in subs]
    for r in rows:
        if r.status in ("graded", "not run"):
            os.makedirs(os.path.join(out, "students", r.student), exist_ok=True)
            write_atomic(os.path.join(out, "students", r.student, "results.json"),
                         json.dumps(graded[r.student].result, indent=1))
    write_csv(os.path.join(out, "grades.csv"), rows, functions)
    pairs, untokenized = similar_pairs({s.student: s.source for s in subs if not s.problem}, skeleton)
    text, table = report(rows, manifest, pairs, untokenized, dict(info, handout_mentions=mentions))
    write_figure(os.path.join(out, "report.png"), rows, manifest, table)
    write_atomic(os.path.join(out, "report.md"), text)
    return rows


def main(argv=None, grade=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submissions", help="folder (or zip) with one folder per student, each holding a diffusion.py")
    parser.add_argument("--out", default=None, help="output folder (default: SUBMISSIONS + '_graded')")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="files graded at a time (default: %(default)s, the number of cores)")
    parser.add_argument("--zip", default=None, help="the autograder zip (default: built from this repository into OUT)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the grader and the student's code, "
                        "runnable by an unprivileged uid (default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=480.0, help="per file (default: %(default)s s)")
    parser.add_argument("--probe-timeout", type=float, default=60.0, help="per probe (default: %(default)s s)")
    parser.add_argument("--memory-mb", type=int, default=MARGIN_MB,
                        help="what the student's processes may use above the interpreter after `import torch` "
                             "(default: %(default)s, as the runner)")
    parser.add_argument("--allow-same-user", action="store_true",
                        help="developers only: when not root, run the students' code as this user (no isolation)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    submissions = os.path.abspath(args.submissions)
    out = os.path.abspath(args.out or re.sub(r"\.zip$", "", submissions.rstrip(os.sep)) + "_graded")
    if args.jobs < 1:
        refuse(f"--jobs {args.jobs}: give at least 1")
    if not os.path.exists(submissions):
        refuse(f"{args.submissions} does not exist; give the folder (or zip) holding one folder per student")
    if os.path.isdir(submissions) and (out + os.sep).startswith(submissions + os.sep):
        refuse(f"--out {out} is inside {submissions}; choose a folder outside the submissions")
    if args.zip and not zipfile.is_zipfile(args.zip):
        refuse(f"--zip {args.zip} is not a zip; build one with python tools/make_autograder.py")
    if grade is None and os.geteuid() != 0 and not args.allow_same_user:
        refuse("not running as root, so the students' code cannot be run as a separate unprivileged user; run as "
               "root (as Gradescope does), or pass --allow-same-user on a machine you do not mind them reading")
    subs = collect(submissions)  # refuses a bad class before anything is written

    cache = os.path.join(out, ".cache")
    os.makedirs(cache, exist_ok=True)
    zip_path = args.zip or os.path.join(out, "autograder.zip")
    if args.zip is None:
        print(f"building {zip_path} from {ROOT}", file=sys.stderr)
        make_autograder.build(zip_path)
    manifest, reference = zip_contents(zip_path)
    with open(zip_path, "rb") as f:
        zip_sha = sha256(f.read())
    limits = {"time_limit": args.time_limit, "probe_timeout": args.probe_timeout, "memory_mb": args.memory_mb}
    grade = grade or (lambda source: grade_with_zip(source, zip_path, args.python, limits, args.allow_same_user))
    version = json.dumps([zip_sha, limits, args.allow_same_user]).encode()  # what a result depends on, but the file

    def key_of(source):
        return sha256(version + sha256(source).encode())

    started = time.time()
    sources = {key_of(reference): reference} | {key_of(s.source): s.source for s in subs if not s.problem}
    by_key, graded_now = grade_all(sources, grade, cache, args.jobs, lambda g: check_setup(g, args.python),
                                   progress=not args.no_progress)
    info = {"submissions": args.submissions, "zip": zip_path, "zip_sha": zip_sha, "limits": limits, "jobs": args.jobs,
            "graded_now": graded_now, "wall": time.time() - started}
    rows = write_outputs(out, subs, {s.student: by_key[key_of(s.source)] for s in subs if not s.problem}, manifest,
                         make_handout.strip_solutions(reference.decode())[0], info)
    print(f"{len(rows)} students ({graded_now} files graded now, the others from the cache; "
          f"{sum(1 for r in rows if r.status in ('bad input', 'grader crashed'))} marked); {info['wall']:.0f} s; "
          f"{os.path.join(out, 'grades.csv')}, {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # like Ctrl-C: stop the running graders, clean up
    sys.exit(main())
