"""Where the run happens: device choice, seeding, RNG isolation, mixed precision, DistributedDataParallel set-up."""
import contextlib
import datetime
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from kit.errors import ConfigError


def cuda_unsupported_reason():
    """Why the installed torch cannot run kernels on GPU 0 (None when it can, or when torch cannot tell).

    A build runs on GPUs whose architecture it was compiled for (same major version, equal or lower minor) or,
    through PTX, on newer ones. Kaggle's P100 (6.0) with a build that starts at sm_75 fails at the first kernel
    with "no kernel image is available"; this says so before any work starts."""
    major, minor = torch.cuda.get_device_capability(0)
    archs = torch.cuda.get_arch_list()
    if not archs:
        return None
    capability = major * 10 + minor

    def number(arch):
        return int(re.sub(r"\D", "", arch))

    runs = any(a.startswith("sm_") and number(a) // 10 == major and number(a) % 10 <= minor for a in archs) or any(
        a.startswith("compute_") and number(a) <= capability for a in archs
    )
    if runs:
        return None
    return (f"the GPU {torch.cuda.get_device_name(0)} (compute capability {major}.{minor}) is not supported by the "
            f"installed PyTorch {torch.__version__} (built for {' '.join(archs)}). On Kaggle choose the "
            "'GPU T4 x2' accelerator; elsewhere install a PyTorch build for this GPU, or pass --device cpu.")


def select_device(name="auto"):
    """cuda > mps > cpu for 'auto'; an explicit choice must be available and usable."""
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name not in ("auto", "cuda", "mps", "cpu"):
        raise ConfigError(f"--device {name!r}: choose auto, cuda, mps or cpu.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch. Use --device auto or cpu, "
                          "or install a CUDA build of torch on a GPU machine.")
    if name == "mps" and not mps_available:
        raise ConfigError("--device mps: Apple's MPS backend is not available here. Use --device auto or cpu.")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        reason = cuda_unsupported_reason()
        if reason:
            raise ConfigError(f"--device {name}: {reason}")
        return torch.device("cuda")
    if name == "auto":
        return torch.device("mps" if mps_available else "cpu")
    return torch.device(name)


def setup_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): one GPU per process and the process group. Returns (device, rank, world)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            # the other ranks wait in the next all-reduce while rank 0 samples and scores FID
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return device, rank, world_size


def distributed(model, device):
    """The model wrapped in DistributedDataParallel under torchrun (WORLD_SIZE > 1), else the model itself."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def read_back(pending, world_size):
    """Per-step losses kept on the device, as Python floats: one sync; averaged over the ranks under torchrun
    (world_size > 1). Empties `pending`."""
    if not pending:
        return []
    values = torch.stack(pending)
    pending.clear()
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return values.float().cpu().tolist()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def isolated_rng(device):
    """Run a block (sampling, FID, figures) without moving the training RNG streams, so that where the
    samples are drawn does not change the training run (and resumed runs stay bit-identical)."""
    accelerated = device.type != "cpu"
    devices = [device.index or 0] if accelerated else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerated else "cuda"):
        yield


def cpu_has_native_bf16():
    """x86 CPUs with AVX512-BF16 or AMX run bf16 matrix math natively (read from Linux's /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def amp_dtype(choice, device):
    """The autocast dtype for --amp on this device, or None for full fp32."""
    if choice == "auto":
        if device.type == "cuda":
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and newer
            return torch.bfloat16 if native_bf16 else torch.float16  # fp16 + GradScaler on a T4
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16  # about 1.9x faster steps on such a CPU, same loss curve (bench/RESULTS.md)
        return None  # emulated bf16 is slower than fp32 on other CPUs; MPS autocast support is partial
    if choice == "off":
        return None
    if device.type == "cpu" and choice == "fp16":
        raise ConfigError("--amp fp16 needs a GPU; use --amp bf16 or off on the CPU.")
    if device.type == "cpu" and choice == "bf16" and not cpu_has_native_bf16():
        print("warning: --amp bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): bf16 is emulated there "
              "and can be many times slower than fp32. Use --amp auto or off.", file=sys.stderr)
    return torch.bfloat16 if choice == "bf16" else torch.float16


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class RunClock:
    """Times the first steps of a run (after one warm-up step) and, when the whole run will take hours on this
    device, says so once, with what to do instead."""

    TIMED_STEPS, LONG_RUN_SECONDS = 3, 3600

    def __init__(self, first_step, last_step, device):
        self.first_step, self.last_step, self.device = first_step, last_step, device
        self.started = None

    def note_after(self, step):
        """The note to print after `step`, if any (only once, after the timed steps)."""
        if step == self.first_step + 1:
            self.started = time.perf_counter()
        if step != self.first_step + 1 + self.TIMED_STEPS or self.started is None:
            return None
        seconds_per_step = (time.perf_counter() - self.started) / self.TIMED_STEPS
        left = seconds_per_step * (self.last_step - step)
        if left < self.LONG_RUN_SECONDS:
            return None
        where = {"cpu": "this CPU", "mps": "this Mac's GPU"}.get(self.device.type, "this GPU")
        return (f"note: at {seconds_per_step:.2f} s a step on {where}, the {self.last_step - step} steps left will "
                f"take about {left / 3600:.1f} hours. The homework's runs are meant for a GPU (run_in_colab.ipynb or "
                f"run_in_kaggle.ipynb); here, --train_steps 1000 takes about "
                f"{seconds_per_step * 1000 / 60:.0f} minutes. Ctrl-C saves and stops; re-running resumes.")
