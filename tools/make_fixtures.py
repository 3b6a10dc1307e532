"""Regenerate test_fixtures/reference_outputs.json from the reference solution (instructors only).

    python tools/make_fixtures.py            # from the repository root, with the reference diffusion.py

Run it after changing the reference diffusion.py, the checks in test_diffusion.py (CHECKS) or their machinery in
grading.py (PROBES), the mutant catalogue in tools/mutation_test.py (its hints end up in the fixture), or the pinned
torch version. Then run `python tools/mutation_test.py` and commit the fixture.

The fixture serves local `pytest test_diffusion.py` only (it ships with the handout, so students can read it:
it only holds the reference's outputs for the fixed LOCAL_PARAMS). The autograder never reads it: it draws
fresh inputs and computes the reference's outputs at grading time (tools/grading_trusted.py).

What it stores:
  outputs[request key]   the reference solution's probe outputs (plain numbers) for LOCAL_PARAMS
  mistakes[check name]   for each known mistake whose main output differs from the reference's:
                         [[mutant indices], N_SUBSAMPLE values of that output], so a failing check can say which
                         mistake it looks like
  hints                  the catalogue's student-facing hints
  rng_check              a few torch.randn values, to detect a torch whose RNG differs
"""
import importlib.util
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import grading  # noqa: E402
import mutation_test  # noqa: E402
import test_diffusion as td  # noqa: E402


def load_module(source, name, folder):
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain(data):
    return json.loads(json.dumps(data))


def main():
    source = mutation_test.reference_source()
    params = grading.LOCAL_PARAMS
    per_check, distinct = grading.requests_of(td.CHECKS, params)
    with tempfile.TemporaryDirectory() as folder:
        reference = load_module(source, "diffusion_reference_solution", folder)
        outputs = {}
        for key, request in distinct.items():
            if request["probe"] in grading.NO_REFERENCE:
                continue
            outputs[key] = plain(grading.run_request(reference, request))
        for chk in td.CHECKS:  # the reference must pass its own checks
            refs = [outputs.get(grading.request_key(r), {}) for r in per_check[chk.name]]
            got = [plain(grading.run_request(reference, r)) for r in per_check[chk.name]]
            passed, message = grading.judge_check(chk, got, refs, params)
            assert passed, f"the reference fails {chk.name}: {message}"
        mutants = [(i, m.function, load_module(mutation_test.apply(source, m), f"diffusion_mutant_{i}", folder))
                   for i, m in enumerate(mutation_test.MUTANTS)]
        rows = grading.mistake_rows(td.CHECKS, params, outputs, mutants, per_check)
    for name, found in rows.items():
        print(f"{name:<60} {len(found):>2} distinct mistakes")
    data = {"format": 2, "torch_version": torch.__version__.split("+")[0], "rng_check": grading.randn((6,), 12345).tolist(),
            "hints": [m.hint for m in mutation_test.MUTANTS], "outputs": outputs, "mistakes": rows}
    os.makedirs(os.path.dirname(grading.FIXTURE_PATH), exist_ok=True)
    with open(grading.FIXTURE_PATH, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    print(f"wrote {os.path.relpath(grading.FIXTURE_PATH, ROOT)} ({os.path.getsize(grading.FIXTURE_PATH) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
