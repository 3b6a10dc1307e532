#!/usr/bin/env python
"""Run the kit in the package versions of Google Colab's GPU runtime (or with an older torch), as a student would.

Builds a fresh virtual environment holding the kit's packages (requirements-dev.txt) at the versions of Colab's
published `pip freeze` (../shared/platforms/colab-pip-freeze-gpu.txt: torch 2.11.0, torchvision 0.26.0, numpy 2.1.3,
wandb 0.28.1, matplotlib 3.10.0, ipykernel 6.17.1, ...); packages Colab lacks (clean-fid, pytest-timeout) come at
requirements-dev.txt's versions, as the notebooks' install cell adds them. Then runs, in that environment: the
graded tests, `main.py --smoke`, both notebooks headless (tests/test_notebooks.py) and the kit's tests.

    python tools/check_platform.py --python /path/to/python3.12               # Colab's versions
    python tools/check_platform.py --python python3.12 --torch 2.4.0 --torchvision 0.19.0   # the oldest torch
    python tools/check_platform.py ... -- tests/test_trainer.py -x             # only these kit tests

PyPI's Linux torch wheels are CUDA builds (about 1 GB, plus 3 GB of NVIDIA libraries): the environment takes
minutes to build and is kept (--venv) for the next check. Not part of CI for that reason. Exits non-zero on the
first step that fails.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLAB_FREEZE = REPO.parent / "shared" / "platforms" / "colab-pip-freeze-gpu.txt"
# The CUDA runtime that torch's wheel pulls in: whatever the wheel asks for (Colab's pins belong to its own build).
NOT_PINNED = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def colab_versions(path=COLAB_FREEZE):
    """{name: version} of Colab's pip freeze; local build tags dropped (2.11.0+cu128 -> 2.11.0: PyPI's build of the
    same release), packages installed from a URL left out."""
    versions = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and " @ " not in line and "==" in line:
            name, version = line.split("==", 1)
            versions[canonical(name)] = version.split("+")[0]
    return versions


def requirement_lines(path):
    """The requirement lines of a requirements file, following -r includes, comments dropped."""
    lines = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            lines += requirement_lines(Path(path).parent / line[3:].strip())
        elif line:
            lines.append(line)
    return lines


def install_plan(platform, requirements=REPO / "requirements-dev.txt", overrides=None):
    """(requirements, constraints): each kit requirement at the platform's version where the platform has the
    package (else the kit's own line), with `overrides` ({name: version}) winning; and the platform's version of
    every other package as a constraint, so that dependencies also come at the platform's versions."""
    overrides = {canonical(name): version for name, version in (overrides or {}).items()}
    wanted = {**platform, **overrides}
    chosen = []
    for line in requirement_lines(requirements):
        name = canonical(re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0])
        chosen.append(f"{name}=={wanted[name]}" if name in wanted else line)
    named = {canonical(re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0]) for line in chosen}
    constraints = [f"{name}=={version}" for name, version in sorted(wanted.items())
                   if name not in named and not NOT_PINNED.match(name)]
    return chosen, constraints


def run(command, env=None, **kwargs):
    print("\n$", " ".join(map(str, command)), flush=True)
    start = time.monotonic()
    result = subprocess.run([str(c) for c in command], cwd=REPO, env=env, **kwargs)
    print(f"({time.monotonic() - start:.0f} s, exit code {result.returncode})", flush=True)
    if result.returncode:
        sys.exit(f"check_platform: failed: {' '.join(map(str, command))}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--python", default="python3.12", help="the interpreter of the environment (Colab: 3.12)")
    parser.add_argument("--venv", default=None, help="where to build it (default: /tmp/ddpm-platform-<torch>); reused")
    parser.add_argument("--torch", help="another torch than Colab's, e.g. 2.4.0 (then give --torchvision too)")
    parser.add_argument("--torchvision", help="the torchvision made for --torch (2.4.0 -> 0.19.0)")
    parser.add_argument("--freeze", default=str(COLAB_FREEZE), help="the platform's pip freeze")
    parser.add_argument("--build-only", action="store_true", help="only build the environment and print its versions")
    parser.add_argument("kit_tests", nargs="*", default=["tests", "--ignore=tests/test_notebooks.py"],
                        help="pytest arguments for the kit's tests (default: all but the notebooks, run before)")
    args = parser.parse_args(argv)
    if bool(args.torch) != bool(args.torchvision):
        parser.error("--torch and --torchvision go together: PyPI's torchvision imports only beside its own torch")
    python = shutil.which(args.python)
    if python is None:
        parser.error(f"--python {args.python}: not found; pass the path of a Python 3.12 interpreter")
    platform = colab_versions(args.freeze)
    overrides = {"torch": args.torch, "torchvision": args.torchvision} if args.torch else {}
    venv = Path(args.venv or f"/tmp/ddpm-platform-torch-{args.torch or platform['torch']}")
    requirements, constraints = install_plan(platform, overrides=overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    venv_python = venv / "bin" / "python"

    if not venv_python.exists():
        run([python, "-m", "venv", venv], env=env)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "requirements.txt").write_text("\n".join(requirements) + "\n")
        (Path(folder) / "constraints.txt").write_text("\n".join(constraints) + "\n")
        run([venv_python, "-m", "pip", "install", "-q", "-r", Path(folder) / "requirements.txt",
             "-c", Path(folder) / "constraints.txt"], env=env)
    run([venv_python, "-c", "import sys, torch, torchvision, numpy, wandb, matplotlib, ipykernel; print('python', "
         "sys.version.split()[0], '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| numpy', "
         "numpy.__version__, '| wandb', wandb.__version__, '| matplotlib', matplotlib.__version__, '| ipykernel', "
         "ipykernel.__version__)"], env=env)
    if args.build_only:
        return 0
    with tempfile.TemporaryDirectory() as folder:
        run([venv_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_diffusion.py"], env=env)
        run([venv_python, "main.py", "--smoke", "--save_folder", Path(folder) / "smoke"], env=env)
        run([venv_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_notebooks.py"], env=env)
        run([venv_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.kit_tests], env=env)
    print(f"\ncheck_platform: all passed in {venv} ({', '.join(requirements[:2])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
