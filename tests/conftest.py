"""Shared fixtures for the project's own tests (the student-facing tests live in ../test_diffusion.py)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_AFHQ = os.path.join(REPO, "..", "shared", "afhq36")
sys.path.insert(0, REPO)

# One thread for torch/OpenMP/MKL, in this process and (through the environment) in every process the tests
# start: on a busy 2-core machine a second OpenMP thread makes CPU torch about 10x slower, not faster.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

from kit.data import make_smoke_data  # noqa: E402
from utils import command_line as as_flags  # noqa: E402  (main.py's flags for keyword options)

# A hang guard for the processes the tests start, not a speed limit: a loaded machine must not fail a test.
HANG_GUARD_S = 1800


@pytest.fixture(autouse=True)
def _offline_environment(tmp_path, monkeypatch):
    """No network, no wandb server, no shared caches: each test gets its own."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DDPM_INCEPTION_DIR", str(tmp_path / "inception"))
    monkeypatch.setenv("DDPM_INCEPTION_URL", "http://127.0.0.1:9/inception-2015-12-05.pt")  # closed port


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """48 generated 36x36 images in the homework layout (<folder>/cat/*.png)."""
    return make_smoke_data(str(tmp_path_factory.mktemp("images")))


def tiny_args(save_folder, data_path, **overrides):
    """A model and run small enough for a unit test on two CPU cores (about 0.1 s a step)."""
    args = dict(
        save_folder=str(save_folder), data_path=data_path, data_class="cat", image_size=16, time_steps=10,
        unet_dim=8, unet_dim_mults=(1, 2), batch_size=4, grad_accum=2, train_steps=4, save_and_sample_every=2,
        sample_grid_size=4, fid_num_samples=8, log_every=2, dataloader_workers=2, device="cpu", wandb="disabled",
        seed=0,
    )
    args.update(overrides)
    return args


def run_main(*argv, env=None, timeout=HANG_GUARD_S):
    """`python main.py ARGS` in a fresh process, as a student runs it."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "main.py"), *map(str, argv)], capture_output=True, text=True,
        timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )


def start_main(args, **popen):
    """`python main.py` with these options, started in the background (to signal it or race it)."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *as_flags(args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
