"""The paths that only run on a GPU: the smoke run on CUDA with each --amp and with --compile, a run resumed across
devices (CPU -> GPU, GPU -> CPU) and two processes under torchrun with NCCL. Skipped, with the reason, where no CUDA
or MPS device exists; bench/gpu_check.py runs them with the benchmark on a lent GPU."""
import math
import os

import pytest
import torch
from conftest import tiny_args

import utils

CUDA = torch.cuda.is_available()
MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
GPU = "cuda" if CUDA else "mps" if MPS else None
pytestmark = pytest.mark.skipif(GPU is None, reason="no CUDA or MPS device here: these checks need a GPU "
                                                    "(python bench/gpu_check.py runs them where one is)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA only (mixed precision with a gradient scaler, torch.compile)")


def load(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), map_location="cpu", weights_only=True)


def assert_trained(folder, steps):
    """A checkpoint at `steps` with finite weights, and a finite loss at every step."""
    state = load(folder)
    assert state["step"] == steps
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    losses = [float(line.split(",")[1]) for line in open(os.path.join(folder, "metrics.csv")).read().splitlines()[1:]]
    assert len(losses) == steps and all(map(math.isfinite, losses))
    return state


@pytest.mark.parametrize("amp", ["off", pytest.param("bf16", marks=needs_cuda), pytest.param("fp16", marks=needs_cuda)])
def test_smoke_run_on_the_gpu(tmp_path, amp):
    """`python main.py --smoke --amp X` on the GPU: training, sampling, FID, the figures, a checkpoint."""
    summary = utils.train_diffusion(smoke=True, save_folder=str(tmp_path), device=GPU, amp=amp, wandb="disabled")
    assert summary["step"] == 4 and summary["fid"] is not None and summary["fid"] > 0
    state = assert_trained(tmp_path, 4)
    assert bool(state["scaler"]) == (amp == "fp16")  # the gradient scaler runs (and is saved) with fp16 only
    for figure in ("loss.png", "fid.png", "forward_diffusion.png", "backward_diffusion.png", "samples/sample-4.png"):
        assert (tmp_path / figure).is_file(), figure


@needs_cuda
def test_compiled_smoke_run(tmp_path):
    summary = utils.train_diffusion(smoke=True, save_folder=str(tmp_path), device="cuda", compile=True,
                                    wandb="disabled")
    assert summary["step"] == 4
    assert_trained(tmp_path, 4)


@pytest.mark.parametrize("first, then", [("cpu", GPU), (GPU, "cpu")], ids=["cpu-to-gpu", "gpu-to-cpu"])
def test_a_run_resumes_on_another_device(tmp_path, image_folder, first, then):
    """A student starts on a laptop and resumes on Colab (or the reverse): the optimizer state follows the weights
    to the new device, and fused Adam (CUDA) takes a state written without it, and the reverse."""
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=2, device=first))
    before = load(tmp_path)["model"]
    summary = utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=4, device=then))
    assert summary["step"] == 4
    after = assert_trained(tmp_path, 4)["model"]
    assert any(not torch.equal(before[name], after[name]) for name in before), "the resumed steps changed nothing"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two CUDA GPUs needed (Kaggle's T4 x2)")
def test_two_gpus_under_torchrun_keep_the_images_a_step(tmp_path, image_folder):
    """The notebooks' path on Kaggle's T4 x2: one process per GPU with NCCL, grad_accum 2 split into 1 each."""
    summary = utils.train_with_torchrun(2, **tiny_args(tmp_path, image_folder, train_steps=4, device="cuda"))
    assert summary["processes"] == 2 and summary["grad_accum"] == 1
    state = assert_trained(tmp_path, 4)
    assert state["config"]["grad_accum"] == 1
