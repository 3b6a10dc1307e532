#!/usr/bin/env python
"""One command for the first GPU: the kit's GPU-only paths tested, then the benchmark run on the GPU (sized for
under 5 minutes), with the outcome written to bench/RESULTS.md (section "GPU check") under the device's name.

    python bench/gpu_check.py                 # the kit's venv plus bench/requirements.txt (the peer)
    python bench/gpu_check.py --repeats 3     # steadier benchmark figures, about a minute more

1. tests/test_gpu.py: `--smoke` on CUDA with --amp off, bf16 and fp16, with --compile, a run resumed CPU -> GPU
   and GPU -> CPU, two processes under torchrun (NCCL) where two GPUs exist;
2. bench/bench.py on the GPU: training, sampling and one FID evaluation against denoising-diffusion-pytorch and
   clean-fid's folder approach, and the handout's runs projected (10 000 steps; 1000 steps with FID every 100).

On a machine without a GPU it says so and runs nothing.
"""
import argparse
import datetime
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
RESULTS = os.path.join(BENCH_DIR, "RESULTS.md")
SECTION_START, SECTION_END = "<!-- gpu-check: written by bench/gpu_check.py -->", "<!-- /gpu-check -->"


def gpu_description():
    """The GPUs torch sees, named, or None when there is none."""
    if torch.cuda.is_available():
        names = [f"{torch.cuda.get_device_name(i)} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(i)))}, "
                 f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)" for i in range(torch.cuda.device_count())]
        return f"{len(names)} x CUDA: " + "; ".join(names) + f"; CUDA {torch.version.cuda}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple MPS"
    return None


def run(command, timeout):
    """Run a command from the repository root with its output shown as it comes; (exit code, output, seconds)."""
    print("\n$", " ".join(command), flush=True)
    start, lines = time.monotonic(), []
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "timeout"
    return code, "".join(lines), time.monotonic() - start


def write_section(text, path=RESULTS):
    """Put `text` between the GPU-check markers of bench/RESULTS.md, replacing an earlier GPU check's."""
    old = open(path).read() if os.path.isfile(path) else ""
    section = f"{SECTION_START}\n{text.rstrip()}\n{SECTION_END}\n"
    pattern = re.compile(re.escape(SECTION_START) + ".*?" + re.escape(SECTION_END) + "\n?", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: section, old)
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + section
    with open(path, "w") as f:
        f.write(new)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="benchmark rounds (bench.py --repeats)")
    parser.add_argument("--output", default=RESULTS, help="the markdown file whose GPU-check section is written")
    args = parser.parse_args(argv)
    device = gpu_description()
    if device is None:
        print(f"gpu_check: no GPU found (torch {torch.__version__}: CUDA not available, MPS not available). Nothing "
              "was run. Run it on a machine with an NVIDIA GPU (or a Mac's MPS for the tests).")
        return 0
    started = time.monotonic()
    print(f"gpu_check: {device}; torch {torch.__version__}")
    env_note = f"torch {torch.__version__}, Python {sys.version.split()[0]}"
    tests = run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                timeout=240)
    test_lines = [line for line in tests[1].splitlines() if line.startswith(("PASSED", "SKIPPED", "FAILED", "ERROR"))
                  or re.search(r"\d+ (passed|failed|skipped)", line)]

    if not torch.cuda.is_available():
        bench, bench_text = None, "Benchmark: not run (it compares CUDA figures; this device is not CUDA)."
    elif importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        bench, bench_text = None, ("Benchmark: not run: the peer is not installed "
                                   "(`pip install -r bench/requirements.txt`).")
    else:
        with tempfile.TemporaryDirectory() as folder:
            table = os.path.join(folder, "bench.md")
            bench = run([sys.executable, os.path.join("bench", "bench.py"), "--device", "cuda", "--repeats",
                         str(args.repeats), "--output", table], timeout=420)
            bench_text = (open(table).read().split("\n", 1)[1].strip() if bench[0] == 0 and os.path.isfile(table)
                          else f"Benchmark: FAILED (exit code {bench[0]}); its last lines:\n\n```\n"
                               + "\n".join(bench[1].splitlines()[-15:]) + "\n```")

    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    text = "\n".join([
        f"## GPU check: {device}",
        "",
        f"`python bench/gpu_check.py` on {date}, {env_note}, {time.monotonic() - started:.0f} s in all.",
        "",
        f"tests/test_gpu.py ({tests[2]:.0f} s, exit code {tests[0]}):",
        "",
        "```",
        *test_lines,
        "```",
        "",
        bench_text,
    ])
    write_section(text, args.output)
    print(f"\ngpu_check: {time.monotonic() - started:.0f} s; written to {args.output} (section 'GPU check')")
    return 0 if tests[0] == 0 and (bench is None or bench[0] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
