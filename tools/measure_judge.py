"""Time and peak memory of the autograder's trusted judge on hostile student outputs (instructors only).

    python tools/measure_judge.py [--payload-mb 160]

Builds the autograder zip in a temporary folder and runs its `trusted_judge.py judge` (as grader.py does) on the
extreme inputs the grader draws (T = 20 and 1100), twice: with the reference's own outputs as the student's
(honest), and with every probe's output replaced by a hostile one of the same JSON size: the stored-tensor list
padded with thousands of tensors, oversized tensors, extra keys, long strings and deep nesting, about
`--payload-mb` MB in all (the runner's protocol caps bound what reaches the judge; 160 MB is one 4 MB line per probe).
Prints the judge's wall time and peak resident memory (ru_maxrss of the child) for each.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

import make_autograder  # noqa: E402

PARAMS = {"T": {"small": 20, "large": 1100}, "mid": {"small": 10, "large": 550}, "seed": 20261203}


def hostile(T, size):
    """A probe output of about `size` bytes of JSON that the probes never send: most of it stored tensors of T
    values (what the judge compares most often), the rest an oversized tensor, extra keys, a long list, nesting."""
    deep = []
    for _ in range(200):
        deep = [deep]
    return {"stored": [{"name": f"pad{i}", "values": [0.5] * T} for i in range(size * 3 // 4 // (T * 5))],
            "out": {"shape": [size // 16 // 5], "values": [0.25] * (size // 16 // 5)},
            **{f"extra{i}": "x" * 1000 for i in range(size // 16 // 1000)},
            "calls": [[0, {"shape": [2], "values": [0, 0]}, 0.5]] * (size // 16 // 40), "deep": deep}


def run_judge(judge, payload):
    """(payload MB, wall seconds, peak RSS MB of the judge process, its output)."""
    text = json.dumps(payload).encode()
    with tempfile.TemporaryFile() as errors:
        started = time.time()
        proc = subprocess.Popen([sys.executable, "-I", judge, "judge"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=errors, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1"})
        proc.stdin.write(text)
        proc.stdin.close()
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.time() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            errors.seek(0)
            raise RuntimeError(errors.read().decode()[-2000:])
    return len(text) / 2 ** 20, elapsed, usage.ru_maxrss / 1024, json.loads(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload-mb", type=float, default=160)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        make_autograder.build(os.path.join(folder, "ag.zip"))
        with zipfile.ZipFile(os.path.join(folder, "ag.zip")) as z:
            z.extractall(folder)
        judge = os.path.join(folder, "trusted_judge.py")
        import grading
        import grading_trusted
        import test_diffusion as td
        import torch

        per_check, distinct = grading.requests_of(td.CHECKS, PARAMS)
        reference = {key: grading_trusted.plain(grading.run_request(td.diffusion, r)) for key, r in distinct.items()
                     if r["probe"] not in grading.NO_REFERENCE}
        honest = {key: grading_trusted.plain(grading.run_request(td.diffusion, r)) for key, r in distinct.items()}
        size = int(args.payload_mb * 2 ** 20 / len(distinct))
        cases = {"honest": honest,
                 "hostile": {key: hostile(r["args"]["T"], size) for key, r in distinct.items()}}
        baseline = subprocess.run([sys.executable, "-I", "-c", "import resource, sys; "
                                   f"sys.path[:0] = [{folder!r}]; import trusted_judge; "
                                   "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                                  capture_output=True, text=True, cwd=folder, env={"OMP_NUM_THREADS": "1"})
        imported = int(baseline.stdout.split()[-1]) / 1024
        print(f"the judge's modules (torch {torch.__version__}, the reference) take {imported:.0f} MB once imported")
        for name, student in cases.items():
            payload = {"params": PARAMS, "per_check": per_check, "reference": reference, "student": student}
            mb, elapsed, peak, out = run_judge(judge, payload)
            passed = sum(1 for v in out["results"].values() if v[0])
            print(f"{name}: payload {mb:.1f} MB, judge {elapsed:.1f} s, peak RSS {peak:.0f} MB "
                  f"({peak - imported:.0f} MB above the imports), {passed}/{len(out['results'])} checks passed")


if __name__ == "__main__":
    main()
