"""Regenerate test_fixtures/diffusion_reference.pt from the reference solution (instructors only).

    python tools/make_fixtures.py            # from the repository root, with the reference diffusion.py

Run it after changing the reference diffusion.py, the probes in test_diffusion.py (PROBES), the mutant
catalogue in tools/mutation_test.py (its hints end up in the fixture), or the pinned torch version.
Then run `python tools/mutation_test.py` and commit the fixture (it is small; `git add -f`, since *.pt is
git-ignored).

What it stores:
  probes[name]["expected"]       the reference solution's output of each probe (float64)
  probes[name]["mistakes"]       for each known mistake whose output differs: N_SUBSAMPLE evenly spaced values of
                                 that output (float32), so a failing test can say which mistake it looks like
  probes[name]["mistake_hints"]  per mistake row, indices into hints
  hints                          the catalogue's student-facing hints
  rng_check                      a few torch.randn values, to detect a torch whose RNG differs
"""
import importlib.util
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import mutation_test  # noqa: E402
import test_diffusion  # noqa: E402


def load_module(source, name, folder):
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(probe_fn, module):
    torch.manual_seed(0)
    try:
        out = probe_fn(module)
    except BaseException as exc:  # noqa: BLE001 - pytest.fail raises a BaseException
        if isinstance(exc, KeyboardInterrupt):
            raise
        return None
    return out.detach().to("cpu", torch.float64) if torch.is_tensor(out) else None


def main():
    source = mutation_test.reference_source()
    hints = [m.hint for m in mutation_test.MUTANTS]
    with tempfile.TemporaryDirectory() as folder:
        reference = load_module(source, "diffusion_reference_solution", folder)
        mutants = [load_module(mutation_test.apply(source, m), f"diffusion_mutant_{i}", folder)
                   for i, m in enumerate(mutation_test.MUTANTS)]
        probes = {}
        for name, (fn, rtol, atol, _, _) in test_diffusion.PROBES.items():
            expected = run(fn, reference)
            assert expected is not None and torch.isfinite(expected).all(), f"reference fails probe {name}"
            index = test_diffusion.subsample_index(expected.numel())
            scale = max(1.0, float(expected.abs().max()))
            rows, row_hints = [], []
            for i, module in enumerate(mutants):
                out = run(fn, module)
                if out is None or out.shape != expected.shape or not torch.isfinite(out).all():
                    continue
                if ((out - expected).abs() <= atol * scale + rtol * expected.abs()).all():
                    continue  # this mistake does not show on this probe
                sub = out.reshape(-1)[index].float()
                for r, row in enumerate(rows):  # merge mistakes with the same output
                    if torch.allclose(row, sub, rtol=1e-6, atol=1e-9):
                        row_hints[r].append(i)
                        break
                else:
                    rows.append(sub)
                    row_hints.append([i])
            probes[name] = {
                "expected": expected,
                "mistakes": torch.stack(rows) if rows else torch.zeros(0, index.numel()),
                "mistake_hints": row_hints,
            }
            print(f"{name:<40} {tuple(expected.shape)!s:<18} {len(rows):>2} distinct mistakes")
    data = {
        "format": 1,
        "torch_version": torch.__version__.split("+")[0],
        "rng_check": test_diffusion.randn((6,), 12345),
        "hints": hints,
        "probes": probes,
    }
    path = test_diffusion.FIXTURE_PATH
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(data, path)
    print(f"wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
