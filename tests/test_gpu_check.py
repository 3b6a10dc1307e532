"""bench/gpu_check.py, the one command for a lent GPU: what it says without one, and how it records its outcome."""
import importlib.util

import pytest
import torch

from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", f"{REPO}/bench/gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(gpu_check.gpu_description() is not None, reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path, capsys):
    output = tmp_path / "RESULTS.md"
    assert gpu_check.main(["--output", str(output)]) == 0
    assert capsys.readouterr().out == (
        f"gpu_check: no GPU found (torch {torch.__version__}: CUDA not available, MPS not available). Nothing was "
        "run. Run it on a machine with an NVIDIA GPU (or a Mac's MPS for the tests).\n")
    assert not output.exists()


def test_the_gpu_section_replaces_the_previous_one_and_keeps_the_rest(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark on a CPU\n\nthe CPU table\n")
    gpu_check.write_section("## GPU check: first GPU\n", results)
    gpu_check.write_section("## GPU check: second GPU\n", results)
    text = results.read_text()
    assert text.startswith("# Benchmark on a CPU\n\nthe CPU table\n\n" + gpu_check.SECTION_START)
    assert "second GPU" in text and "first GPU" not in text and text.count(gpu_check.SECTION_END) == 1
